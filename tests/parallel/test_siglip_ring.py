"""The SigLIP loss as a bidirectional ring over the batch axes (parallel/siglip_ring.py) on CPU
devices: loss and every gradient equal the single-device loss, for even and odd rings and a ring
over two mesh axes, and no compiled buffer has the global batch as a dimension."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_vl_jax.model import siglip_loss
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import siglip_ring

B, D = 120, 16            # 120 splits over rings of 2, 3, 4, 5 and 8; no other size is 120
T, BIAS = math.log(10.0) - 0.7, -4.0   # a bias whose negatives still carry weight


def _mesh(devices, **sizes):
  c = mesh_lib.default_config()
  c.update(sizes)
  return mesh_lib.make_mesh(c, devices=jax.devices()[:devices])


# (mesh, ring axes): 8 devices over data x expert (bidirectional hops and one last one-way hop),
# 2 (one one-way hop), 3 and 5 (odd: bidirectional hops only), 4 with replicas.
RINGS = {
    'data4_expert2': (lambda: _mesh(8, data=4, expert=2), ('data', 'expert')),
    'data2': (lambda: _mesh(2, data=2), ('data',)),
    'data3': (lambda: _mesh(3, data=3), ('data',)),
    'data5': (lambda: _mesh(5, data=5), ('data',)),
    # A ring of 4 over 'data' while 'expert' (2) holds replicas that compute the same.
    'data4_of_data4_expert2': (lambda: _mesh(8, data=4, expert=2), ('data',)),
}


def _pairs():
  r = np.random.default_rng(0)
  zimg = siglip_loss.l2_normalize(r.normal(size=(B, D)))
  ztxt = siglip_loss.l2_normalize(np.asarray(zimg) + 0.8 * r.normal(size=(B, D)))
  return zimg, ztxt, jnp.float32(T), jnp.float32(BIAS)


def _ring_grad(mesh, axes):
  rows = NamedSharding(mesh, P(axes))
  rep = NamedSharding(mesh, P())
  fn = jax.value_and_grad(
      lambda *a: siglip_ring.siglip_loss_ring(*a, mesh=mesh, axes=axes), argnums=(0, 1, 2, 3))
  return jax.jit(fn, in_shardings=(rows, rows, rep, rep))


@pytest.fixture(scope='module')
def reference():
  args = _pairs()
  return args, jax.jit(jax.value_and_grad(siglip_loss.siglip_loss, argnums=(0, 1, 2, 3)))(*args)


@pytest.mark.parametrize('ring', sorted(RINGS))
def test_loss_and_gradients_equal_the_single_device_loss(ring, reference):
  make_mesh, axes = RINGS[ring]
  mesh = make_mesh()
  args, (ref_loss, ref_grads) = reference
  loss, grads = _ring_grad(mesh, axes)(*args)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for name, g, r in zip(('zimg', 'ztxt', 'log_temperature', 'bias'), grads, ref_grads):
    err = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
    assert err < 1e-5, (ring, name, err)


@pytest.mark.parametrize('ring', ['data4_expert2', 'data3'])
def test_padding_pairs_are_masked_like_the_single_device_loss(ring):
  """A `valid` mask (empty image slots of packed rows): ring == single-device masked loss ==
  the plain loss of the valid pairs alone, and padding rows get zero gradient."""
  make_mesh, axes = RINGS[ring]
  mesh = make_mesh()
  zimg, ztxt, t, b = _pairs()
  valid = np.random.default_rng(1).random(B) < 0.7
  ref = jax.value_and_grad(siglip_loss.siglip_loss, argnums=(0, 1, 2, 3))(zimg, ztxt, t, b,
                                                                          jnp.asarray(valid))
  subset = siglip_loss.siglip_loss(zimg[valid], ztxt[valid], t, b)
  np.testing.assert_allclose(float(ref[0]), float(subset), rtol=1e-5)
  rows = NamedSharding(mesh, P(axes))
  fn = jax.jit(jax.value_and_grad(
      lambda zi, zt, t, b, v: siglip_ring.siglip_loss_ring(zi, zt, t, b, v, mesh=mesh, axes=axes),
      argnums=(0, 1, 2, 3)), in_shardings=(rows, rows, None, None, rows))
  loss, grads = fn(zimg, ztxt, t, b, jnp.asarray(valid, jnp.float32))
  np.testing.assert_allclose(float(loss), float(ref[0]), rtol=1e-5)
  for g, r in zip(grads, ref[1]):
    assert float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))) < 1e-5
  assert not np.asarray(grads[0])[~valid].any() and not np.asarray(grads[1])[~valid].any()


def test_dropping_the_other_devices_negatives_is_detected(reference):
  """Control: the local blocks alone (what a ring that lost its foreign blocks computes) give a
  loss and gradients far from the reference, so the equality above needs every foreign block."""
  mesh = _mesh(8, data=4, expert=2)
  axes = ('data', 'expert')
  args, (ref_loss, ref_grads) = reference

  def local_only(zimg, ztxt, t, b):
    def body(zi, zt, t, b):
      return jax.lax.psum(siglip_loss.block_sum(zi, zt, t, b, positive_diagonal=True), axes) / B
    return jax.shard_map(body, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                         out_specs=P())(zimg, ztxt, t, b)

  loss, grads = jax.jit(jax.value_and_grad(local_only, argnums=(0, 1, 2, 3)))(*args)
  assert abs(float(loss) - float(ref_loss)) > 0.05 * float(ref_loss)
  assert float(jnp.max(jnp.abs(grads[1] - ref_grads[1]))) > 0.05 * float(
      jnp.max(jnp.abs(ref_grads[1])))


def _shapes_with_dim(hlo: str, n: int) -> set[str]:
  return {m.group(0) for m in re.finditer(r'\b[a-z]+\d*\[[\d,]*\]', hlo)
          if str(n) in m.group(0)[m.group(0).index('[') + 1:-1].split(',')}


def test_no_buffer_holds_the_global_logits_or_all_texts(reference):
  """Every array of the compiled forward + backward (per device, after SPMD partitioning) is at
  most a local [B/8, B/8] logits block or [B/8, D] embedding block: none has B as a dimension.
  Control: the single-device loss compiled on the same sharded inputs has one."""
  mesh = _mesh(8, data=4, expert=2)
  args, _ = reference
  hlo = _ring_grad(mesh, ('data', 'expert')).lower(*args).compile().as_text()
  assert _shapes_with_dim(hlo, B // 8), 'the local blocks should appear'
  assert not _shapes_with_dim(hlo, B), sorted(_shapes_with_dim(hlo, B))

  rows, rep = NamedSharding(mesh, P(('data', 'expert'))), NamedSharding(mesh, P())
  naive = jax.jit(jax.value_and_grad(siglip_loss.siglip_loss, argnums=(0, 1, 2, 3)),
                  in_shardings=(rows, rows, rep, rep)).lower(*args).compile().as_text()
  assert _shapes_with_dim(naive, B)


def test_one_device_ring_and_bad_batch():
  mesh = _mesh(8, data=8)
  args = _pairs()
  one = _mesh(1, data=1)
  np.testing.assert_allclose(
      float(siglip_ring.siglip_loss_ring(*args, mesh=one, axes=('data',))),
      float(siglip_loss.siglip_loss(*args)), rtol=1e-6)
  with pytest.raises(ValueError, match='does not split'):
    siglip_ring.siglip_loss_ring(args[0][:12], args[1][:12], args[2], args[3], mesh=mesh,
                                 axes=('data',))
  with pytest.raises(ValueError, match='not mesh axes'):
    siglip_ring.siglip_loss_ring(*args, mesh=mesh, axes=('batch',))


def test_default_axes_follow_the_rules():
  mesh = _mesh(8, data=4, expert=2)
  assert siglip_ring.batch_axes(mesh, 'dp_ep', B) == ('data', 'expert')
  assert siglip_ring.batch_axes(mesh, 'dp', B) == ('data',)


def test_bf16_embeddings_travel_as_bf16_and_match():
  """bf16 towers: the ring's program moves bf16 text blocks, computes in fp32 and returns bf16
  gradients equal to the single-device loss's on the same bf16 inputs."""
  mesh = _mesh(2, data=2)
  zimg, ztxt, t, b = _pairs()
  zimg, ztxt = zimg.astype(jnp.bfloat16), ztxt.astype(jnp.bfloat16)
  ref = jax.value_and_grad(siglip_loss.siglip_loss, argnums=(0, 1))(zimg, ztxt, t, b)
  fn = _ring_grad(mesh, ('data',))
  program = fn.lower(zimg, ztxt, t, b).as_text()      # as written (XLA:CPU may convert later)
  assert re.search(r'collective_permute.*\(tensor<60x16xbf16>\)', program), 'bf16 texts move'
  loss, grads = fn(zimg, ztxt, t, b)
  np.testing.assert_allclose(float(loss), float(ref[0]), rtol=1e-5)
  for g, r in zip(grads[:2], ref[1]):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=2e-2, atol=1e-4)
