"""`Sampler.generate`: greedy tokens and log-probs equal teacher forcing, sampled log-probs are
those of the truncated distribution, per-row stop tokens and budgets, n samples per prompt
(different, reproducible by seed), streaming, chat-message prompts."""

import jax
import numpy as np
import pytest

from kimi_vl_jax.sampling import Sampler, SamplingParams, truncated_logprobs
from tests.sampling import helpers

NEW = 6


@pytest.fixture(scope='module')
def sampler():
  return Sampler(helpers.config(), helpers.params(), max_len=32, prompt_buckets=(16,),
                 batch_buckets=(4, 8))


def _teacher_logprobs(prompts, tokens, sp: SamplingParams):
  """Log-probs of `tokens` (per prompt, padded to NEW) recomputed by one full forward."""
  cfg, p = helpers.config(), helpers.params()
  n = max(len(t) for t in tokens)
  cont = np.zeros((len(tokens), n), np.int32)
  for b, t in enumerate(tokens):
    cont[b, :len(t)] = t
  full = helpers.teacher_forced_logits(cfg, p, prompts, cont)
  out = []
  for b, (q, t) in enumerate(zip(prompts, tokens)):
    L = len(q.input_ids)
    logits = full[b, L - 1:L - 1 + len(t)]                                   # [n, V]
    k = len(t)
    lp = truncated_logprobs(logits, np.full(k, sp.temperature, np.float32),
                            np.full(k, sp.top_k, np.int32), np.full(k, sp.top_p, np.float32),
                            truncate=sp.top_k > 0 or sp.top_p < 1)
    out.append((np.asarray(lp)[np.arange(k), t], np.asarray(logits)))
  return out


def test_greedy_tokens_and_logprobs_equal_teacher_forcing(sampler):
  prompts = helpers.text_prompts((5, 11, 3))
  sp = SamplingParams(max_new_tokens=NEW, temperature=0.0)
  out = sampler.generate(prompts, sp)
  assert [len(t) for t in out.tokens] == [NEW] * 3 and out.finish_reasons == ['length'] * 3
  assert out.texts is None
  for t, lp, (ref_lp, logits) in zip(out.tokens, out.logprobs,
                                     _teacher_logprobs(prompts, out.tokens, sp)):
    np.testing.assert_array_equal(t, logits.argmax(-1))     # greedy = argmax of the full forward
    assert np.abs(lp - ref_lp).max() <= 1e-4
