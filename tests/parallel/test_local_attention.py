"""MoonViT's attention per device (parallel/local_attention.py) on 8 CPU devices: each device
runs only the flash blocks its own rows need; rows of padding cost nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model import attention, flash
from kimi_vl_jax.model.config import tiny
from kimi_vl_jax.parallel import local_attention
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels

B, P, N, H = 8, 64, 2, 8


def _mesh(**kw):
  c = mesh_lib.default_config()
  c.update(kw)
  return mesh_lib.make_mesh(c)


@pytest.fixture
def calls(monkeypatch):
  """Block pairs computed (forward and backward) times the rows each covers, counted while they
  run, on every device (`partitioned`: each device calls back with its own shard)."""
  seen = []
  real = flash._block_logits

  def counting(q, *args, **kw):
    jax.debug.callback(lambda q: seen.append(q.shape[0]), q[:, 0, 0, 0], partitioned=True)
    return real(q, *args, **kw)

  monkeypatch.setattr(flash, '_block_logits', counting)
  return seen


def _inputs():
  """Row 0: two images (20 + 12 patches) and padding; rows 1-7: text-only rows, all padding."""
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.normal(size=(B, P, N, H)), jnp.float32) for _ in range(3))
  seg = np.zeros((B, P), np.int32)
  seg[0, :20], seg[0, 20:32] = 1, 2
  return q, k, v, jnp.asarray(seg)


def test_each_device_runs_only_its_rows_blocks(calls):
  config = tiny().replace(attention_impl='flash', attention_block_q=16, attention_block_kv=16)
  mesh = _mesh(data=8)
  kernels = build_kernels(config, mesh, 'dp')
  assert isinstance(kernels.vision_attention, local_attention.LocalAttention)
  q, k, v, seg = _inputs()
  ref = attention.AttentionKernel()(q, k, v, seg, seg, causal=False, scale=0.3)   # dense

  def grads(kernel):
    def loss(q, k, v):
      return jnp.sum(jnp.sin(kernel(q, k, v, seg, seg, causal=False, scale=0.3)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  counts, results = [], []
  with rules_lib.sharding_context(mesh, 'dp'):
    shard = rules_lib.batch_sharding(mesh, 'dp')
    args = [jax.device_put(a, shard) for a in (q, k, v)]
    # XLA's sharding of the plain kernel vs the per-device one.
    for kernel in (kernels.attention, kernels.vision_attention):
      del calls[:]
      results.append(grads(kernel)(*args))
      jax.effects_barrier()
      counts.append(sum(calls))
    out = jax.jit(lambda *a: kernels.vision_attention(*a, seg, seg, causal=False,
                                                      scale=0.3))(*args)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Row 0 needs 2 x 2 block pairs (forward, then backward). Decided for the global batch, all 8
  # devices run them on their row; per device, only the one holding row 0.
  assert counts == [8 * 2 * 4, 2 * 4], counts


def test_rows_that_do_not_split_stay_whole_and_positions_pass_through():
  mesh = _mesh(data=8)
  kern = local_attention.LocalAttention(mesh, rules_lib.get_rules('dp'),
                                        attention.AttentionKernel('flash', 8, 8, per_row=True))
  q, k, v, seg = _inputs()
  q, k, v, seg = q[:3], k[:3], v[:3], seg[:3]           # 3 rows: not split over data=8
  assert local_attention.row_axes(mesh, rules_lib.get_rules('dp'), 3) == ()
  pos = jnp.arange(P)[None] * 2
  with rules_lib.sharding_context(mesh, 'dp'):
    got = jax.jit(lambda *a: kern(*a, seg, seg, causal=True, scale=0.3, q_positions=pos,
                                  kv_positions=pos))(q, k, v)
  ref = attention.AttentionKernel()(q, k, v, seg, seg, causal=True, scale=0.3, q_positions=pos,
                                    kv_positions=pos)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
