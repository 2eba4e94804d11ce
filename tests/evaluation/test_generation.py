import flax.linen as nn
import jax
import numpy as np
import pytest

from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.evaluation import generation, prompts
from kimi_vl_jax.model import get_preset
from kimi_vl_jax.model.kimi_vl import init_params
from kimi_vl_jax.sampling import SamplingParams


def test_power_of_two_buckets():
  assert generation.power_of_two_buckets(64, 512) == (64, 128, 256, 512)
  assert generation.power_of_two_buckets(64, 500) == (64, 128, 256, 500)
  assert generation.power_of_two_buckets(1, 1) == (1,)
  assert generation.power_of_two_buckets(1, 6) == (1, 2, 4, 6)


@pytest.mark.slow
def test_sampler_generate_keeps_the_callers_order():
  """Prompts are batched by length; texts come back in input order, equal to one-by-one."""
  mc = get_preset('tiny')
  params = nn.meta.unbox(init_params(mc, jax.random.PRNGKey(0)))
  tok = make_tokenizer()
  cfg = prompts.eval_image_config({'max_patches': 16})
  msgs = [[{'role': 'user', 'content': ' '.join(['word'] * n)}] for n in (30, 2, 11)]
  ps = [prompts.build_prompt(m, tok, cfg) for m in msgs]
  model = type('M', (), {'config': mc, 'params': params, 'tokenizer': tok})
  sampler = generation.make_sampler(model, max_len=128, batch_size=2)
  sp = SamplingParams(max_new_tokens=4)
  seen = []
  texts = generation.sampler_generate(sampler, sp, 2, lambda d, t: seen.append((d, t)))(ps)
  assert seen == [(2, 3), (3, 3)]
  one_by_one = [generation.sampler_generate(sampler, sp, 1)([p])[0] for p in ps]
  assert texts == one_by_one and len(set(texts)) > 1
