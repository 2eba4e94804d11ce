"""Masked dot-product attention shared by MLA (causal, packed segments) and MoonViT (per image).

Masks are built from segment ids, never materialised by callers: query i may attend key j iff
`q_segment_ids[i] == kv_segment_ids[j]` (and `q_pos >= kv_pos` when causal). Padding tokens carry
segment id 0 and attend only to other padding, so no softmax row is ever empty (no NaN).
Softmax in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array, *, causal: bool,
                 q_positions: Array | None = None, kv_positions: Array | None = None) -> Array:
  """Boolean mask [B, T, S] from segment ids [B, T] / [B, S].

  Causality uses the sequence index (packed examples occupy contiguous spans, so index order is
  position order inside a segment); `q_positions` / `kv_positions` override the index, which is
  what context parallelism needs when the local shard is a permuted slice of the sequence.
  """
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if causal:
    if q_positions is None:
      q_positions = jnp.arange(q_segment_ids.shape[1])[None, :]
    if kv_positions is None:
      kv_positions = jnp.arange(kv_segment_ids.shape[1])[None, :]
    mask = mask & (q_positions[:, :, None] >= kv_positions[:, None, :])
  return mask


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv], mask [B, T, S] -> [B, T, N, Hv]."""
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('BNTS,BSNH->BTNH', probs, v)
