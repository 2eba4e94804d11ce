"""The SigLIP sigmoid contrastive loss of MoonViT pre-training (Kimi-VL report, section 2.3).

Kimi-VL trains MoonViT with `L = L_siglip + 2 * L_caption` (CoCa-style; `train/coca_loss.py`
combines them). `L_siglip` is SigLIP's pairwise sigmoid loss: for a batch of B image embeddings
`zimg [B, D]` and the embeddings of their B captions `ztxt [B, D]` (both L2-normalised by the
towers' heads; `l2_normalize`),

    logits_ij = (zimg_i . ztxt_j) * exp(t') + b,     label_ij = +1 if i == j else -1,
    L_siglip  = -(1 / B) * sum_i sum_j log_sigmoid(label_ij * logits_ij),

with a learned log-temperature `t'` (initialised to log 10) and bias `b` (initialised to -10, so
the B - 1 negatives of a row start near zero loss). Normalisation: the sum over texts j of each
image's B terms, averaged over the B images (the SigLIP convention: a per-image sum, not a mean
over all B^2 pairs). Everything runs in fp32 whatever the embeddings' dtype.

Packed MoonViT batches have image slots that hold no image (`image_grid_hws` (0, 0)): an optional
`valid [B]` mask drops every pair whose image or text is padding, and B becomes the number of
valid pairs.

The loss is a sum of independent blocks: rows of images times columns of texts. `block_sum`
is one block's sum (positive diagonal or negatives only); the single-device loss is one block,
and the distributed form (`parallel/siglip_ring.py`) sums each device's local block plus the
negative-only blocks of the texts it receives around a ring, so no device holds the [B, B]
logits. This file is the per-device math; it knows no mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

INIT_LOG_TEMPERATURE = math.log(10.0)
INIT_BIAS = -10.0


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  """x / max(||x||, eps) along the last axis, in fp32. The clamp is on the squared norm, so an
  all-zero row (an empty image slot) has a finite (zero) gradient, not the NaN of d||x|| at 0."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def logits(zimg: Array, ztxt: Array, log_temperature: Array, bias: Array) -> Array:
  """`zimg [Bi, D] . ztxt [Bt, D]^T * exp(t') + b` -> fp32 [Bi, Bt]."""
  zimg = zimg.astype(jnp.float32)
  ztxt = ztxt.astype(jnp.float32)
  t = jnp.exp(jnp.asarray(log_temperature, jnp.float32))
  return jnp.einsum('id,jd->ij', zimg, ztxt) * t + jnp.asarray(bias, jnp.float32)


def block_sum(zimg: Array, ztxt: Array, log_temperature: Array, bias: Array, *,
              positive_diagonal: bool, img_valid: Array | None = None,
              txt_valid: Array | None = None) -> Array:
  """`-sum_ij log_sigmoid(label_ij * logits_ij)` over one block of pairs (fp32 scalar).

  `positive_diagonal=True`: the block pairs each image with its own caption on the diagonal
  (needs Bi == Bt), label +1 there and -1 elsewhere. False: every pair is a negative (label -1),
  the case of texts from another device. `img_valid [Bi]`, `txt_valid [Bt]` (None = all): only
  pairs of a valid image and a valid text count.
  """
  z = logits(zimg, ztxt, log_temperature, bias)
  if positive_diagonal:
    if z.shape[0] != z.shape[1]:
      raise ValueError(f'a block with positives needs as many images as texts; got {z.shape}')
    labels = 2.0 * jnp.eye(z.shape[0], dtype=jnp.float32) - 1.0
  else:
    labels = -1.0
  terms = -jax.nn.log_sigmoid(labels * z)
  if img_valid is None and txt_valid is None:
    return jnp.sum(terms)
  iv = jnp.ones(z.shape[0], bool) if img_valid is None else jnp.asarray(img_valid) > 0
  tv = jnp.ones(z.shape[1], bool) if txt_valid is None else jnp.asarray(txt_valid) > 0
  return jnp.sum(jnp.where(iv[:, None] & tv[None, :], terms, 0.0))


def siglip_loss(zimg: Array, ztxt: Array, log_temperature: Array, bias: Array,
                valid: Array | None = None) -> Array:
  """The SigLIP loss of one batch on one device (module docstring): zimg, ztxt [B, D] where
  row i of each is the same pair, optional `valid [B]` -> fp32 scalar, the mean over (valid)
  images of the per-image sum over (valid) texts; 0 when no pair is valid."""
  if zimg.ndim != 2 or zimg.shape != ztxt.shape:
    raise ValueError(f'zimg and ztxt must both be [B, D]; got {zimg.shape} and {ztxt.shape}')
  if valid is None:
    return block_sum(zimg, ztxt, log_temperature, bias, positive_diagonal=True) / zimg.shape[0]
  if valid.shape != zimg.shape[:1]:
    raise ValueError(f'valid must be [B={zimg.shape[0]}]; got {valid.shape}')
  total = block_sum(zimg, ztxt, log_temperature, bias, positive_diagonal=True, img_valid=valid,
                    txt_valid=valid)
  return total / jnp.maximum(jnp.sum((jnp.asarray(valid) > 0).astype(jnp.float32)), 1.0)


def init_params() -> dict[str, Array]:
  """The loss's two learned scalars at SigLIP's initialisation: `{'log_temperature': log 10,
  'bias': -10}` (fp32)."""
  return {'log_temperature': jnp.asarray(INIT_LOG_TEMPERATURE, jnp.float32),
          'bias': jnp.asarray(INIT_BIAS, jnp.float32)}
