"""Expert-parallel routed experts (shard_map + all_to_all over 'expert') on 8 CPU devices."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model import moe
from kimi_vl_jax.model.config import tiny
from kimi_vl_jax.parallel import expert
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels

N, D, F, E, K = 64, 16, 12, 8, 2


def _mesh(**kw):
  c = mesh_lib.default_config()
  c.update(kw)
  return mesh_lib.make_mesh(c)


def _inputs(seed=0, skew=False):
  r = np.random.default_rng(seed)
  x = r.normal(size=(N, D)).astype(np.float32)
  logits = r.normal(size=(N, E)) + (np.arange(E) == 0) * 3.0 * skew   # skew: expert 0 popular
  idx = np.argsort(-logits, axis=1)[:, :K].astype(np.int32)
  w = r.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
  mask = r.uniform(size=N) > 0.2
  ws = [r.normal(size=s).astype(np.float32) * 0.3 for s in ((E, D, F), (E, D, F), (E, F, D))]
  return x, idx, w, mask, ws


def _ep(dispatch, mesh, rules, *args, **kw):
  """The expert-parallel routed experts by `dispatch` on `mesh`, jitted under `rules`."""
  fn = expert.ExpertParallel(mesh, rules_lib.get_rules(rules), dispatch)
  with rules_lib.sharding_context(mesh, rules):
    return jax.jit(lambda *a: fn(*a, **kw))(*args)


def _config(moe_impl):
  c = tiny()
  return c.replace(text=dataclasses.replace(c.text, moe_impl=moe_impl))


@pytest.mark.parametrize('preset, kw', [('dp_ep', dict(data=2, expert=4)),
                                         ('fsdp_ep', dict(data=4, expert=2))])
def test_ep_dropless_equals_single_device_dropless(preset, kw):
  x, idx, w, mask, ws = _inputs(skew=True)
  ref = moe.routed_experts_dropless(x, idx, w, *ws, token_mask=mask)
  got = _ep('dropless', _mesh(**kw), preset, x, idx, w, *ws,
            token_mask=mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got)[~mask]).max() == 0


def test_ep_dropless_gradients_match():
  x, idx, w, mask, ws = _inputs(1)
  mesh = _mesh(data=2, expert=4)

  def loss(fn, x, w, *ws):
    return jnp.sum(jnp.sin(fn(x, idx, w, *ws, token_mask=mask)))

  ref = jax.grad(lambda *a: loss(moe.routed_experts_dropless, *a), argnums=(0, 1, 2, 3, 4))(
      x, w, *ws)
  ep = build_kernels(_config('ep_dropless'), mesh, 'dp_ep').routed_experts
  assert isinstance(ep, expert.ExpertParallel)
  with rules_lib.sharding_context(mesh, 'dp_ep'):
    got = jax.jit(jax.grad(lambda *a: loss(ep, *a), argnums=(0, 1, 2, 3, 4)))(x, w, *ws)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_ep_capacity_is_dropless_with_room_and_drops_per_shard_in_token_order():
  x, idx, w, mask, ws = _inputs(2, skew=True)
  mesh = _mesh(data=2, expert=4)
  ref = moe.routed_experts_dropless(x, idx, w, *ws, token_mask=mask)
  roomy = _ep('capacity', mesh, 'dp_ep', x, idx, w, *ws,
              token_mask=mask, capacity_factor=float(E))
  np.testing.assert_allclose(np.asarray(roomy), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Tight capacity: each of the 8 token shards drops exactly what the single-device capacity
  # rule drops on its own 8 tokens.
  tight = _ep('capacity', mesh, 'dp_ep', x, idx, w, *ws,
              token_mask=mask, capacity_factor=1.0)
  per_shard = np.concatenate([
      np.asarray(moe.routed_experts_capacity(x[s:s + 8], idx[s:s + 8], w[s:s + 8],
                                             *ws, token_mask=mask[s:s + 8], capacity_factor=1.0))
      for s in range(0, N, 8)])
  np.testing.assert_allclose(np.asarray(tight), per_shard, rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(tight), np.asarray(ref), atol=1e-3)   # something dropped


def test_without_a_mesh_falls_back_and_bad_splits_are_refused():
  x, idx, w, mask, ws = _inputs(3)
  for mesh in (None, _mesh(data=8)):   # no mesh, or an expert axis of size 1
    fallback = build_kernels(_config('ep_dropless'), mesh, 'dp_ep').routed_experts
    np.testing.assert_allclose(
        np.asarray(fallback(x, idx, w, *ws, token_mask=mask)),
        np.asarray(moe.routed_experts_dropless(x, idx, w, *ws, token_mask=mask)), rtol=1e-6)
  with pytest.raises(ValueError, match='6 experts cannot be split over the expert axis of size 4'):
    _ep('dropless', _mesh(data=2, expert=4), 'dp_ep', x, idx % 6, w,
        *[a[:6] for a in ws], token_mask=mask)


def test_moe_layer_selects_the_expert_parallel_impl_by_config():
  config = _config('ep_dropless')
  t = config.text
  mesh = _mesh(data=2, expert=4)
  layer = moe.MoE(t, kernels=build_kernels(config, mesh, 'dp_ep'))
  assert isinstance(layer.kernels.routed_experts, expert.ExpertParallel)
  r = np.random.default_rng(4)
  x = jnp.asarray(r.normal(size=(4, 8, t.hidden_size)).astype(np.float32))
  seg = jnp.asarray(np.array([[1] * 6 + [0] * 2] * 4, np.int32))
  params = moe.MoE(t).init(jax.random.key(0), x, seg)   # same tree, no mesh needed
  ref, _ = moe.MoE(dataclasses.replace(t, moe_impl='dropless')).apply(params, x, seg)
  with rules_lib.sharding_context(mesh, 'dp_ep'):
    got, aux = jax.jit(layer.apply)(params, x, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_ep_ragged_bookkeeping_with_the_emulated_exchange():
  x, idx, w, mask, ws = _inputs(5, skew=True)
  ref = moe.routed_experts_dropless(x, idx, w, *ws, token_mask=mask)
  got = _ep('ragged_emulated', _mesh(data=2, expert=4), 'dp_ep', x, idx, w,
            *ws, token_mask=mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_ep_ragged_compiles_for_tpu_with_ragged_all_to_all():
  pytest.importorskip('libtpu')
  import os
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from kimi_vl_jax import aot
  devices = aot.topology_devices(aot.topology('v5e-8'))
  c = mesh_lib.default_config()
  c.expert = 4
  mesh = mesh_lib.make_mesh(c, devices=devices)
  x, idx, w, mask, ws = _inputs(6)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, idx, w, *ws, mask)]
  ep = build_kernels(_config('ep_ragged'), mesh, 'dp_ep').routed_experts
  assert ep == expert.ExpertParallel(mesh, rules_lib.get_rules('dp_ep'), 'ragged')
  with rules_lib.sharding_context(mesh, 'dp_ep'):
    lowered = jax.jit(lambda x, i, w, a, b, c, m: ep(x, i, w, a, b, c, token_mask=m)).lower(*args)
    compiled = lowered.compile()
  assert 'ragged-all-to-all' in compiled.as_text()


# --------------------------------------------------------------------------------------------
# No wasted work: expert weights stay split, empty rows are not multiplied, un-permuting gathers.

def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in m.group(1).split(',') if d)
          for m in re.finditer(r'= \w+\[([\d,]*)\]\S* all-gather\(', hlo)]


def test_dropless_on_an_expert_axis_never_all_gathers_expert_weights():
  """moe_impl='dropless' (the default) on data 2 x expert 4: the MoE layer's forward and backward
  run expert-parallel; no all-gather produces an expert weight ([., D, F] / [., F, D])."""
  config = _config('dropless')
  t = config.text
  mesh = _mesh(data=2, expert=4)
  kernels = build_kernels(config, mesh, 'dp_ep')
  r = np.random.default_rng(7)
  x = jnp.asarray(r.normal(size=(8, 8, t.hidden_size)).astype(np.float32))
  seg = jnp.asarray(np.array([[1] * 6 + [0] * 2] * 8, np.int32))
  params = moe.MoE(t).init(jax.random.key(0), x, seg)
  ref_fn = moe.MoE(t).apply
  loss = lambda apply: lambda p, x: jnp.sum(jnp.sin(apply(p, x, seg)[0]))  # noqa: E731
  ref = jax.grad(loss(ref_fn))(params, x)
  with rules_lib.sharding_context(mesh, 'dp_ep'):
    fn = jax.jit(jax.grad(loss(moe.MoE(t, kernels=kernels).apply)))
    got = fn(params, x)
    hlo = fn.lower(params, x).compile().as_text()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, ref)
  D, F = t.hidden_size, t.moe_intermediate_size
  weight_like = [s for s in _all_gather_shapes(hlo) if s[-2:] in ((D, F), (F, D))]
  assert not weight_like, weight_like
  assert 'all-to-all' in hlo
  assert kernels.routed_experts == expert.ExpertParallel(mesh, rules_lib.get_rules('dp_ep'),
                                                         'dropless')   # CPU: no ragged a2a


@pytest.mark.parametrize('dispatch', ['dropless', 'ragged_emulated'])
def test_empty_receive_rows_are_not_multiplied(dispatch, monkeypatch):
  """The grouped matmuls' group sizes cover the real assignments only: summed over the 8
  devices, exactly the unmasked (token, expert) pairs, not the ep x worst-case buffers."""
  seen = []
  real = moe.swiglu_grouped

  def counting(xs, w_gate, w_up, w_down, group_sizes):
    assert group_sizes.shape == (w_gate.shape[0],)      # one group per local expert, no dummy
    jax.debug.callback(lambda s, m: seen.append((int(s), int(m))), group_sizes.sum(),
                       xs.shape[0])
    return real(xs, w_gate, w_up, w_down, group_sizes)

  monkeypatch.setattr(moe, 'swiglu_grouped', counting)
  x, idx, w, mask, ws = _inputs(8, skew=True)
  ref = moe.routed_experts_dropless(x, idx, w, *ws, token_mask=mask)
  got = _ep(dispatch, _mesh(data=2, expert=4), 'dp_ep', x, idx, w, *ws, token_mask=mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert len(seen) == 8
  assert sum(s for s, _ in seen) == int(mask.sum()) * K
  assert sum(m for _, m in seen) == 8 * 4 * (N // 8) * K    # the buffers: ep x worst case


def test_permute_rows_gathers_both_ways():
  r = np.random.default_rng(9)
  x = jnp.asarray(r.normal(size=(12, 5)).astype(np.float32))
  perm = jnp.asarray(r.permutation(12).astype(np.int32))
  inv = moe.inverse_permutation(perm)
  np.testing.assert_array_equal(np.asarray(perm)[np.asarray(inv)], np.arange(12))
  np.testing.assert_array_equal(moe.permute_rows(x, perm, inv), np.asarray(x)[np.asarray(perm)])
  g = jax.grad(lambda x: jnp.sum(jnp.sin(moe.permute_rows(x, perm, inv))))(x)
  np.testing.assert_allclose(g, jnp.cos(x), rtol=1e-6)
  # The dropless MoE's forward and backward: the only scatters left are integer bookkeeping
  # (expert counts, the inverse permutation), none moves rows of activations.
  x, idx, w, mask, ws = _inputs(0)
  grad = jax.grad(lambda x, *ws: jnp.sum(moe.routed_experts_dropless(x, idx, w, *ws)),
                  argnums=(0, 1, 2, 3))
  eqns = re.findall(r'(\w+):(\w+)\[[\d,]*\] = (scatter[\w-]*)', str(jax.make_jaxpr(grad)(x, *ws)))
  assert eqns and all(dtype.startswith(('i', 'u')) for _, dtype, _ in eqns), eqns


_TPU_SCRIPT = r'''
import dataclasses, re
import flax.linen as nn
import jax, jax.numpy as jnp
from kimi_vl_jax import aot
from kimi_vl_jax.model import moe
from kimi_vl_jax.model.config import tiny
from kimi_vl_jax.parallel import mesh as mesh_lib, rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels

c = mesh_lib.default_config()
c.data, c.expert = 2, 4
mesh = mesh_lib.make_mesh(c, devices=aot.topology_devices(aot.topology('v5e-8')))
t = dataclasses.replace(tiny().text, moe_impl='dropless')
kernels = build_kernels(tiny().replace(text=t), mesh, 'dp_ep')
B, T = 8, 64
boxed = jax.eval_shape(lambda: moe.MoE(t).init(jax.random.key(0), jnp.zeros((B, T, t.hidden_size)),
                                                 jnp.ones((B, T), jnp.int32)))['params']
params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), rules_lib.param_shardings(boxed, mesh, 'dp_ep'))
rows = rules_lib.batch_sharding(mesh, 'dp_ep')
x = jax.ShapeDtypeStruct((B, T, t.hidden_size), jnp.float32, sharding=rows)
seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows)
layer = moe.MoE(t, kernels=kernels)
loss = lambda p, x, s: jnp.sum(jnp.sin(layer.apply({'params': p}, x, s)[0]))
with rules_lib.sharding_context(mesh, 'dp_ep'):
  hlo = jax.jit(jax.grad(loss)).lower(params, x, seg).compile().as_text()
D, F = t.hidden_size, t.moe_intermediate_size
gathers = [m.group(1) for m in re.finditer(r'= \w+\[([\d,]*)\]\S* all-gather\(', hlo)]
print('WEIGHT_GATHERS', [g for g in gathers if g.endswith((f',{D},{F}', f',{F},{D}'))])
print('RAGGED', 'ragged-all-to-all' in hlo)
'''


def test_dropless_on_tpu_runs_ragged_and_never_all_gathers_expert_weights():
  """Compiled for a v5e-8 (data 2 x expert 4) ahead of time, in a subprocess (libtpu): the
  default moe_impl='dropless' becomes the 'ragged' dispatch; no all-gather of expert weights
  (XLA's propagation of the grouped matmul all-gathers [E, D, F] over 'expert' in every layer)."""
  pytest.importorskip('libtpu')
  import os
  import subprocess
  import sys
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD='1', JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _TPU_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'WEIGHT_GATHERS []' in out.stdout, out.stdout
  assert 'RAGGED True' in out.stdout, out.stdout
