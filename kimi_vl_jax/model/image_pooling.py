"""One embedding per image of MoonViT's packed output: SigLIP's attention-pooling ("MAP") head.

MoonViT pre-training (Kimi-VL report, arXiv 2504.07491, sec. 2.3) contrasts each image with its
caption (the SigLIP loss), so every image needs one vector. SigLIP-SO400M, which MoonViT is
initialised from, gets it with multihead attention pooling (HF `SiglipMultiheadAttentionPoolingHead`,
the `vision_model.head.*` tensors): a learned probe attends over the image's final-LayerNorm patch
states, then

    a = wo(MHA(q = wq(probe), k, v = wkv(patches)))       # N heads, scale 1/sqrt(H)
    z = a + fc1(gelu_tanh(fc0(LN(a))))                   # no residual from the probe itself

Here the patches of several images share a row (`patch_image_ids [B, P]`: 1.. per image, 0 =
padding; `image_grid_hws [B, I, 2]` gives the I image slots, (0, 0) = unused): the probe's
attention is restricted to each image's own patches by a softmax per (row, image, head) computed
with segment reductions over the patch axis, so the cost is O(P) per row, never O(I x P), and the
result for an image does not depend on what else is packed with it or on patch order. Image slots
with no patches get zeros.

Parameters (`checkpoint/siglip.py` fills them from `vision_model.head.*`):
    probe [D]   wq/{kernel [D, N, H], bias [N, H]}   wkv/{kernel [D, 2, N, H], bias [2, N, H]}
    wo/{kernel [N, H, D], bias [D]}   norm/{scale, bias} [D]   mlp/fc0, mlp/fc1 (MoonViT's MLP)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.model.config import VisionConfig
from kimi_vl_jax.model.layers import DenseGeneral, LayerNorm, param_with_axes
from kimi_vl_jax.model.vision import MoonViTMlp

Array = jax.Array


def segment_softmax_pool(logits: Array, values: Array, segment_ids: Array,
                         num_segments: int) -> tuple[Array, Array]:
  """Per-segment softmax-weighted sums along the patch axis, row by row.

  logits [B, P, N] (fp32), values [B, P, N, H], segment_ids int [B, P] (ids outside
  [0, num_segments) are dropped) -> (pooled [B, S, N, H] in fp32, count [B, S] patches per
  segment); a segment without patches pools to 0.
  """
  def one_row(lg, v, ids):
    peak = jax.ops.segment_max(lg, ids, num_segments=num_segments)  # [S, N], -inf when empty
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    e = jnp.exp(lg - jnp.take(peak, jnp.clip(ids, 0, num_segments - 1), axis=0))
    denom = jax.ops.segment_sum(e, ids, num_segments=num_segments)  # [S, N]
    num = jax.ops.segment_sum(e[..., None] * v.astype(jnp.float32), ids,
                              num_segments=num_segments)             # [S, N, H]
    count = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=num_segments)
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where((denom > 0)[..., None], num / safe[..., None], 0.0), count

  return jax.vmap(one_row)(logits, values, segment_ids)


class AttentionPoolingHead(nn.Module):
  """__call__(x [B, P, D] (MoonViT's output), patch_image_ids int [B, P], image_grid_hws int
  [B, I, 2]) -> [B, I, D] fp32, image i + 1 of row b at [b, i]; zeros for empty slots."""
  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, patch_image_ids: Array, image_grid_hws: Array) -> Array:
    cfg = self.config
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    if x.ndim != 3 or x.shape[-1] != d:
      raise ValueError(f'x must be [B, P, {d}]; got {x.shape}')
    b, p = x.shape[:2]
    if patch_image_ids.shape != (b, p):
      raise ValueError(f'patch_image_ids {patch_image_ids.shape} does not match x {x.shape}')
    if image_grid_hws.ndim != 3 or image_grid_hws.shape[0] != b or image_grid_hws.shape[2] != 2:
      raise ValueError(f'image_grid_hws must be [B={b}, I, 2]; got {image_grid_hws.shape}')
    num_images = image_grid_hws.shape[1]
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)

    probe = param_with_axes(self, 'probe', nn.initializers.normal(stddev=0.02), (d,),
                            self.param_dtype, ('vit_embed',))
    q = dense((d,), (n, h), ('vit_embed', 'vit_heads', 'vit_kv'), name='wq')(probe)  # [N, H]
    kv = dense((d,), (2, n, h), ('vit_embed', 'vit_qkv', 'vit_heads', 'vit_kv'),
               name='wkv')(x)                                                        # [B, P, 2, N, H]
    logits = jnp.einsum('NH,BPNH->BPN', q, kv[:, :, 0],
                        preferred_element_type=jnp.float32) * h ** -0.5
    # Segment 0 collects the padding patches and is dropped; image i + 1 -> slot i.
    pooled, count = segment_softmax_pool(logits, kv[:, :, 1], patch_image_ids, num_images + 1)
    a = dense((n, h), (d,), ('vit_heads', 'vit_kv', 'vit_embed'), name='wo')(
        pooled[:, 1:].astype(self.dtype))                                           # [B, I, D]
    y = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='norm')(a)
    z = a + MoonViTMlp(cfg, self.dtype, self.param_dtype, name='mlp')(y)
    return jnp.where((count[:, 1:] > 0)[..., None], z.astype(jnp.float32), 0.0)
