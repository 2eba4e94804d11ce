"""MoonViT: Kimi-VL's native-resolution vision tower (Kimi-VL report, arXiv 2504.07491, sec. 2.1).

NaViT-style packing: every row of the batch holds the patches of several images of different sizes,
`patches [B, P, 588]` plus `patch_coords [B, P, 2]` (row, col inside the image), `patch_image_ids
[B, P]` (1.. per image in the row, 0 = padding) and `image_grid_hws [B, I, 2]` (the data pipeline's
packed batch). Nothing here depends on the order of patches inside a row: the absolute position
embedding and the 2D RoPE are computed from each patch's own (row, col) and its image's (h, w), and
attention is restricted to patches of the same image. The data pipeline stores the patches in merge
order so the projector's 2x2 merge is a reshape; `pack_hf_images` converts the HF layout (row-major
per image, all images concatenated) into that layout.

Parity target: Kimi-VL's `moonvit.py` (equivalently transformers' `Kimi_K25VisionModel` for one
frame, after the q/k row permutation documented in `tests/reference/make_vision_fixtures.py`).

Einsum letters: B batch, P patches (queries), S patches (keys), D vision width, N heads, H head dim,
F MLP width, K interpolation taps.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.model import attention
from kimi_vl_jax.model.config import VisionConfig
from kimi_vl_jax.model.kernels import Kernels
from kimi_vl_jax.model.layers import (ACTIVATIONS, DenseGeneral, LayerNorm, apply_rope_interleaved,
                                      constrain, layer_stack, param_with_axes)

Array = jax.Array

_BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient (upsample_bicubic2d).
_ACT_AXES = ('act_batch', 'act_patches', 'act_embed')


# ------------------------------------------------------------------------------------------
# Absolute position embedding: the learned grid, bicubically resized per image.

def _cubic_weights(t: Array) -> Array:
  """Keys cubic-convolution weights of the 4 taps (floor-1 .. floor+2) at fraction t in [0, 1).

  Same expressions as PyTorch's `get_cubic_upsample_coefficients` (A = -0.75): distances
  1 + t and 2 - t use the outer piece, t and 1 - t the inner one. [...] -> [..., 4].
  """
  a = _BICUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_taps(index: Array, out_size: Array, in_size: int) -> tuple[Array, Array]:
  """Source taps and weights of PyTorch `interpolate(mode='bicubic', align_corners=False)`.

  Output pixel `index` of an axis resized from `in_size` to `out_size` reads input pixels
  floor(src) - 1 .. floor(src) + 2 (clamped to the border) with src = (index + 0.5) * in / out
  - 0.5 (half-pixel centres, no clamp of src, no antialias). Exactly the identity when
  out_size == in_size. `index`, `out_size` int [...] (may be traced) -> (int taps [..., 4],
  float32 weights [..., 4]).
  """
  src = (index.astype(jnp.float32) + 0.5) * in_size / out_size.astype(jnp.float32) - 0.5
  floor = jnp.floor(src)
  taps = floor.astype(jnp.int32)[..., None] + jnp.arange(-1, 3, dtype=jnp.int32)
  return jnp.clip(taps, 0, in_size - 1), _cubic_weights(src - floor)


def interpolate_pos_emb(pos_emb: Array, coords: Array, grid_hw: Array) -> Array:
  """Per-patch bicubic resize of the learned grid: a 4x4 weighted gather, jit-friendly.

  pos_emb [H0, W0, D]; coords int [..., 2] (row, col); grid_hw int [..., 2] (h, w of the patch's
  image) -> [..., D] in fp32. Equals `F.interpolate(grid, size=(h, w), mode='bicubic')[row, col]`
  for every patch, whatever mix of image sizes is packed, without materialising a resized grid.
  """
  h0, w0, _ = pos_emb.shape
  row_taps, row_w = bicubic_taps(coords[..., 0], grid_hw[..., 0], h0)
  col_taps, col_w = bicubic_taps(coords[..., 1], grid_hw[..., 1], w0)
  table = pos_emb.astype(jnp.float32).reshape(h0 * w0, -1)
  out = 0.0
  # 16 gathers of [..., D] accumulated in turn (a [..., 16, D] buffer would be 16x the
  # activation size at full scale).
  for i in range(4):
    for j in range(4):
      idx = row_taps[..., i] * w0 + col_taps[..., j]
      out = out + (row_w[..., i] * col_w[..., j])[..., None] * jnp.take(table, idx, axis=0)
  return out


# ------------------------------------------------------------------------------------------
# 2D rotary embedding.

def rope_2d_angles(coords: Array, head_dim: int, theta: float) -> Array:
  """Rotation angle of each complex slot: [..., 2] (row, col) -> [..., head_dim / 2] fp32.

  MoonViT convention (Kimi-VL's `moonvit.py`, vllm `Rope2DPosEmb`): freq_i = theta^(-4i/d), i < d/4;
  slot 2i turns by col * freq_i, slot 2i+1 by row * freq_i.
  """
  if head_dim % 4:
    raise ValueError(f'MoonViT 2D RoPE needs head_dim divisible by 4, got {head_dim}')
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 4, dtype=np.float32) / head_dim)
  pos = coords.astype(jnp.float32)
  col = pos[..., 1:2] * freqs  # [..., d/4]
  row = pos[..., 0:1] * freqs
  return jnp.stack([col, row], axis=-1).reshape(*coords.shape[:-1], head_dim // 2)


def apply_rope_2d(x: Array, angles: Array) -> Array:
  """Rotates adjacent pairs (x[2j], x[2j+1]) by angles[j]: x [B, P, N, H], angles [B, P, H/2] ->
  [B, P, N, H] in x.dtype (interleaved pairing as in Kimi-VL's `apply_rope`, `view_as_complex`)."""
  return apply_rope_interleaved(x, jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])


# ------------------------------------------------------------------------------------------
# Encoder block.

class MoonViTMlp(nn.Module):
  """fc1(act(fc0(x))), act = config.hidden_act (gelu tanh for MoonViT). Params `mlp/fc{0,1}`."""
  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    if cfg.hidden_act not in ACTIVATIONS:
      raise ValueError(f'vision hidden_act {cfg.hidden_act!r} unknown; use one of '
                       f'{sorted(ACTIVATIONS)}')
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    y = dense((cfg.hidden_size,), (cfg.intermediate_size,), ('vit_embed', 'vit_mlp'),
              name='fc0')(x)
    y = constrain(ACTIVATIONS[cfg.hidden_act](y), ('act_batch', 'act_patches', 'act_mlp'))
    return dense((cfg.intermediate_size,), (cfg.hidden_size,), ('vit_mlp', 'vit_embed'),
                 name='fc1')(y)


class MoonViTBlock(nn.Module):
  """Pre-norm block: x += wo(attn(rope(q), rope(k), v)); x += fc1(act(fc0(LN(x)))).

  Call signature fits `nn.scan`: (x, (patch_image_ids, rope_angles)) -> (x, None).
  """
  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # `(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale) -> out`, e.g. an AttentionKernel.
  kernel: Callable = attention.AttentionKernel()

  @nn.compact
  def __call__(self, x: Array, side: tuple[Array, Array]) -> tuple[Array, None]:
    image_ids, angles = side
    cfg = self.config
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    norm = functools.partial(LayerNorm, d, eps=cfg.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)

    y = norm(name='norm0')(x)
    # Fused projection, HF rows q | k | v, each head-major: kernel [D, 3, N, H].
    qkv = dense((d,), (3, n, h), ('vit_embed', 'vit_qkv', 'vit_heads', 'vit_kv'),
                name='wqkv')(y)  # [B, P, 3, N, H]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = apply_rope_2d(q, angles)
    k = apply_rope_2d(k, angles)
    q = constrain(q, ('act_batch', 'act_patches', 'act_heads', 'act_kv'))
    # Bidirectional attention inside each image; padding attends to nothing (output 0).
    o = self.kernel(q, k, v, image_ids, image_ids, causal=False, scale=h ** -0.5)  # [B, P, N, H]
    x = x + dense((n, h), (d,), ('vit_heads', 'vit_kv', 'vit_embed'), name='wo')(o)
    x = constrain(x, _ACT_AXES)

    y = norm(name='norm1')(x)
    y = MoonViTMlp(cfg, self.dtype, self.param_dtype, name='mlp')(y)
    x = constrain(x + y, _ACT_AXES)
    return x, None


# ------------------------------------------------------------------------------------------
# The tower.

def patch_grid_hws(patch_image_ids: Array, image_grid_hws: Array) -> Array:
  """(h, w) of each patch's image: ids [B, P], grids [B, I, 2] -> [B, P, 2].

  Padding patches (id 0) get (1, 1) so every division stays finite; their outputs are ignored.
  """
  idx = jnp.clip(patch_image_ids - 1, 0, image_grid_hws.shape[1] - 1)
  hw = jnp.take_along_axis(image_grid_hws, idx[..., None], axis=1)
  return jnp.where(patch_image_ids[..., None] > 0, jnp.maximum(hw, 1), 1)


class MoonViT(nn.Module):
  """Patch embedding + interpolated absolute pos-emb + Lv blocks (2D RoPE) + final LayerNorm.

  __call__(patches [B, P, 588], patch_coords int [B, P, 2], patch_image_ids int [B, P],
  image_grid_hws int [B, I, 2]) -> [B, P, Dv], one vector per patch in the input order.
  Params: docs/param_tree.md `vision_tower/`.
  """
  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = 'none'
  # Its `vision_attention` kernel (else `attention`; dense or flash, `KimiVLConfig.attention_impl`)
  # computes the per-image attention; the default is dense.
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, patches: Array, patch_coords: Array, patch_image_ids: Array,
               image_grid_hws: Array) -> Array:
    cfg = self.config
    d = cfg.hidden_size
    if patches.ndim != 3 or patches.shape[-1] != cfg.patch_dim:
      raise ValueError(f'patches must be [B, P, {cfg.patch_dim}] (3 x {cfg.patch_size} x '
                       f'{cfg.patch_size} flattened channel, y, x); got {patches.shape}')
    b, p = patches.shape[:2]
    if patch_coords.shape != (b, p, 2) or patch_image_ids.shape != (b, p):
      raise ValueError(f'patch_coords {patch_coords.shape} / patch_image_ids '
                       f'{patch_image_ids.shape} do not match patches {patches.shape}')
    if image_grid_hws.ndim != 3 or image_grid_hws.shape[0] != b or image_grid_hws.shape[2] != 2:
      raise ValueError(f'image_grid_hws must be [B={b}, I, 2]; got {image_grid_hws.shape}')

    # Conv 14x14 stride 14 == linear map of the flattened (c, y, x) patch.
    x = DenseGeneral((cfg.patch_dim,), (d,), ('patch', 'vit_embed'), use_bias=True,
                     dtype=self.dtype, param_dtype=self.param_dtype, name='patch_embed')(patches)
    pos_emb = param_with_axes(self, 'pos_emb', nn.initializers.normal(stddev=0.02),
                              (cfg.pos_emb_height, cfg.pos_emb_width, d), self.param_dtype,
                              (None, None, 'vit_embed'))
    hw = patch_grid_hws(patch_image_ids, image_grid_hws)
    x = x + interpolate_pos_emb(pos_emb, patch_coords, hw).astype(self.dtype)
    x = constrain(x, _ACT_AXES)

    angles = rope_2d_angles(patch_coords, cfg.head_dim, cfg.rope_theta)

    kernel = self.kernels.vision_attention or self.kernels.attention
    args = (cfg, self.dtype, self.param_dtype, kernel)
    blocks = layer_stack(MoonViTBlock, args, length=cfg.num_layers, scan=self.scan_layers,
                         remat=self.remat_policy, broadcast=1, name='blocks')
    for block in blocks if isinstance(blocks, list) else [blocks]:
      x, _ = block(x, (patch_image_ids, angles))

    return LayerNorm(d, eps=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='final_layernorm')(x)


# ------------------------------------------------------------------------------------------
# HF layout -> packed merge-order layout (host side).

def merge_order(h: int, w: int, merge_kernel: tuple[int, int] = (2, 2)) -> np.ndarray:
  """Row-major patch indices of an (h, w) image listed in merge order.

  Merge order (what the projector's 2x2 merge reads as a reshape): the kh x kw patches of each merge
  window are consecutive, row offset then column offset (top-left, top-right, bottom-left,
  bottom-right for 2x2), windows row-major.
  """
  kh, kw = merge_kernel
  grid = np.arange(h * w).reshape(h // kh, kh, w // kw, kw)
  return grid.transpose(0, 2, 1, 3).reshape(-1)


def pack_hf_images(pixel_values, image_grid_hws, merge_kernel: tuple[int, int] = (2, 2),
                   patch_size: int = 14) -> dict[str, np.ndarray]:
  """HF inputs (one packed sequence) -> the model's batch arrays with B = 1.

  pixel_values [L, 3, ps, ps], row-major per image, images concatenated; image_grid_hws [N, 2]
  (concrete, on the host). Returns patches float32 [1, L, 3*ps*ps] in merge order, patch_coords
  int32 [1, L, 2], patch_image_ids int32 [1, L] (1..N), image_grid_hws int32 [1, N, 2].
  """
  pixel_values = np.asarray(pixel_values, dtype=np.float32)
  grids = np.asarray(image_grid_hws)
  kh, kw = merge_kernel
  if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, patch_size, patch_size):
    raise ValueError(f'pixel_values must be [L, 3, {patch_size}, {patch_size}]; got '
                     f'{pixel_values.shape}')
  if grids.ndim != 2 or grids.shape[1] != 2 or grids.shape[0] == 0:
    raise ValueError(f'image_grid_hws must be [N >= 1, 2] (h, w per image); got {grids.shape}')
  if not np.issubdtype(grids.dtype, np.integer):
    raise ValueError(f'image_grid_hws must hold integers; got dtype {grids.dtype}')
  for i, (h, w) in enumerate(grids.tolist()):
    if h <= 0 or w <= 0 or h % kh or w % kw:
      raise ValueError(f'image {i}: grid (h, w) = ({h}, {w}) must be positive multiples of the '
                       f'merge kernel {merge_kernel}')
  total = int((grids[:, 0] * grids[:, 1]).sum())
  if total != pixel_values.shape[0]:
    raise ValueError(f'pixel_values has {pixel_values.shape[0]} patches but image_grid_hws '
                     f'{grids.tolist()} needs sum(h * w) = {total}')
  order, coords, ids, start = [], [], [], 0
  for i, (h, w) in enumerate(grids.tolist()):
    perm = merge_order(h, w, merge_kernel)
    order.append(start + perm)
    coords.append(np.stack([perm // w, perm % w], axis=-1))
    ids.append(np.full(h * w, i + 1))
    start += h * w
  order = np.concatenate(order)
  return {
      'patches': pixel_values.reshape(total, -1)[order][None],
      'patch_coords': np.concatenate(coords).astype(np.int32)[None],
      'patch_image_ids': np.concatenate(ids).astype(np.int32)[None],
      'image_grid_hws': grids.astype(np.int32)[None],
  }


def hf_order(image_grid_hws, merge_kernel: tuple[int, int] = (2, 2)) -> np.ndarray:
  """Index array mapping merge order back to HF order: `hf = packed[hf_order(grids)]`."""
  grids = np.asarray(image_grid_hws)
  forward, start = [], 0
  for h, w in grids.tolist():
    forward.append(start + merge_order(h, w, merge_kernel))
    start += h * w
  return np.argsort(np.concatenate(forward))


# ------------------------------------------------------------------------------------------
# Scanned <-> unrolled block parameters (of the `vision_tower` subtree).

def stack_block_params(params: dict, config: VisionConfig) -> dict:
  """Unrolled `blocks_{i}` (scan_layers=False) -> scanned `blocks` with a leading layer axis."""
  out = dict(nn.meta.unbox(params))
  names = [f'blocks_{i}' for i in range(config.num_layers)]
  missing = [k for k in names if k not in out]
  if missing:
    raise ValueError(f'stack_block_params: no {missing} in params (have {sorted(out)})')
  out['blocks'] = jax.tree.map(lambda *a: jnp.stack(a), *[out.pop(k) for k in names])
  return out


def unstack_block_params(params: dict, config: VisionConfig) -> dict:
  """Scanned `blocks` -> unrolled `blocks_{i}`; the inverse of `stack_block_params`."""
  out = dict(nn.meta.unbox(params))
  if 'blocks' not in out:
    raise ValueError(f'unstack_block_params: no blocks in params (have {sorted(out)})')
  stacked = out.pop('blocks')
  lengths = {a.shape[0] for a in jax.tree.leaves(stacked)}
  if lengths != {config.num_layers}:
    raise ValueError(f'unstack_block_params: blocks have leading sizes {lengths}, expected '
                     f'{config.num_layers}')
  for i in range(config.num_layers):
    out[f'blocks_{i}'] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return out
