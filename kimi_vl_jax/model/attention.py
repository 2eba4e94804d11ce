"""Masked dot-product attention shared by MLA (causal, packed segments) and MoonViT (per image).

Masks are built from segment ids, never materialised by callers: query i may attend key j iff
`q_segment_ids[i] == kv_segment_ids[j] > 0` (and `q_pos >= kv_pos` when causal). Padding tokens
carry segment id 0 and attend to nothing: their output is 0 (not NaN; a real token always sees
itself, so its softmax row is never empty). Nothing real depends on padding outputs, and with
nothing to attend to the blockwise kernel skips padding blocks entirely. Softmax in fp32.

`AttentionKernel` picks how the masked attention is computed on one device: 'dense' (the functions
above: `[B, N, T, S]` fp32 scores) or 'flash' (`flash.py`: blockwise, online softmax, recomputing
backward), chosen by `KimiVLConfig.attention_impl` for MLA and MoonViT alike.

`causal_attention` is the decoder's single-device causal attention; it is the default
`Kernels.causal_attention` (`model/kernels.py`), which a context-parallel run replaces by a
function with the same signature over the sharded sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kimi_vl_jax.model import flash

Array = jax.Array


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array, *, causal: bool,
                 q_positions: Array | None = None, kv_positions: Array | None = None) -> Array:
  """Boolean mask [B, T, S] from segment ids [B, T] / [B, S].

  Causality uses the sequence index (packed examples occupy contiguous spans, so index order is
  position order inside a segment); `q_positions` / `kv_positions` override the index, which is
  what context parallelism needs when the local shard is a permuted slice of the sequence.
  """
  mask = ((q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
          & (q_segment_ids > 0)[:, :, None])
  if causal:
    if q_positions is None:
      q_positions = jnp.arange(q_segment_ids.shape[1])[None, :]
    if kv_positions is None:
      kv_positions = jnp.arange(kv_segment_ids.shape[1])[None, :]
    mask = mask & (q_positions[:, :, None] >= kv_positions[:, None, :])
  return mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv], mask [B, T, S] -> [B, T, N, Hv]; a query
  whose mask row is empty (padding) gets 0."""
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BNTS,BSNH->BTNH', probs, v)
  return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(out.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
  """The attention computation selected by `KimiVLConfig.attention_impl` (hashable, so modules can
  hold it as a field): 'dense' (`attention.segment_mask` + `dot_product_attention`) or 'flash'
  (`flash.flash_attention`, blocks of block_q x block_kv, O(T x block) memory). Same arguments and
  result either way. `per_row` (flash only): decide block skipping row by row, for calls that
  run per device (see `flash.flash_attention`)."""
  impl: str = 'dense'
  block_q: int = 512
  block_kv: int = 512
  per_row: bool = False

  def __post_init__(self):
    if self.impl not in ('dense', 'flash'):
      raise ValueError(f"attention impl {self.impl!r}: choose 'dense' or 'flash'")

  def __call__(self, q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array,
               *, causal: bool, scale: float, q_positions: Array | None = None,
               kv_positions: Array | None = None) -> Array:
    """q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv] -> [B, T, N, Hv] (v's dtype)."""
    if self.impl == 'flash':
      return flash.flash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal,
                                   scale=scale, q_positions=q_positions, kv_positions=kv_positions,
                                   block_q=self.block_q, block_kv=self.block_kv,
                                   per_row=self.per_row)
    mask = segment_mask(q_segment_ids, kv_segment_ids, causal=causal,
                        q_positions=q_positions, kv_positions=kv_positions)
    return dot_product_attention(q, k, v, mask, scale)


def attention_kernel(config) -> AttentionKernel:
  """The kernel a `KimiVLConfig` selects (attention_impl, attention_block_q / _kv)."""
  return AttentionKernel(config.attention_impl, config.attention_block_q,
                         config.attention_block_kv)


def causal_attention(q: Array, k: Array, v: Array, segment_ids: Array, scale: float, *,
                     kernel: AttentionKernel | None = None, layout: str = 'sequence') -> Array:
  """Causal attention within packed segments on one device: q [B, T, N, H], k [B, T, N, H],
  v [B, T, N, Hv], segment_ids [B, T] -> [B, T, N, Hv], scores by `kernel` (default dense).

  `layout` is the order the rows are stored in; one device only has sequence order (the
  load-balanced order of context parallelism needs the context-parallel attention).
  """
  if layout != 'sequence':
    raise ValueError(f'rows are in the {layout!r} layout but the causal attention is the '
                     'single-device one; build the kernels with parallel.kernels.build_kernels')
  kernel = AttentionKernel() if kernel is None else kernel
  return kernel(q, k, v, segment_ids, segment_ids, causal=True, scale=scale)
