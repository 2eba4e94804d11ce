"""The MoonViT pre-training objective (train/coca_loss.py): caption masked mean and
L = L_siglip + 2 L_caption with configurable weights; the ring SigLIP plugs in as `siglip_fn`."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model import siglip_loss
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import siglip_ring
from kimi_vl_jax.train import coca_loss


def _inputs(b=8, d=8, t=5, v=11):
  r = np.random.default_rng(0)
  zimg = siglip_loss.l2_normalize(r.normal(size=(b, d)))
  ztxt = siglip_loss.l2_normalize(r.normal(size=(b, d)))
  logits = jnp.asarray(r.normal(size=(b, t, v)), jnp.float32)
  targets = jnp.asarray(r.integers(0, v, size=(b, t)), jnp.int32)
  mask = np.ones((b, t), np.float32)
  mask[:, -1] = 0
  mask[0, :] = 0
  return zimg, ztxt, logits, targets, jnp.asarray(mask)


def test_caption_loss_is_the_mean_over_masked_tokens():
  _, _, logits, targets, mask = _inputs()
  got = coca_loss.caption_loss(logits, targets, mask)
  logp = np.asarray(jax.nn.log_softmax(logits))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  m = np.asarray(mask)
  np.testing.assert_allclose(float(got['caption_loss']), (nll * m).sum() / m.sum(), rtol=1e-6)
  assert float(got['caption_tokens']) == m.sum()
  empty = coca_loss.caption_loss(logits, targets, jnp.zeros_like(mask))
  assert float(empty['caption_loss']) == 0.0


def test_total_is_siglip_plus_twice_caption_and_weights_are_configurable():
  zimg, ztxt, logits, targets, mask = _inputs()
  t, b = math.log(10.0), -10.0
  total, m = coca_loss.vit_pretrain_loss(zimg, ztxt, t, b, logits, targets, mask)
  s = float(siglip_loss.siglip_loss(zimg, ztxt, t, b))
  c = float(coca_loss.caption_loss(logits, targets, mask)['caption_loss'])
  np.testing.assert_allclose(float(total), s + 2 * c, rtol=1e-6)
  np.testing.assert_allclose(float(m['siglip_loss']), s, rtol=1e-6)
  np.testing.assert_allclose(float(m['temperature']), 10.0, rtol=1e-6)
  other, _ = coca_loss.vit_pretrain_loss(zimg, ztxt, t, b, logits, targets, mask,
                                         siglip_weight=0.5, caption_weight=1.0)
  np.testing.assert_allclose(float(other), 0.5 * s + c, rtol=1e-6)
  valid = jnp.asarray([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)
  masked, m = coca_loss.vit_pretrain_loss(zimg, ztxt, t, b, logits, targets, mask, valid=valid)
  np.testing.assert_allclose(float(m['siglip_loss']),
                             float(siglip_loss.siglip_loss(zimg, ztxt, t, b, valid)), rtol=1e-6)
  with pytest.raises(ValueError, match='weights'):
    coca_loss.vit_pretrain_loss(zimg, ztxt, t, b, logits, targets, mask, caption_weight=-1)


def test_the_ring_siglip_plugs_in():
  zimg, ztxt, logits, targets, mask = _inputs()
  c = mesh_lib.default_config()
  c.data = 8
  ring = functools.partial(siglip_ring.siglip_loss_ring, mesh=mesh_lib.make_mesh(c),
                           axes=('data',))
  args = (zimg, ztxt, jnp.float32(1.0), jnp.float32(-2.0), logits, targets, mask)
  want = coca_loss.vit_pretrain_loss(*args)[0]
  got = jax.jit(lambda *a: coca_loss.vit_pretrain_loss(*a, siglip_fn=ring)[0])(*args)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
