"""The single-device SigLIP sigmoid loss (model/siglip_loss.py) against its definition written out
pair by pair."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model import siglip_loss


def _pairs(b=6, d=8, seed=0):
  r = np.random.default_rng(seed)
  zimg = siglip_loss.l2_normalize(r.normal(size=(b, d)))
  ztxt = siglip_loss.l2_normalize(np.asarray(zimg) + 0.7 * r.normal(size=(b, d)))
  return zimg, ztxt


def _by_hand(zimg, ztxt, t, b):
  zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
  n = len(zimg)
  total = 0.0
  for i in range(n):
    for j in range(n):
      label = 1.0 if i == j else -1.0
      logit = zimg[i] @ ztxt[j] * math.exp(t) + b
      total += math.log1p(math.exp(-label * logit))        # -log_sigmoid(label * logit)
  return total / n                                          # per-image sum, mean over images


@pytest.mark.parametrize('t,b', [(math.log(10.0), -10.0), (1.3, -2.5)])
def test_loss_is_the_per_image_sum_averaged_over_images(t, b):
  zimg, ztxt = _pairs()
  got = siglip_loss.siglip_loss(zimg, ztxt, t, b)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), _by_hand(zimg, ztxt, t, b), rtol=1e-5)
  # Not the mean over all B^2 pairs: that would be B times smaller.
  assert abs(float(got) - _by_hand(zimg, ztxt, t, b) / len(zimg)) > 0.1 * float(got)


def test_init_and_matched_pairs_lower_the_loss():
  p = siglip_loss.init_params()
  np.testing.assert_allclose(float(p['log_temperature']), math.log(10.0))
  assert float(p['bias']) == -10.0
  zimg, ztxt = _pairs()
  matched = siglip_loss.siglip_loss(zimg, ztxt, 2.0, -1.0)
  shuffled = siglip_loss.siglip_loss(zimg, ztxt[::-1], 2.0, -1.0)
  assert float(matched) < float(shuffled)


def test_bf16_embeddings_are_computed_in_fp32():
  zimg, ztxt = _pairs()
  got = siglip_loss.siglip_loss(zimg.astype(jnp.bfloat16), ztxt.astype(jnp.bfloat16), 1.0, -3.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(siglip_loss.siglip_loss(zimg, ztxt, 1.0, -3.0)),
                             rtol=2e-2)


def test_negative_only_block_and_shape_errors():
  zimg, ztxt = _pairs()
  z = siglip_loss.logits(zimg[:2], ztxt[2:5], 0.5, -1.0)
  want = -np.sum(np.asarray(jax.nn.log_sigmoid(-z)))
  got = siglip_loss.block_sum(zimg[:2], ztxt[2:5], 0.5, -1.0, positive_diagonal=False)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  with pytest.raises(ValueError, match='as many images as texts'):
    siglip_loss.block_sum(zimg[:2], ztxt[:3], 0.5, -1.0, positive_diagonal=True)
  with pytest.raises(ValueError, match=r'\[B, D\]'):
    siglip_loss.siglip_loss(zimg, ztxt[:3], 0.5, -1.0)


def test_valid_mask_drops_padding_pairs():
  zimg, ztxt = _pairs(b=8)
  valid = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
  got = siglip_loss.siglip_loss(zimg, ztxt, 0.7, -2.0, jnp.asarray(valid))
  np.testing.assert_allclose(float(got), _by_hand(zimg[valid], ztxt[valid], 0.7, -2.0), rtol=1e-5)
  none = siglip_loss.siglip_loss(zimg, ztxt, 0.7, -2.0, jnp.zeros(8))
  assert float(none) == 0.0
  with pytest.raises(ValueError, match='valid'):
    siglip_loss.siglip_loss(zimg, ztxt, 0.7, -2.0, jnp.ones(3))


def test_l2_normalize_of_a_zero_row_has_a_finite_gradient():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(siglip_loss.l2_normalize(x)), [[0.6, 0.8], [0, 0]],
                             rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(siglip_loss.l2_normalize(x) * jnp.asarray([1.0, 2.0])))(x)
  assert np.isfinite(np.asarray(g)).all()
