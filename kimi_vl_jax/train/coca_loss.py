"""The MoonViT pre-training objective: SigLIP + CoCa caption loss (Kimi-VL report, section 2.3).

    L = w_siglip * L_siglip + w_caption * L_caption,      w_siglip = 1, w_caption = 2

("following CoCa": open_clip's CoCa defaults are the same weights). `L_siglip` is the sigmoid
contrastive loss of the image and text embeddings (`model/siglip_loss.py`; on a mesh its ring form,
`parallel/siglip_ring.py`, passed as `siglip_fn`). `L_caption` is the caption decoder's
(`model/caption_decoder.py`) next-token cross-entropy, the mean over every caption token of the
batch that has a target (`loss_mask`), in fp32 (`train/losses.py` `cross_entropy_sums`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kimi_vl_jax.model import siglip_loss
from kimi_vl_jax.train import losses

Array = jax.Array

SIGLIP_WEIGHT = 1.0
CAPTION_WEIGHT = 2.0


def caption_loss(logits: Array, targets: Array, loss_mask: Array) -> dict[str, Array]:
  """Masked mean next-token cross-entropy of the captions: logits [B, T, V], targets int [B, T],
  loss_mask [B, T] -> {'caption_loss' (mean over masked tokens; 0 when there are none),
  'caption_tokens', 'caption_accuracy'}, fp32."""
  sums = losses.cross_entropy_sums(logits, targets, loss_mask)
  tokens = jnp.maximum(sums['tokens'], 1.0)
  return {'caption_loss': sums['ce_sum'] / tokens, 'caption_tokens': sums['tokens'],
          'caption_accuracy': sums['correct'] / tokens}


def vit_pretrain_loss(zimg: Array, ztxt: Array, log_temperature: Array, bias: Array,
                      caption_logits: Array, caption_targets: Array, caption_mask: Array, *,
                      valid: Array | None = None, siglip_weight: float = SIGLIP_WEIGHT,
                      caption_weight: float = CAPTION_WEIGHT,
                      siglip_fn: Callable[..., Array] = siglip_loss.siglip_loss
                      ) -> tuple[Array, dict[str, Array]]:
  """`(L, metrics)` with L = siglip_weight * L_siglip + caption_weight * L_caption (module
  docstring). zimg, ztxt [B, D] (L2-normalised, row i the same pair); the caption arrays as in
  `caption_loss`. `siglip_fn(zimg, ztxt, log_temperature, bias[, valid])` computes L_siglip (e.g.
  the ring form bound to a mesh), with `valid [B]` (pairs of real images) when given. Metrics:
  both terms, the total, the temperature exp(t') and the bias."""
  if siglip_weight < 0 or caption_weight < 0:
    raise ValueError(f'loss weights must be >= 0; got siglip {siglip_weight}, caption '
                     f'{caption_weight}')
  args = (zimg, ztxt, log_temperature, bias) + (() if valid is None else (valid,))
  l_siglip = siglip_fn(*args)
  cap = caption_loss(caption_logits, caption_targets, caption_mask)
  total = siglip_weight * l_siglip + caption_weight * cap['caption_loss']
  metrics = dict(cap, siglip_loss=l_siglip, loss=total,
                 temperature=jnp.exp(jnp.asarray(log_temperature, jnp.float32)),
                 bias=jnp.asarray(bias, jnp.float32))
  return total, metrics
