"""Per-image attention pooling of packed MoonViT rows (model/image_pooling.py).

Parity with HF's SigLIP head on real converted weights is in tests/checkpoint/test_siglip.py;
here: the packing invariants and a plain per-image reference on random parameters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from kimi_vl_jax.model import image_pooling
from kimi_vl_jax.model.config import VisionConfig

CONFIG = VisionConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48)
D = CONFIG.hidden_size


@functools.lru_cache(maxsize=None)
def model_and_params():
  model = image_pooling.AttentionPoolingHead(CONFIG)
  x = jnp.zeros((1, 8, D))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.ones((1, 8), jnp.int32),
                          jnp.ones((1, 1, 2), jnp.int32))['params']
  # Seeded values large enough that the probe's attention is far from uniform.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.5,
                        nn.meta.unbox(shapes))
  return model, params, jax.jit(lambda p, *a: model.apply({'params': p}, *a))


def run(x, ids, grids):
  _, params, fn = model_and_params()
  return np.asarray(fn(params, jnp.asarray(x), jnp.asarray(ids), jnp.asarray(grids)))


def reference(params, x):
  """One image alone [P, D] -> [D]: plain multihead attention of the probe, numpy float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  n, h = CONFIG.num_heads, CONFIG.head_dim
  q = np.einsum('d,dnh->nh', p['probe'], p['wq']['kernel']) + p['wq']['bias']
  kv = np.einsum('pd,dknh->pknh', x, p['wkv']['kernel']) + p['wkv']['bias']
  logits = np.einsum('nh,pnh->np', q, kv[:, 0]) / np.sqrt(h)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum('np,pnh->nh', w, kv[:, 1])
  a = np.einsum('nh,nhd->d', o, p['wo']['kernel']) + p['wo']['bias']
  mu, var = a.mean(), a.var()
  y = (a - mu) / np.sqrt(var + CONFIG.layer_norm_eps) * p['norm']['scale'] + p['norm']['bias']
  f = y @ p['mlp']['fc0']['kernel'] + p['mlp']['fc0']['bias']
  f = 0.5 * f * (1 + np.tanh(np.sqrt(2 / np.pi) * (f + 0.044715 * f ** 3)))
  return a + f @ p['mlp']['fc1']['kernel'] + p['mlp']['fc1']['bias']


def images(rng, sizes):
  return [rng.normal(size=(s, D)).astype(np.float32) for s in sizes]


def test_alone_equals_packed_with_others_padding_and_shuffled():
  rng = np.random.default_rng(0)
  imgs = images(rng, [6, 12, 4])
  # Packed: the three images, 5 garbage padding patches, one unused image slot (P = 27).
  x = np.concatenate(imgs + [rng.normal(size=(5, D)).astype(np.float32) * 50])
  # Each alone, at the same P (zero padding patches: one compile).
  alone = []
  for im in imgs:
    xa = np.zeros((len(x), D), np.float32)
    xa[:len(im)] = im
    ida = (np.arange(len(x)) < len(im)).astype(np.int32)
    alone.append(run(xa[None], ida[None], np.array([[[1, len(im)], [0, 0], [0, 0], [0, 0]]]))[0, 0])
  ids = np.concatenate([np.full(len(im), i + 1) for i, im in enumerate(imgs)]
                       + [np.zeros(5, int)]).astype(np.int32)
  grids = np.array([[[2, 3], [3, 4], [2, 2], [0, 0]]], np.int32)
  packed = run(x[None], ids[None], grids)[0]
  for i in range(3):
    np.testing.assert_allclose(packed[i], alone[i], atol=1e-5)
  np.testing.assert_array_equal(packed[3], 0.0)   # the unused slot
  assert np.abs(alone[0] - alone[1]).max() > 1e-2  # the images really differ
  # Patch order inside the row does not matter.
  perm = rng.permutation(len(x))
  np.testing.assert_allclose(run(x[perm][None], ids[perm][None], grids)[0], packed, atol=1e-5)


def test_matches_plain_attention_reference_and_rows_are_independent():
  _, params, _ = model_and_params()
  rng = np.random.default_rng(1)
  a, b, c = images(rng, [7, 3, 10])
  row0 = np.concatenate([a, b])
  row1 = np.concatenate([c, np.zeros((0, D), np.float32)])
  x = np.stack([row0, row1])
  ids = np.array([[1] * 7 + [2] * 3, [1] * 10], np.int32)
  out = run(x, ids, np.array([[[7, 1], [3, 1]], [[10, 1], [0, 0]]], np.int32))
  for got, im in ((out[0, 0], a), (out[0, 1], b), (out[1, 0], c)):
    np.testing.assert_allclose(got, reference(params, im), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[1, 1], 0.0)


def test_gradients_finite_with_padding_and_empty_slots():
  model, params, _ = model_and_params()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 9, D)).astype(np.float32))
  ids = jnp.array([[1, 1, 1, 1, 2, 2, 0, 0, 0]], jnp.int32)
  grids = jnp.array([[[2, 2], [1, 2], [0, 0]]], jnp.int32)
  loss = lambda p, x: jnp.sum(model.apply({'params': p}, x, ids, grids) ** 2)
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(gp))
  gx = np.asarray(gx)
  assert np.isfinite(gx).all()
  np.testing.assert_array_equal(gx[0, 6:], 0.0)   # padding patches get no gradient
  assert np.abs(gx[0, :6]).min() > 0


def test_rejects_bad_shapes():
  model, params, _ = model_and_params()
  with pytest.raises(ValueError, match='patch_image_ids'):
    model.apply({'params': params}, jnp.zeros((1, 4, D)), jnp.ones((1, 5), jnp.int32),
                jnp.ones((1, 1, 2), jnp.int32))
  with pytest.raises(ValueError, match='image_grid_hws must be'):
    model.apply({'params': params}, jnp.zeros((1, 4, D)), jnp.ones((1, 4), jnp.int32),
                jnp.ones((1, 2), jnp.int32))
  with pytest.raises(ValueError, match=r'x must be \[B, P, 32\]'):
    model.apply({'params': params}, jnp.zeros((1, 4, D + 1)), jnp.ones((1, 4), jnp.int32),
                jnp.ones((1, 1, 2), jnp.int32))
