"""KV-cache sampling for Kimi-VL (`docs/sampling.md`)."""

from kimi_vl_jax.sampling.decode import (SamplerState, decode_loop, decode_step, init_state,
                                         prefill, sampling_config)
from kimi_vl_jax.sampling.prompts import Prompt, render_messages
from kimi_vl_jax.sampling.sampler import GenerateOutput, Sampler, SamplingParams
from kimi_vl_jax.sampling.truncation import sample, truncated_logprobs

__all__ = ['GenerateOutput', 'Prompt', 'Sampler', 'SamplerState', 'SamplingParams',
           'decode_loop', 'decode_step', 'init_state', 'prefill', 'render_messages', 'sample',
           'sampling_config', 'truncated_logprobs']
