"""MoE: parity with transformers' DeepseekV3MoE, routing rule, dispatch implementations, stats."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import text_fixture_utils as U
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model import moe as moe_lib
from kimi_vl_jax.model.moe import MoE


@pytest.mark.parametrize('name', U.VARIANTS)
def test_matches_transformers_moe_block(name):
  """First MoE layer on the reference's own input: routing (indices + weights) and output, for
  both routed-expert implementations (capacity large enough to drop nothing)."""
  config = U.load_config(name)
  params = jax.tree.map(lambda a: a[0], U.load_params(name, config)['moe_layers']['mlp'])
  probes = U.load_arrays(name, 'layers')
  x = probes['moe_in']
  B, T, _ = x.shape
  t = config.text
  scores, bias = moe_lib.Router(t.n_routed_experts, t.hidden_size).apply(
      {'params': params['gate']}, x)
  idx, weights = moe_lib.select_experts(
      scores, bias, top_k=t.num_experts_per_tok, n_group=t.n_group, topk_group=t.topk_group,
      norm_topk_prob=t.norm_topk_prob, routed_scaling_factor=t.routed_scaling_factor)
  order = np.argsort(np.asarray(idx), -1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1).reshape(B * T, -1),
                                probes['router_idx'])
  np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, -1).reshape(B * T, -1),
                             probes['router_weights'], atol=1e-6)
  for impl in ('dropless', 'dropless_blocked', 'capacity'):
    text = dataclasses.replace(t, moe_impl=impl, capacity_factor=4.0)
    out, aux = jax.jit(MoE(text).apply)({'params': params}, x, jnp.ones((B, T), jnp.int32))
    np.testing.assert_allclose(np.asarray(out), probes['moe_out'], atol=1e-5, rtol=0)


def numpy_select(scores, bias, k, n_group, topk_group, scale):
  """The reference rule, written out token by token."""
  E = scores.shape[-1]
  idx, w = [], []
  for s in scores:
    c = s + bias
    if n_group > 1:
      g = c.reshape(n_group, -1)
      group_score = np.sort(g, -1)[:, -2:].sum(-1)
      keep = np.argsort(-group_score, kind='stable')[:topk_group]
      c = np.where(np.isin(np.arange(E) // (E // n_group), keep), c, -np.inf)
    chosen = np.argsort(-c, kind='stable')[:k]
    weight = s[chosen] / (s[chosen].sum() + 1e-20) * scale
    order = np.argsort(chosen)
    idx.append(chosen[order])
    w.append(weight[order])
  return np.array(idx), np.array(w)


def test_select_experts_group_limited_rule():
  rng = np.random.default_rng(0)
  scores = 1 / (1 + np.exp(-rng.standard_normal((64, 16)))).astype(np.float32)
  bias = (0.3 * rng.standard_normal(16)).astype(np.float32)
  for n_group, topk_group in ((1, 1), (4, 2), (8, 3)):
    idx, w = moe_lib.select_experts(jnp.asarray(scores), jnp.asarray(bias), top_k=4,
                                    n_group=n_group, topk_group=topk_group,
                                    routed_scaling_factor=2.5)
    order = np.argsort(np.asarray(idx), -1)
    want_idx, want_w = numpy_select(scores, bias, 4, n_group, topk_group, 2.5)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1), want_idx)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1), want_w, rtol=1e-6)
  # The bias changes the choice but never the weights' source (the raw scores).
  _, w_nobias = moe_lib.select_experts(jnp.asarray(scores), jnp.zeros(16), top_k=4)
  idx_b, w_b = moe_lib.select_experts(jnp.asarray(scores), jnp.asarray(bias), top_k=4)
  assert not np.allclose(np.asarray(w_nobias), np.asarray(w_b))
  np.testing.assert_allclose(np.asarray(w_b).sum(-1), 1.0, rtol=1e-6)


def random_routing(seed, T=48, D=16, F=8, E=8, K=2):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  # Skewed routing so some experts overflow a small capacity.
  logits = rng.standard_normal((T, E)) + np.linspace(0, 2, E)
  idx = np.argsort(-logits, -1)[:, :K].astype(np.int32)
  w = jnp.asarray(rng.uniform(0.1, 1.0, (T, K)), jnp.float32)
  ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
        for s in ((E, D, F), (E, D, F), (E, F, D))]
  return x, jnp.asarray(idx), w, ws


def capacity_keep(idx, capacity, token_mask=None):
  """Which (t, k) assignments get a slot: first come (token-major order), first served."""
  T, K = idx.shape
  used = {}
  keep = np.zeros((T, K), bool)
  for t in range(T):
    if token_mask is not None and not token_mask[t]:
      continue
    for k in range(K):
      e = int(idx[t, k])
      if used.get(e, 0) < capacity:
        used[e] = used.get(e, 0) + 1
        keep[t, k] = True
  return keep


def run(impl, x, idx, w, ws, **kw):
  f = jax.jit(lambda x, w, ws: moe_lib.routed_experts(x, idx, w, *ws, impl=impl, **kw))
  return np.asarray(f(x, w, ws))


def test_capacity_equals_dropless_when_nothing_overflows():
  x, idx, w, ws = random_routing(0)
  dropless = run('dropless', x, idx, w, ws)
  capacity = run('capacity', x, idx, w, ws, capacity_factor=8.0 / 2)  # E / K: room for all
  np.testing.assert_allclose(capacity, dropless, atol=1e-5, rtol=0)
  # ... and so do their gradients (ragged_dot's transpose vs the einsum path).
  def grads(impl, **kw):
    def loss(x, w, ws):
      return jnp.sum(jnp.sin(moe_lib.routed_experts(x, idx, w, *ws, impl=impl, **kw)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, ws)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               grads('capacity', capacity_factor=4.0), grads('dropless'))


@pytest.mark.parametrize('T, seed', [(48, 0), (300, 1), (5, 2)])
def test_blocked_dropless_equals_ragged_dot(T, seed):
  """Same values and gradients, with skewed and empty expert groups (T=5: most are empty)."""
  x, idx, w, ws = random_routing(seed, T=T)
  if T == 5:
    assert len(set(np.asarray(idx).ravel().tolist())) < 8  # some experts get no rows
  np.testing.assert_allclose(run('dropless_blocked', x, idx, w, ws), run('dropless', x, idx, w, ws),
                             atol=1e-5, rtol=0)
  def grads(impl):
    def loss(x, w, ws):
      return jnp.sum(jnp.sin(moe_lib.routed_experts(x, idx, w, *ws, impl=impl)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, ws)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               grads('dropless_blocked'), grads('dropless'))


def test_blocked_dropless_runs_block_padded_matmuls_not_dense_ones():
  """The compiled HLO has no [M, E * D] operand (how XLA:CPU lowers ragged_dot)."""
  x, idx, w, ws = random_routing(0, T=256, D=16)
  M, E, D = 512, 8, 16
  hlo = jax.jit(lambda x, w, ws: moe_lib.routed_experts(x, idx, w, *ws, impl='dropless_blocked')
                ).lower(x, w, ws).compile().as_text()
  assert f'f32[{M},{E * D}]' not in hlo
  dense = jax.jit(lambda x, w, ws: moe_lib.routed_experts(x, idx, w, *ws, impl='dropless')
                  ).lower(x, w, ws).compile().as_text()
  if jax.default_backend() == 'cpu':
    assert f'f32[{M},{E * D}]' in dense  # the reason 'dropless_blocked' exists


def test_small_capacity_drops_overflow_in_token_order():
  x, idx, w, ws = random_routing(1)
  T, K = idx.shape
  factor = 0.5
  capacity = moe_lib.expert_capacity(T, K, 8, factor)
  assert capacity == math.ceil(0.5 * T * K / 8)
  keep = capacity_keep(np.asarray(idx), capacity)
  assert 0 < (~keep).sum() < keep.size  # some, not all, assignments dropped
  got = run('capacity', x, idx, w, ws, capacity_factor=factor)
  np.testing.assert_array_equal(got, run('capacity', x, idx, w, ws, capacity_factor=factor))
  # Exactly the dropless result with the dropped assignments' weights set to zero.
  want = run('dropless', x, idx, w * keep, ws)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(got - run('dropless', x, idx, w, ws)).max() > 1e-2


def test_padding_tokens_take_no_capacity_and_give_zero():
  x, idx, w, ws = random_routing(2)
  T, K = idx.shape
  mask = np.ones(T, bool)
  mask[:T // 3] = False  # padding first: it would steal every slot if it competed
  factor = 0.5
  keep = capacity_keep(np.asarray(idx), moe_lib.expert_capacity(T, K, 8, factor), mask)
  got = run('capacity', x, idx, w, ws, capacity_factor=factor, token_mask=jnp.asarray(mask))
  np.testing.assert_allclose(got, run('dropless', x, idx, w * keep, ws), atol=1e-5, rtol=0)
  assert np.all(got[~mask] == 0)
  dropless = run('dropless', x, idx, w, ws, token_mask=jnp.asarray(mask))
  assert np.all(dropless[~mask] == 0)
  np.testing.assert_allclose(dropless[mask], run('dropless', x, idx, w, ws)[mask], atol=1e-6)


def test_unknown_impl_and_bad_router_config_raise():
  x, idx, w, ws = random_routing(0, T=4)
  with pytest.raises(ValueError, match='moe_impl'):
    moe_lib.routed_experts(x, idx, w, *ws, impl='nope')
  text = config_lib.tiny().text
  for bad, match in (({'n_group': 3}, 'divisible'), ({'n_group': 4, 'topk_group': 5}, 'topk_group'),
                     ({'n_group': 4, 'topk_group': 1, 'num_experts_per_tok': 3}, 'num_experts')):
    with pytest.raises(ValueError, match=match):
      moe_lib.check_router_config(dataclasses.replace(text, **bad))


def test_expert_load_sums_to_one_and_ignores_padding():
  idx = jnp.array([[[0, 1], [1, 2], [3, 3]], [[2, 0], [7, 7], [7, 7]]], jnp.int32)  # [B=2, T=3, K]
  seg = jnp.array([[1, 1, 2], [1, 0, 0]])
  load = np.asarray(moe_lib.expert_load(idx, 8, seg != 0))
  want = np.array([2, 2, 2, 2, 0, 0, 0, 0]) / 8.0  # expert 7 is only chosen by padding
  np.testing.assert_allclose(load, want)
  assert np.asarray(moe_lib.expert_load(idx, 8, jnp.zeros_like(seg, bool))).sum() == 0


def test_sequence_balance_loss_matches_definition():
  rng = np.random.default_rng(3)
  B, T, E, K = 2, 10, 8, 2
  scores = 1 / (1 + np.exp(-rng.standard_normal((B, T, E))))
  idx = np.argsort(-scores, -1)[..., :K]
  seg = np.array([[1] * 4 + [2] * 5 + [0], [3] * 10])
  want = []
  for b, lo, hi in ((0, 0, 4), (0, 4, 9), (1, 0, 10)):  # the three packed sequences
    s, i, n = scores[b, lo:hi], idx[b, lo:hi], hi - lo
    f = E / (K * n) * np.array([(i == e).sum() for e in range(E)])
    p = (s / s.sum(-1, keepdims=True)).mean(0)
    want.append((f * p).sum())
  got = moe_lib.sequence_balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(idx),
                                      jnp.asarray(seg))
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
  # Perfect balance (uniform scores, every expert chosen equally often) gives exactly 1.
  uniform = jnp.full((1, 4, 4), 0.5)
  balanced = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]])
  assert float(moe_lib.sequence_balance_loss(uniform, balanced, jnp.ones((1, 4)))) == \
      pytest.approx(1.0)


def test_update_router_bias_rule():
  bias = jnp.array([[0.0, 0.1, -0.2, 0.0], [1.0, 1.0, 1.0, 1.0]])
  load = jnp.array([[0.1, 0.4, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
  new = moe_lib.update_router_bias(bias, load, 0.001)
  # Under-loaded -> up, over-loaded -> down, exactly average -> unchanged.
  np.testing.assert_allclose(new, [[0.001, 0.099, -0.2, 0.0], [1.0, 1.0, 1.0, 1.0]], atol=1e-7)
  assert new.dtype == bias.dtype


def test_moe_module_aux_and_bias_gradient():
  text = dataclasses.replace(U.load_config('text_tiny').text, capacity_factor=4.0)
  params = jax.tree.map(lambda a: a[0], U.load_params('text_tiny', U.load_config('text_tiny'))
                        ['moe_layers']['mlp'])
  probes = U.load_arrays('text_tiny', 'layers')
  x = probes['moe_in']
  seg = np.ones(x.shape[:2], np.int32)
  seg[1, 8:] = 0

  def loss(p):
    y, aux = MoE(text).apply({'params': p}, x, seg)
    return jnp.sum(y ** 2) + aux['balance_loss'], aux
  grads, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
  np.testing.assert_allclose(np.asarray(aux['expert_load']).sum(), 1.0, rtol=1e-6)
  assert np.all(np.asarray(grads['gate']['e_score_correction_bias']) == 0)
  assert np.abs(np.asarray(grads['gate']['kernel'])).max() > 0
  assert np.abs(np.asarray(grads['shared_experts']['down_proj']['kernel'])).max() > 0


def test_balance_loss_is_invariant_to_token_order_within_a_row():
  """Sequences are (row, segment id) groups, not contiguous runs: the load-balanced
  context-parallel layout (a permutation of each row) must not change the statistic."""
  from kimi_vl_jax.model.moe import sequence_balance_loss
  rng = np.random.default_rng(0)
  B, T, E, K = 2, 12, 8, 2
  scores = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((B, T, E)), jnp.float32))
  topk = jnp.asarray(np.argsort(-np.asarray(scores), -1)[..., :K], jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], jnp.int32)
  perm = jnp.asarray(rng.permutation(T))
  a = sequence_balance_loss(scores, topk, seg)
  b = sequence_balance_loss(scores[:, perm], topk[:, perm], seg[:, perm])
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  # 3 sequences: each alone gives the same mean.
  per = [sequence_balance_loss(scores[r:r + 1], topk[r:r + 1], jnp.where(seg[r:r + 1] == s, 1, 0))
         for r, s in ((0, 1), (0, 2), (1, 1))]
  np.testing.assert_allclose(float(a), float(np.mean(per)), rtol=1e-6)
