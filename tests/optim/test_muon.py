"""Moonlight Muon + AdamW (kimi_vl_jax/optim/muon.py) against a plain numpy version of the update.

The numpy reference below is written from the Moonlight Muon update (Kimi-VL report section 2.2; docs/recipe.md) with each tensor's matrix view
given explicitly (not computed by the code under test).
"""

import functools
import math
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.optim import muon

sys.path.insert(0, os.path.dirname(__file__))
from param_tree_shapes import doc_abstract_params, real_abstract_params  # noqa: E402

COEFFS = (3.4445, -4.7750, 2.0315)
LR_PEAK, WD = 0.02, 0.1

# path -> (shape, logical axes, group, matrix view (n, rows, cols) for Muon)
SPEC = {
    'language_model/embed_tokens/embedding': ((32, 16), ('vocab', 'embed'), 'adamw', None),
    'language_model/lm_head/kernel': ((16, 32), ('embed', 'vocab'), 'adamw', None),
    'language_model/norm/scale': ((16,), ('norm',), 'adamw', None),
    'language_model/moe_layers/input_layernorm/scale': ((2, 16), ('layers', 'norm'), 'adamw', None),
    'language_model/moe_layers/self_attn/q_proj/kernel':  # stacked per-head, rows > cols
        ((2, 16, 2, 6), ('layers', 'embed', 'heads', 'kv'), 'muon', (2, 16, 12)),
    'language_model/moe_layers/self_attn/o_proj/kernel':
        ((2, 2, 6, 16), ('layers', 'heads', 'kv', 'embed'), 'muon', (2, 12, 16)),
    'language_model/moe_layers/mlp/gate/kernel':  # router: the expert axis is the output here
        ((2, 16, 4), ('layers', 'embed', 'expert'), 'muon', (2, 16, 4)),
    'language_model/moe_layers/mlp/gate/e_score_correction_bias':
        ((2, 4), ('layers', 'expert'), 'frozen', None),
    'language_model/moe_layers/mlp/experts/gate_proj':
        ((2, 4, 16, 8), ('layers', 'expert', 'embed', 'expert_mlp'), 'muon', (8, 16, 8)),
    'extra/experts/up_proj':  # a 3-D [E, in, out] expert tensor
        ((4, 8, 16), ('expert', 'embed', 'expert_mlp'), 'muon', (4, 8, 16)),
    'extra/q_proj/kernel': ((16, 2, 4), ('embed', 'heads', 'kv'), 'muon', (1, 16, 8)),
    'extra/tall/kernel': ((20, 12), ('embed', 'mlp'), 'muon', (1, 20, 12)),
    'vision_tower/blocks/wqkv/kernel': ((1, 8, 3, 2, 4),
                                        ('layers', 'vit_embed', 'vit_qkv', 'vit_heads', 'vit_kv'),
                                        'muon', (1, 8, 24)),
    'vision_tower/blocks/wqkv/bias': ((1, 3, 2, 4), ('layers', 'vit_qkv', 'vit_heads', 'vit_kv'),
                                      'adamw', None),
    'vision_tower/blocks/wo/kernel': ((1, 2, 4, 8), ('layers', 'vit_heads', 'vit_kv', 'vit_embed'),
                                      'muon', (1, 8, 8)),
    'vision_tower/pos_emb': ((4, 4, 8), (None, None, 'vit_embed'), 'adamw', None),
}


def _nest(flat):
  out = {}
  for path, v in flat.items():
    d = out
    *head, last = path.split('/')
    for k in head:
      d = d.setdefault(k, {})
    d[last] = v
  return out


def _flat(tree):
  return {muon.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _boxed_abstract():
  return _nest({p: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(s, jnp.float32), a)
                for p, (s, a, _, _) in SPEC.items()})


def _random_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return _nest({p: (scale * rng.standard_normal(s)).astype(np.float32)
                for p, (s, _, _, _) in SPEC.items()})


def _cfg(**kw):
  c = ml_collections.ConfigDict()
  c.schedule = ml_collections.ConfigDict(dict(kind='warmup_linear', peak_lr=LR_PEAK,
                                              total_steps=10, warmup_steps=2, init_lr=0.005))
  c.weight_decay = WD
  for k, v in kw.items():
    c[k] = v
  return c


def _lr(step):  # the schedule of _cfg(), written out
  return 0.005 + (LR_PEAK - 0.005) * step / 2 if step < 2 else LR_PEAK * (1 - (step - 2) / 8)


# --------------------------------------------------------------------------------------------
# numpy reference (float64).

def np_newton_schulz(x, steps=5, eps=1e-7):
  a, b, c = COEFFS
  transpose = x.shape[0] > x.shape[1]
  if transpose:
    x = x.T
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return x.T if transpose else x


def np_reference(params, grads_seq, beta=0.95, b1=0.9, b2=0.95, eps=1e-8):
  """Runs the Moonlight Muon / AdamW update over the sequence of gradient trees."""
  W = {p: v.astype(np.float64) for p, v in _flat(params).items()}
  M = {p: np.zeros_like(v) for p, v in W.items()}
  V = {p: np.zeros_like(v) for p, v in W.items()}
  for t, grads in enumerate(grads_seq):
    lr = _lr(t)
    for p, g in _flat(grads).items():
      g = g.astype(np.float64)
      group, view = SPEC[p][2], SPEC[p][3]
      if group == 'frozen':
        continue
      if group == 'muon':
        M[p] = beta * M[p] + g
        u = (g + beta * M[p]).reshape(view)   # the matrix view: batch, rows, cols
        o = np.stack([np_newton_schulz(m) for m in u]) * 0.2 * math.sqrt(max(view[1:]))
        W[p] = W[p] - lr * (o.reshape(W[p].shape) + WD * W[p])
      else:
        M[p] = b1 * M[p] + (1 - b1) * g
        V[p] = b2 * V[p] + (1 - b2) * g * g
        mh, vh = M[p] / (1 - b1 ** (t + 1)), V[p] / (1 - b2 ** (t + 1))
        W[p] = W[p] - lr * (mh / (np.sqrt(vh) + eps) + WD * W[p])
  return W


_STEPS = {}


@functools.lru_cache(maxsize=None)
def _default_tx():
  return muon.make_optimizer(_cfg(), _boxed_abstract())


def _run(tx, params, grads_seq):
  state = tx.init(params)
  if id(tx) not in _STEPS:  # one compilation per optimizer
    _STEPS[id(tx)] = (tx, jax.jit(lambda g, s, p: tx.update(g, s, p)))
  step = _STEPS[id(tx)][1]
  for grads in grads_seq:
    updates, state = step(grads, state, params)
    params = jax.tree.map(lambda w, u: w + u, params, updates)
  return params, state


# --------------------------------------------------------------------------------------------

def test_grouping_of_the_test_tree():
  groups = _flat(muon.muon_param_groups(_boxed_abstract()))
  for p, (shape, _, kind, view) in SPEC.items():
    assert groups[p].kind == kind, p
    if kind == 'muon':
      assert groups[p].matrix_shape == view, p


def test_siglip_text_tower_embeddings_use_adamw():
  from kimi_vl_jax.model import siglip_text
  model = siglip_text.SiglipTextTower(config_lib.siglip_tiny_text())
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  groups = _flat(muon.muon_param_groups(boxed['params']))
  assert groups['token_embedding'].kind == 'adamw'
  assert groups['position_embedding'].kind == 'adamw'
  assert groups['layers/wqkv/kernel'].kind == 'muon'
  assert groups['layers/wqkv/kernel'].matrix_shape == (2, 32, 96)   # L matrices [D, 3 N H]
  assert groups['layers/wo/kernel'].matrix_shape == (2, 32, 32)
  assert groups['head/kernel'].kind == 'muon'


def test_newton_schulz_matches_numpy_and_optax():
  x = np.random.default_rng(0).standard_normal((3, 20, 12)).astype(np.float32)
  got = np.asarray(muon.newton_schulz(jnp.asarray(x)))
  want = np.stack([np_newton_schulz(m.astype(np.float64)) for m in x])
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Roughly orthogonal: singular values in the band the quintic iteration is designed for.
  s = np.linalg.svd(got[0], compute_uv=False)
  assert 0.5 < s.min() and s.max() < 1.3, s
  try:  # optax's private copy of the same iteration (same coefficients, Frobenius pre-scaling)
    from optax.contrib._muon import orthogonalize_via_newton_schulz
  except ImportError:
    return
  ref = orthogonalize_via_newton_schulz(jnp.asarray(x[0]), jnp.asarray(COEFFS), 5, eps=1e-7)
  np.testing.assert_allclose(got[0], np.asarray(ref), atol=2e-5)


def test_update_matches_numpy_over_several_steps():
  params = _random_tree(1, 0.1)
  grads_seq = [_random_tree(10 + i) for i in range(4)]
  tx, summary = _default_tx()
  got, _ = _run(tx, params, grads_seq)
  want = np_reference(params, grads_seq)
  p0 = _flat(params)
  for p, w in _flat(got).items():
    delta, want_delta = np.asarray(w) - p0[p], want[p] - p0[p]
    if SPEC[p][2] == 'frozen':
      assert np.all(delta == 0), p
      continue
    assert np.abs(want_delta).max() > 1e-3, p  # the update is not trivially small
    np.testing.assert_allclose(delta, want_delta, rtol=1e-4, atol=1e-6, err_msg=p)
  assert 'muon' in summary and 'frozen' in summary


def test_optax_contrib_momentum_is_not_moonlights():
  """Why optax.contrib.muon is not used: its bias-corrected EMA momentum points elsewhere."""
  import optax
  params = _nest({'w': np.zeros((8, 4), np.float32)})
  g1 = _nest({'w': np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)})
  g2 = _nest({'w': np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)})
  ref = optax.contrib.scale_by_muon(
      eps=1e-7, weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers(0, 1)})
  mine = muon.moonlight_muon(1.0, {'w': muon.ParamGroup(
      'muon', 'matrix', (8, 4), optax.contrib.MuonDimensionNumbers(0, 1))}, weight_decay=0.0,
      rms_scale=1 / math.sqrt(8))  # cancels the sqrt(max(rows, cols)) factor
  s_ref, s_mine = ref.init(params), mine.init(params)
  for g in (g1, g2):
    u_ref, s_ref = ref.update(g, s_ref)
    u_mine, s_mine = mine.update(g, s_mine, params)
  # Same iteration, different input direction on step 2 (mine = -NS(G2 + 0.95 (0.95 G1 + G2))).
  m = 0.95 * g1['w'] + g2['w']
  np.testing.assert_allclose(-np.asarray(u_mine['w']),
                             np_newton_schulz((g2['w'] + 0.95 * m).astype(np.float64)), atol=2e-5)
  assert np.abs(np.asarray(u_ref['w']) + np.asarray(u_mine['w'])).max() > 1e-3


def test_frozen_mask_zero_update_no_state_and_clip_excludes_frozen():
  params = _random_tree(2, 0.1)
  grads = _random_tree(3)
  abstract = _boxed_abstract()
  cfg = _cfg(trainable=('^vision_tower/', '^extra/'), grad_clip_norm=1.0)
  tx, summary = muon.make_optimizer(cfg, abstract)
  state = tx.init(params)
  (got, _), p0 = _run(tx, params, [grads]), _flat(params)
  trainable = lambda p: p.startswith(('vision_tower/', 'extra/'))
  for p, w in _flat(got).items():
    moved = np.any(np.asarray(w) != p0[p])
    assert moved == trainable(p), p
  # Optimizer state only for trainable leaves: Muon 1 buffer, AdamW 2 buffers (plus counts).
  want = sum(math.prod(s) * (1 if k == 'muon' else 2)
             for p, (s, _, k, _) in SPEC.items() if trainable(p) and k != 'frozen')
  have = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert have == want
  # Huge frozen gradients must not shrink the trainable update through the global-norm clip.
  big = jax.tree_util.tree_map_with_path(
      lambda path, g: g * (1.0 if trainable(muon.path_str(path)) else 1e6), grads)
  got_big, _ = _run(tx, params, [big])
  jax.tree.map(np.testing.assert_array_equal, got, got_big)
  # The same freezing from a pytree of bools.
  mask = _nest({p: trainable(p) for p in SPEC})
  tx2, summary2 = muon.make_optimizer(_cfg(), abstract, trainable_mask=mask)
  assert summary2.splitlines()[:-1] == muon.make_optimizer(
      _cfg(trainable=('^vision_tower/', '^extra/')), abstract)[1].splitlines()[:-1]


def test_a3b_grouping_table():
  cfg = config_lib.kimi_vl_a3b()
  trees = {'doc': doc_abstract_params(cfg)}
  real = real_abstract_params(cfg)
  if real is not None:
    trees['model'] = real
  if real is not None:  # the model follows docs/param_tree.md: same paths, groups, matrix views
    as_tuple = lambda t: {k: (g.shape, g.kind, g.dim_nums)
                          for k, g in _flat(muon.muon_param_groups(t)).items()}
    assert as_tuple(real) == as_tuple(trees['doc'])
  for name, tree in trees.items():
    groups = _flat(muon.muon_param_groups(tree))
    view = lambda p: groups[p].matrix_shape
    lm, vt = 'language_model/', 'vision_tower/blocks/'
    assert view(lm + 'moe_layers/self_attn/q_proj/kernel') == (26, 2048, 16 * 192), name
    assert view(lm + 'moe_layers/self_attn/kv_b_proj/kernel') == (26, 512, 16 * 256), name
    assert view(lm + 'moe_layers/self_attn/o_proj/kernel') == (26, 16 * 128, 2048), name
    assert view(lm + 'moe_layers/mlp/experts/gate_proj') == (26 * 64, 2048, 1408), name
    assert view(lm + 'moe_layers/mlp/experts/down_proj') == (26 * 64, 1408, 2048), name
    assert view(lm + 'moe_layers/mlp/gate/kernel') == (26, 2048, 64), name
    assert view(lm + 'dense_layers/mlp/up_proj/kernel') == (1, 2048, 11264), name
    assert view(vt + 'wqkv/kernel') == (27, 1152, 3 * 16 * 72), name
    assert view(vt + 'wo/kernel') == (27, 16 * 72, 1152), name
    assert view('vision_tower/patch_embed/kernel') == (1, 588, 1152), name
    assert view('projector/linear_2/kernel') == (1, 4608, 2048), name
    for p in (lm + 'embed_tokens/embedding', lm + 'lm_head/kernel', lm + 'norm/scale',
              lm + 'moe_layers/input_layernorm/scale',
              lm + 'moe_layers/self_attn/kv_a_layernorm/scale', vt + 'wqkv/bias',
              vt + 'norm0/scale', 'vision_tower/pos_emb', 'projector/linear_1/bias'):
      assert groups[p].kind == 'adamw', (name, p)
    assert groups[lm + 'moe_layers/mlp/gate/e_score_correction_bias'].kind == 'frozen', name
    total = sum(math.prod(g.shape) for g in groups.values())
    muon_n = sum(math.prod(g.shape) for g in groups.values() if g.kind == 'muon')
    assert 16.0e9 < total < 16.8e9 and 15.0e9 < muon_n < total - 0.6e9, (name, total, muon_n)
    summary = muon.groups_summary(muon.muon_param_groups(tree))
    lines = summary.splitlines()
    assert [l.split(':')[0].strip() for l in lines if l.startswith('  ') and ':' in l] == [
        'muon', 'adamw', 'frozen']
    assert '1664 x [2048, 1408]' in summary  # examples start with the largest tensors


def test_tiny_model_update_rms_matches_adamw_scale():
  """On the real tiny model tree: Muon's update RMS is ~0.2 lr per matrix (the point of
  Moonlight's 0.2 sqrt(max(rows, cols)) scale), AdamW's first step is ~lr per entry, and the
  router bias does not move."""
  boxed = real_abstract_params(config_lib.tiny())
  if boxed is None:
    pytest.skip('model modules not importable yet')
  rng = np.random.default_rng(0)
  plain = nn.meta.unbox(boxed)
  params = jax.tree.map(lambda x: 0.02 * rng.standard_normal(x.shape).astype(np.float32), plain)
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), plain)
  cfg = _cfg(weight_decay=0.0, schedule=ml_collections.ConfigDict({'kind': 'constant',
                                                                    'peak_lr': 1.0}))
  tx, _ = muon.make_optimizer(cfg, boxed)
  updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  groups = _flat(muon.muon_param_groups(boxed))
  kinds = set()
  for path, u in _flat(updates).items():
    g, u = groups[path], np.asarray(u)
    kinds.add(g.kind)
    if g.kind == 'frozen':
      assert np.all(u == 0), path
    elif g.kind == 'adamw':
      np.testing.assert_allclose(np.abs(u), 1.0, rtol=1e-2, err_msg=path)  # eps 1e-8
    else:
      n, rows, cols = g.matrix_shape
      rms = np.sqrt(np.mean(np.square(u.reshape(n, rows, cols)), axis=(1, 2)))
      assert np.all((0.12 < rms) & (rms < 0.25)), (path, rms)
  assert kinds == {'muon', 'adamw', 'frozen'}


def test_bad_inputs_name_the_problem():
  plain = jax.tree.map(lambda x: x.value, _boxed_abstract(),
                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
  with pytest.raises(ValueError, match='no logical axis names'):
    muon.muon_param_groups(plain)
  with pytest.raises(ValueError, match='unknown config field optim.muon.momentum'):
    muon.make_optimizer(_cfg(muon=ml_collections.ConfigDict({'momentum': 0.9})), _boxed_abstract())
  with pytest.raises(ValueError, match='logical axes'):
    axes = _nest({p: a for p, (_, a, _, _) in SPEC.items()})
    axes['extra']['tall']['kernel'] = ('embed',)
    muon.muon_param_groups(plain, axes)
  # Plain params + a separate logical-axes tree (e.g. nn.get_partition_spec) is fine.
  axes = nn.get_partition_spec(_boxed_abstract())
  assert _flat(muon.muon_param_groups(plain, axes)).keys() == SPEC.keys()


@functools.lru_cache(maxsize=None)
def _unsharded_reference():
  params = _random_tree(4, 0.1)
  grads_seq = [_random_tree(20 + i) for i in range(2)]
  tx, _ = _default_tx()
  return tx, params, grads_seq, _run(tx, params, grads_seq)[0]


@pytest.mark.parametrize('axis_type, zero1', [('auto', True), ('explicit', False)])
def test_sharded_equals_unsharded(axis_type, zero1):
  """Params FSDP+EP-sharded over 8 CPU devices, optimizer state like the params (and over 'data'
  on top with ZeRO-1), via parallel/rules.py: the same update as unsharded."""
  from kimi_vl_jax.parallel import mesh as mesh_lib, rules
  tx, params, grads_seq, want = _unsharded_reference()
  types = {'auto': jax.sharding.AxisType.Auto, 'explicit': jax.sharding.AxisType.Explicit}
  mesh = jax.make_mesh((4, 2, 1, 1), mesh_lib.AXES, axis_types=(types[axis_type],) * 4)
  boxed = _boxed_abstract()
  param_sh = rules.param_shardings(boxed, mesh, 'fsdp_ep')
  abstract_state = jax.eval_shape(tx.init, params)
  state_sh = rules.opt_state_shardings(abstract_state, boxed, mesh, 'fsdp_ep', zero1=zero1)
  init = jax.jit(tx.init, out_shardings=state_sh)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p), in_shardings=(param_sh, state_sh, param_sh),
                 out_shardings=(param_sh, state_sh))
  with rules.sharding_context(mesh, 'fsdp_ep'):  # as the trainer traces its step
    p = jax.device_put(params, param_sh)
    state = init(p)
    for g in grads_seq:
      u, state = step(jax.device_put(g, param_sh), state, p)
      p = jax.tree.map(lambda w, d: w + d, p, u)
  for path, w in _flat(p).items():
    np.testing.assert_allclose(np.asarray(w), np.asarray(_flat(want)[path]), rtol=1e-5,
                               atol=1e-6, err_msg=path)
  # The experts' momentum is sharded like the parameter (experts over 'expert', a matrix axis over
  # 'data'), so Newton-Schulz has to gather the matrix axis.
  flat_state = [(muon.path_str(k), x) for k, x in jax.tree_util.tree_flatten_with_path(state)[0]]
  mom = [x for k, x in flat_state if k.endswith('experts/gate_proj')]
  assert len(mom) == 1 and mom[0].sharding.spec == P(None, 'expert', 'data'), mom[0].sharding
  # ZeRO-1 splits even the replicated 1-D norm's Adam moments over 'data'.
  norm = [x for k, x in flat_state if k.endswith('language_model/norm/scale')]
  assert len(norm) == 2 and all(x.sharding.spec == (P('data') if zero1 else P()) for x in norm)


# --------------------------------------------------------------------------------------------
# Stacked, mesh-sharded Newton-Schulz (the default) against the per-leaf form.

def _ns_updates(stack, dtype='float32', tree=None):
  """One `scale_by_newton_schulz` on the Muon leaves of the test tree (random updates)."""
  groups = muon.muon_param_groups(tree if tree is not None else _boxed_abstract())
  muon_paths = [p for p, g in _flat(groups).items() if g.kind == 'muon']
  updates = {p: v for p, v in _flat(_random_tree(7)).items() if p in muon_paths}
  nested_groups = _nest({p: _flat(groups)[p] for p in muon_paths})
  tx = muon.scale_by_newton_schulz(nested_groups, COEFFS, 5, 1e-7, 0.2, dtype=dtype, stack=stack)
  out, _ = jax.jit(lambda u: tx.update(u, tx.init(u)))(_nest(updates))
  return _flat(out)


def test_stacked_newton_schulz_equals_per_leaf():
  per_leaf, stacked = _ns_updates(False), _ns_updates(True)
  assert len(per_leaf) == 9 and per_leaf.keys() == stacked.keys()
  for p in per_leaf:
    np.testing.assert_allclose(stacked[p], per_leaf[p], rtol=1e-6, atol=1e-6, err_msg=p)
  # bf16 iteration (Moonlight's): the same both ways, close to fp32 but not equal to it.
  bf_leaf, bf_stack = _ns_updates(False, 'bfloat16'), _ns_updates(True, 'bfloat16')
  worst = 0.0
  for p in per_leaf:
    assert bf_stack[p].dtype == np.float32, p
    np.testing.assert_allclose(bf_stack[p], bf_leaf[p], rtol=1e-2, atol=1e-3, err_msg=p)
    rel = np.linalg.norm(bf_stack[p] - per_leaf[p]) / np.linalg.norm(per_leaf[p])
    worst = max(worst, rel)
  assert 1e-4 < worst < 0.1, worst    # relative Frobenius distance to the fp32 iteration
  with pytest.raises(ValueError, match='ns_dtype'):
    muon.make_optimizer(_cfg(muon=ml_collections.ConfigDict({'ns_dtype': 'float16'})),
                        _boxed_abstract())


# A tree whose every leaf has a multiple of 8 matrices, in three shapes [12, 16], [8, 16],
# [24, 32] (oriented rows <= cols), the first two with two leaves each.
NS_SPEC = {
    'lm/layers/q_proj/kernel': ((8, 16, 2, 6), ('layers', 'embed', 'heads', 'kv')),
    'lm/layers/o_proj/kernel': ((8, 2, 6, 16), ('layers', 'heads', 'kv', 'embed')),
    'lm/layers/experts/gate_proj': ((2, 4, 16, 8), ('layers', 'expert', 'embed', 'expert_mlp')),
    'lm/layers/experts/down_proj': ((2, 4, 8, 16), ('layers', 'expert', 'expert_mlp', 'embed')),
    'x/w': ((16, 32, 24), ('layers', 'embed', 'mlp')),
}


def _dot_flops(hlo: str) -> tuple[int, float]:
  """(number of dots, their FLOPs) in a compiled (per-device) HLO text: 2 x output elements x
  contracted size per dot, operand shapes looked up by instruction name."""
  shapes = {name: [int(d) for d in dims.split(',') if d] for name, dims in
            re.findall(r'%([\w.\-]+) = f32\[([\d,]*)\]', hlo)}
  n, flops = 0, 0.0
  for out, lhs, contract in re.findall(
      r'= f32\[([\d,]*)\]\S* dot\((?:f32\[[\d,]*\]\S* )?%([\w.\-]+),.*?lhs_contracting_dims=\{([\d,]*)\}',
      hlo):
    out_n = math.prod(int(d) for d in out.split(',') if d)
    k = math.prod(shapes[lhs][int(c)] for c in contract.split(','))
    n, flops = n + 1, flops + 2.0 * out_n * k
  return n, flops


def test_sharded_newton_schulz_flops_per_device():
  """8 CPU devices, updates sharded like FSDP+EP parameters: each device runs 1/8 of the
  Newton-Schulz FLOPs, in a rolled loop with three dots per matrix shape; the per-leaf form runs
  each matrix whole on every device holding part of it (so this test fails without the
  stacking)."""
  from kimi_vl_jax.parallel import mesh as mesh_lib, rules
  steps = 5
  boxed = _nest({p: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(s, jnp.float32), a)
                 for p, (s, a) in NS_SPEC.items()})
  groups = muon.muon_param_groups(boxed)
  total = 0.0
  for g in jax.tree.leaves(groups):
    n, rows, cols = g.matrix_shape
    m, k = min(rows, cols), max(rows, cols)
    total += n * steps * (4 * m * m * k + 2 * m ** 3)
  rng = np.random.default_rng(0)
  updates = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                         nn.meta.unbox(boxed))
  mesh = jax.make_mesh((4, 2, 1, 1), mesh_lib.AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  sh = rules.param_shardings(boxed, mesh, 'fsdp_ep')
  got = {}
  for stack in (True, False):
    tx = muon.scale_by_newton_schulz(groups, COEFFS, steps, 1e-7, 0.2, stack=stack)
    fn = jax.jit(lambda u: tx.update(u, tx.init(u))[0], in_shardings=(sh,), out_shardings=sh)
    with rules.sharding_context(mesh, 'fsdp_ep'):
      compiled = fn.lower(updates).compile()
      got[stack] = (_dot_flops(compiled.as_text()),
                    _flat(compiled(jax.device_put(updates, sh))))
    assert f'"known_trip_count":{{"n":"{steps}"}}' in compiled.as_text()
  (n_dots, flops), out = got[True]
  assert n_dots <= 3 * 3, n_dots                          # one rolled loop per shape
  np.testing.assert_allclose(flops * steps, total / 8, rtol=0.02)
  (n_old, flops_old), out_old = got[False]
  # Per leaf, only the expert axis splits the matrices (4 of the 9.5 MFLOP per device here).
  assert flops_old * steps > total / 4, (flops_old * steps, total)
  for p in out:
    np.testing.assert_allclose(out[p], out_old[p], rtol=1e-5, atol=1e-6, err_msg=p)
