"""Partial rollouts continue exactly where they stopped; rollouts become RL batches whose loss
tokens are this iteration's response tokens; the policy step trains on them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_vl_jax.model.config import get_preset
from kimi_vl_jax.model.kimi_vl import KimiVL, init_params
from kimi_vl_jax.rl import policy_step, rollouts
from kimi_vl_jax.rl.mirror_descent import MirrorDescentConfig
from kimi_vl_jax.rl.partial_rollouts import RolloutBuffer
from kimi_vl_jax.sampling import Prompt, Sampler, SamplingParams
from kimi_vl_jax.train.train_step import TrainState, new_counters


def _setup():
  cfg = get_preset('tiny')
  params = nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0), with_images=False))
  return cfg, params


@pytest.mark.slow
def test_partial_rollout_continues_where_it_stopped():
  cfg, params = _setup()
  rng = np.random.default_rng(0)
  recs = [rollouts.PromptRecord(Prompt(rng.integers(1, 1000, size=n)), '1', 'numeric')
          for n in (7, 12)]
  sampler = Sampler(cfg, params, max_len=64, prompt_buckets=(16, 32), batch_buckets=(2, 4))
  greedy = lambda m: SamplingParams(max_new_tokens=m, temperature=0.0, stop_token_ids=())
  whole = sampler.generate([r.prompt for r in recs], greedy(10))
  buf = RolloutBuffer(k=1, segment_tokens=6, max_segments=2)
  gids = [buf.add(i) for i in range(2)]
  first = sampler.generate([r.prompt for r in recs], greedy(6))
  for g, t, lp in zip(gids, first.tokens, first.logprobs):
    buf.extend(g, 0, t, lp, iteration=0, stopped=False)
  pending = buf.pending()
  assert pending == [(gids[0], 0), (gids[1], 0)]
  conts = [rollouts.continuation(recs[buf.groups[g].prompt_id], buf.groups[g].responses[j])
           for g, j in pending]
  second = sampler.generate(conts, greedy(4))
  for (g, j), t, lp in zip(pending, second.tokens, second.logprobs):
    buf.extend(g, j, t, lp, iteration=1, stopped=False)
  done = buf.pop_done()
  for grp, ref, ref_lp in zip(done, whole.tokens, whole.logprobs):
    np.testing.assert_array_equal(grp.responses[0].tokens, ref)
    np.testing.assert_allclose(grp.responses[0].logprobs, ref_lp, atol=1e-5)
    assert grp.responses[0].iterations == [0] * 6 + [1] * 4


@pytest.mark.slow
def test_train_batch_marks_this_iterations_tokens_and_the_step_learns():
  cfg, params = _setup()
  k = 2
  rec = rollouts.PromptRecord(Prompt(np.arange(3, 10)), '1', 'numeric')
  buf = RolloutBuffer(k=k, segment_tokens=4, max_segments=2)
  g = buf.add(0)
  buf.extend(g, 0, [11, 12, 13], [0.0] * 3, iteration=0, stopped=False)
  buf.extend(g, 0, [14, 15], [0.0] * 2, iteration=1, stopped=True)
  buf.extend(g, 1, [21, 22], [0.0] * 2, iteration=1, stopped=True)
  (grp,) = buf.pop_done()
  rows = [(rec, grp.responses[0], 1.0), (rec, grp.responses[1], 0.0)]
  b = rollouts.train_batch(rows, iteration=1, num_rows=4, length_buckets=(16,), config=cfg)
  # Row 0: prompt 7 tokens + 5 response tokens, of which the last two are iteration 1's.
  np.testing.assert_array_equal(b['input_ids'][0, :12], list(range(3, 10)) + [11, 12, 13, 14, 15])
  np.testing.assert_array_equal(np.flatnonzero(b['loss_mask'][0]), [9, 10])
  np.testing.assert_array_equal(b['targets'][0, 9:11], [14, 15])
  np.testing.assert_array_equal(np.flatnonzero(b['loss_mask'][1]), [6, 7])
  np.testing.assert_array_equal(b['valid'], [1, 1, 0, 0])
  np.testing.assert_array_equal(b['loss_mask'][2:], 0)

  model = KimiVL(cfg)
  old, _ = jax.jit(lambda p, x: policy_step.token_logprobs(model, p, x))(params, b)
  b['old_logp'] = np.asarray(old)
  tx = optax.adam(1e-2)
  step = jax.jit(policy_step.make_policy_step(model, tx, k=k, md=MirrorDescentConfig(tau=0.1)))
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     rng=jnp.zeros(2, jnp.uint32), counters=new_counters())
  for _ in range(3):
    state, m = step(state, b)
  assert int(m['skipped']) == 0
  new, _ = jax.jit(lambda p, x: policy_step.token_logprobs(model, p, x))(state.params, b)
  delta = np.sum((np.asarray(new) - b['old_logp']) * b['loss_mask'], axis=1)
  # The rewarded response became more likely, the other less (advantages +0.5 / -0.5).
  assert delta[0] > 0 > delta[1], delta


def test_minibatch_groups_pads_the_last_step_to_the_smallest_bucket():
  from kimi_vl_jax.rl.policy_step import minibatch_groups
  assert minibatch_groups(0, 32) == []
  assert minibatch_groups(5, 32) == [8]
  assert minibatch_groups(9, 32) == [16]
  assert minibatch_groups(32, 32) == [32]
  assert minibatch_groups(41, 32) == [32, 16]
  assert minibatch_groups(70, 32) == [32, 32, 8]
  assert minibatch_groups(3, 4) == [4] and minibatch_groups(1, 4) == [1]
  # each padded step holds whole groups per micro-batch
  assert minibatch_groups(3, 8, grad_accum=4) == [4]
  assert minibatch_groups(1, 8, grad_accum=8) == [8]
