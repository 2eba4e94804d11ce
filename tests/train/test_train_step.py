"""The shared train step: masked loss, non-finite skip, frozen parameters, accumulation, bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.train import losses
from kimi_vl_jax.train.train_step import ROUTER_BIAS_PATH, StepOptions, make_train_step
from tests.train.helpers import make_state, packed_batch


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_cross_entropy_sums_masked():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
  mask = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], np.float32)
  logits[0, 2] = np.nan  # masked position with a NaN logit must not leak into the sums
  out = losses.cross_entropy_sums(jnp.asarray(logits), targets, mask, z_loss_weight=0.5)
  ce, z, n = 0.0, 0.0, 0
  for b in range(2):
    for t in range(5):
      if mask[b, t]:
        lz = np.log(np.exp(logits[b, t].astype(np.float64)).sum())
        ce += lz - logits[b, t, targets[b, t]]
        z += lz ** 2
        n += 1
  np.testing.assert_allclose(out['ce_sum'], ce, rtol=1e-5)
  np.testing.assert_allclose(out['z_sum'], z, rtol=1e-5)
  np.testing.assert_allclose(out['loss_sum'], ce + 0.5 * z, rtol=1e-5)
  assert out['tokens'] == n


def test_nonfinite_batch_is_skipped_and_counted():
  mc, state, tx, trainable = make_state()
  step = jax.jit(make_train_step(KimiVL(mc), tx, StepOptions(), trainable))
  batch = packed_batch(mc)
  bad = dict(batch, patches=np.where(np.arange(batch['patches'].shape[1])[None, :, None] == 3,
                                     np.nan, batch['patches']).astype(np.float32))
  before_p, before_o = _leaves(state.params), _leaves(state.opt_state)
  s1, m1 = step(state, bad)
  assert int(m1['skipped']) == 1 and int(s1.counters['skipped_steps']) == 1
  assert not np.isfinite(float(m1['loss']))
  assert int(s1.step) == 1
  for k, v in _leaves(s1.params).items():
    np.testing.assert_array_equal(v, before_p[k], err_msg=k)  # bitwise unchanged
  for k, v in _leaves(s1.opt_state).items():
    np.testing.assert_array_equal(v, before_o[k], err_msg=k)
  # A good batch afterwards trains normally.
  s2, m2 = step(s1, batch)
  assert int(m2['skipped']) == 0 and int(s2.counters['skipped_steps']) == 1
  assert np.isfinite(float(m2['loss']))
  changed = [k for k, v in _leaves(s2.params).items() if not np.array_equal(v, before_p[k])]
  assert len(changed) > 10


def test_frozen_language_model():
  """Alignment-style mask: vision tower + projector train, every LLM parameter stays bitwise."""
  mc, state, tx, trainable = make_state(trainable=('^vision_tower/', '^projector/'))
  step = jax.jit(make_train_step(KimiVL(mc), tx, StepOptions(router_bias_rate=0.1), trainable))
  before = _leaves(state.params)
  s = state
  for i in range(2):
    s, m = step(s, packed_batch(mc, seed=i))
    assert np.isfinite(float(m['loss']))
  after = _leaves(s.params)
  llm = [k for k in before if k.startswith("['language_model']")]
  vis = [k for k in before if not k.startswith("['language_model']")]
  assert llm and vis
  for k in llm:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  moved = [k for k in vis if not np.array_equal(after[k], before[k])]
  assert len(moved) == len(vis), sorted(set(vis) - set(moved))


def test_router_bias_follows_load_and_no_gradient():
  mc, state, tx, trainable = make_state()
  rate = 0.01
  step = jax.jit(make_train_step(KimiVL(mc), tx, StepOptions(router_bias_rate=rate), trainable))
  batch = packed_batch(mc)
  _, aux = losses.lm_loss(KimiVL(mc), state.params, {k: jnp.asarray(v) for k, v in batch.items()})
  load = np.asarray(aux['expert_load'])
  bias0 = np.asarray(_get(state.params, ROUTER_BIAS_PATH))
  s, _ = step(state, batch)
  bias1 = np.asarray(_get(s.params, ROUTER_BIAS_PATH))
  expect = bias0 + rate * np.sign(load.mean(-1, keepdims=True) - load)
  np.testing.assert_allclose(bias1, expect, atol=1e-7)
  assert np.abs(bias1 - bias0).max() > 0


def test_grad_accumulation_matches_full_batch():
  mc, state, tx, trainable = make_state(weight_decay=0.0)
  batch = packed_batch(mc, B=4)
  one = jax.jit(make_train_step(KimiVL(mc), tx, StepOptions(router_bias_rate=0.0), trainable))
  two = jax.jit(make_train_step(KimiVL(mc), tx, StepOptions(grad_accum=2, router_bias_rate=0.0),
                                trainable))
  s1, m1 = one(state, batch)
  s2, m2 = two(state, batch)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-4)
  a, b = _leaves(s1.params), _leaves(s2.params)
  for k in a:
    # AdamW's first step is ~lr * sign(g): a gradient within rounding of 0 may flip sign, so
    # allow a handful of elements per tensor to differ, never a systematic difference.
    close = np.isclose(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert close.mean() > 0.999, (k, close.mean())
  with pytest.raises(ValueError, match='grad_accum=3'):
    jax.jit(make_train_step(KimiVL(mc), tx, StepOptions(grad_accum=3), trainable))(state, batch)
