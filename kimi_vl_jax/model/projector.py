"""Kimi-VL's multimodal projector: MoonViT patches -> language-model tokens (Kimi-VL report section 2.1).

Per-patch LayerNorm over the vision width, then each 2x2 window of patches is concatenated into
one 4*Dv vector (pixel-shuffle style token compression, paper section 2.1), then a two-layer MLP
with exact (erf) GELU maps it to the language model's width. Parity target: `KimiVLMultiModal-
Projector` (equivalently transformers' `Kimi_K25MultimodalProjection`).

Einsum letters: B batch, P patches, M merged tokens, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.layers import DenseGeneral, LayerNorm, constrain, gelu_erf

Array = jax.Array


def merge_patches(x: Array, merge_kernel: tuple[int, int] = (2, 2)) -> Array:
  """[B, P, Dv] -> [B, P / (kh*kw), kh*kw*Dv] by grouping consecutive patches.

  Requires the patches in merge order (the batch contract, docs/architecture.md): the kh*kw patches of a window consecutive in
  row-offset-then-column-offset order (top-left, top-right, bottom-left, bottom-right for 2x2),
  which is the concatenation order of Kimi-VL's `patch_merger` ([h/2, 2, w/2, 2, D] ->
  [h/2, w/2, (2, 2), D]). Feature k*Dv + c of a merged token is channel c of its k-th patch.
  """
  kh, kw = merge_kernel
  b, p, d = x.shape
  if p % (kh * kw):
    raise ValueError(f'{p} patches per row is not a multiple of the merge window {kh}x{kw}')
  return x.reshape(b, p // (kh * kw), kh * kw * d)


class Projector(nn.Module):
  """LayerNorm(Dv) per patch -> 2x2 merge -> linear_1 (4Dv -> 4Dv) -> GELU(erf) -> linear_2 (-> D).

  __call__(x [B, P, Dv]) -> [B, P/4, D]. Params: docs/param_tree.md `projector/`.
  `dtype` / `param_dtype` default (None) to the config's `dtype` / `param_dtype`.
  """
  config: KimiVLConfig
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype = self.config.jnp_dtype if self.dtype is None else self.dtype
    param_dtype = self.config.jnp_param_dtype if self.param_dtype is None else self.param_dtype
    vc = self.config.vision
    dv, d = vc.hidden_size, self.config.text.hidden_size
    kh, kw = vc.merge_kernel
    dm = kh * kw * dv
    if x.ndim != 3 or x.shape[-1] != dv:
      raise ValueError(f'projector input must be [B, P, {dv}]; got {x.shape}')
    x = LayerNorm(dv, eps=self.config.projector_ln_eps, dtype=dtype,
                  param_dtype=param_dtype, name='pre_norm')(x)
    x = merge_patches(x, vc.merge_kernel)  # [B, M, 4Dv]
    x = DenseGeneral((dm,), (dm,), ('mm_embed', 'mlp'), use_bias=True, dtype=dtype,
                     param_dtype=param_dtype, name='linear_1')(x)
    x = constrain(gelu_erf(x), ('act_batch', 'act_len', 'act_mlp'))
    x = DenseGeneral((dm,), (d,), ('mlp', 'embed'), use_bias=True, dtype=dtype,
                     param_dtype=param_dtype, name='linear_2')(x)
    return constrain(x, ('act_batch', 'act_len', 'act_embed'))
