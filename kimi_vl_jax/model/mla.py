"""Multi-head Latent Attention (MLA), DeepSeek-V2 section 2.1 / DeepSeek-V3 section 2.1.1.

Keys and values come from a low-rank latent: `c_kv = RMSNorm(x W_dkv)` (rank R), expanded per head
by `kv_b_proj` into `[k_nope | v]`; a single decoupled RoPE key `k_rope` (Hr dims) is shared by all
heads. Queries are `x W_q` or, with `q_lora_rank`, `RMSNorm(x W_dq) W_uq`, each head
`[q_nope | q_rope]`.
Scores use `[q_nope | rope(q_rope)] . [k_nope | rope(k_rope)]`.

Numerics follow transformers' `DeepseekV3Attention` (rope_interleave=True): RoPE frequencies in
fp32, optional YaRN scaling (`rope_scaling`), softmax scale `Hqk^-0.5 * mscale(factor,
mscale_all_dim)^2`, fp32 softmax. The causal + segment-masked attention is the given `Kernels`'
`causal_attention` (by default `attention.causal_attention` on one device), so packed examples
never attend to each other. Keys and values are a per-token function of the latent
`[c_kv | rope(k_rope)]` (`expand_latent`); a `Kernels.latent_attention` (context parallelism's
all-gather) receives the latent, the expansion and `kv_b_proj`'s kernel instead of K/V, so it can
move the R + Hr values per token (576 for Kimi-VL-A3B) rather than the expanded
N x (Hn + Hr + Hv) (5,120) and expand where the keys are used.

Decoding with a KV cache (`docs/sampling.md`): the cache holds, per token, only the normalised
latent `c_kv` [R] and the rotated rope key `k_rope` [Hr] (576 values for Kimi-VL-A3B). `mode`
selects what the module does with it:

* 'train': the attention above over the whole sequence; returns out.
* 'prefill': the same computation; also returns this call's cache entries `(c_kv, k_rope)`.
* 'decode': queries at `positions` (consecutive per row) over a cache `(c_kv [B, S, R], k_rope
  [B, S, Hr])` whose slot s holds position s: each query sees the slots before its row's first
  new position and the new tokens up to itself; the cache is only read, the caller writes the
  returned entries at `positions`. With `absorb` (DeepSeek-V2 section 2.1.3, "absorbed" inference) `kv_b_proj`
  is split into W_UK [R, N, Hn] and W_UV [R, N, Hv]: `q_lat = q_nope W_UK^T`, scores
  `q_lat . c_kv + q_rope . k_rope`, output `(softmax . c_kv) W_UV`, so decode reads only the
  latent cache; without it the cache is expanded to per-head K/V every step (the same numbers).
  Returns (out, new entries).

Einsum letters: B batch, T query, S key, D model, N heads, H head dim, R lora rank.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.model.attention import dot_product_attention
from kimi_vl_jax.model.config import TextConfig
from kimi_vl_jax.model.kernels import Kernels
from kimi_vl_jax.model.layers import Einsum, RMSNorm, apply_rope_interleaved, constrain

Array = jax.Array
MODES = ('train', 'prefill', 'decode')


# ---------------------------------------------------------------------------------------------
# RoPE (1D) with optional YaRN scaling.

def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature `0.1 * mscale * ln(scale) + 1` (1 when not extending)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(config: TextConfig) -> tuple[np.ndarray, float, float]:
  """Returns (inv_freq fp32 [Hr/2], attention_factor, softmax_scale) for the MLA rope part.

  Mirrors transformers' `_compute_default_rope_parameters` / `_compute_yarn_parameters` (YaRN,
  arXiv 2309.00071: per-frequency blend of interpolation and extrapolation with a linear ramp over
  the dims between the beta_fast and beta_slow rotation counts) and DeepSeek's `yarn_apply_mscale`.
  Computed in fp32 numpy in the same order as the reference, so angles match to the last ulp or so.
  """
  dim, base = config.qk_rope_head_dim, np.float32(config.rope_theta)
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  softmax_scale = config.qk_head_dim ** -0.5
  rs = config.rope_scaling_dict
  rope_type = 'default' if rs is None else rs.get('rope_type', rs.get('type', 'default'))
  if rope_type == 'default':
    return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0, softmax_scale
  if rope_type != 'yarn':
    raise ValueError(f'rope_scaling rope_type={rope_type!r} is not supported by MLA (only '
                     "'default' and 'yarn', as DeepSeek-V3 uses)")
  original = rs.get('original_max_position_embeddings') or config.max_position_embeddings
  factor = rs.get('factor') or config.max_position_embeddings / original
  mscale, mscale_all_dim = rs.get('mscale'), rs.get('mscale_all_dim')
  attention_factor = rs.get('attention_factor')
  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = _yarn_mscale(factor)
  beta_fast, beta_slow = rs.get('beta_fast') or 32, rs.get('beta_slow') or 1

  def correction_dim(num_rotations):  # the dim whose wavelength fits `num_rotations` times
    return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rs.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # the reference's guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1).astype(np.float32)
  extrapolation = np.float32(1) - ramp
  inv_freq = ((np.float32(1) / (np.float32(factor) * pos_freqs)) * (np.float32(1) - extrapolation)
              + (np.float32(1) / pos_freqs) * extrapolation)
  if mscale_all_dim:
    softmax_scale *= _yarn_mscale(factor, mscale_all_dim) ** 2
  return inv_freq.astype(np.float32), float(attention_factor), softmax_scale


def rope_cos_sin(positions: Array, inv_freq: np.ndarray, attention_factor: float
                 ) -> tuple[Array, Array]:
  """positions [B, T] -> cos, sin [B, T, Hr/2] in fp32 (scaled by YaRN's attention_factor)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def heads_kv(kv: Array, k_rope: Array, nope_dim: int) -> tuple[Array, Array]:
  """kv [B, S, N, Hn + Hv] = `c_kv kv_b_proj`, k_rope [B, S, Hr] (rotated, shared by the heads)
  -> k [B, S, N, Hn + Hr] = `[k_nope | k_rope]`, v [B, S, N, Hv]."""
  k_nope, v = kv[..., :nope_dim], kv[..., nope_dim:]
  k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:-1] + k_rope.shape[-1:])
  return jnp.concatenate([k_nope, k_rope], axis=-1), v


def expand_latent(w_kv: Array, latent: Array, *, nope_dim: int, dtype=jnp.float32
                  ) -> tuple[Array, Array]:
  """Per-head keys and values from the per-token latent (DeepSeek-V2 section 2.1.2).

  w_kv [R, N, Hn + Hv] (`kv_b_proj`'s kernel in the compute dtype), latent [B, S, R + Hr] =
  `[c_kv | rope(k_rope)]` -> `heads_kv(c_kv W_kv, k_rope)`: the same einsum as `kv_b_proj`.
  Token by token, so it commutes with moving tokens between devices: context parallelism
  gathers the 576-value latent (Kimi-VL-A3B) and expands after the gather.
  """
  R = w_kv.shape[0]
  ckv, k_rope = latent[..., :R], latent[..., R:]
  kv = jnp.einsum('BSR,RNH->BSNH', ckv.astype(dtype), w_kv.astype(dtype))
  return heads_kv(kv, k_rope.astype(dtype), nope_dim)


# ---------------------------------------------------------------------------------------------

class MLA(nn.Module):
  """MLA self-attention: x [B, T, D], positions [B, T], segment_ids [B, T] -> [B, T, D].

  Causal within each segment; segment id 0 marks padding (it attends to nothing). Parameter
  layout: docs/param_tree.md (`self_attn/...`), heads kept in checkpoint order.
  """
  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # The attention computation (`Kernels.causal_attention` with `Kernels.attention` as the
  # per-device kernel); the default is dense, on one device.
  kernels: Kernels = Kernels()
  layout: str = 'sequence'  # the order of the rows (`Kernels.layout` of the caller)
  mode: str = 'train'       # 'train' | 'prefill' | 'decode' (module docstring)
  absorb: bool = True       # decode: weight-absorbed attention over the latent cache

  def _proj(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> Einsum:
    return Einsum(shape, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _norm(self, name: str, features: int) -> RMSNorm:
    # transformers builds both latent norms with DeepseekV3RMSNorm's default eps (1e-6).
    return RMSNorm(features, eps=self.config.kv_lora_norm_eps, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array,
               cache: tuple[Array, Array] | None = None):
    t = self.config
    if self.mode not in MODES:
      raise ValueError(f'MLA mode {self.mode!r}: choose one of {MODES}')
    if (cache is not None) != (self.mode == 'decode'):
      raise ValueError(f"MLA: a cache is given exactly in 'decode' mode (mode={self.mode!r})")
    D, N, R = t.hidden_size, t.num_heads, t.kv_lora_rank
    Hn, Hr, Hv, Hqk = t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim, t.qk_head_dim
    if x.shape[-1] != D:
      raise ValueError(f'MLA expects hidden size {D}, got input of shape {x.shape}')

    # Queries: plain projection or low-rank (q_lora) with a norm on the latent.
    if t.q_lora_rank is None:
      q = self._proj('q_proj', (D, N, Hqk), ('embed', 'heads', 'kv'))('BTD,DNH->BTNH', x)
    else:
      Rq = t.q_lora_rank
      cq = self._proj('q_a_proj', (D, Rq), ('embed', 'q_lora'))('BTD,DR->BTR', x)
      cq = self._norm('q_a_layernorm', Rq)(cq)
      q = self._proj('q_b_proj', (Rq, N, Hqk), ('q_lora', 'heads', 'kv'))('BTR,RNH->BTNH', cq)
    q = constrain(q, ('act_batch', 'act_len', 'act_heads', 'act_kv'))
    q_nope, q_rope = q[..., :Hn], q[..., Hn:]

    # Keys / values: one projection gives the latent [R] and the shared rope key [Hr].
    ckv = self._proj('kv_a_proj_with_mqa', (D, R + Hr), ('embed', 'kv_lora'))('BSD,DR->BSR', x)
    ckv, k_rope = ckv[..., :R], ckv[..., R:]                        # [B, S, R], [B, S, Hr]
    ckv = self._norm('kv_a_layernorm', R)(ckv)
    kv_b_proj = self._proj('kv_b_proj', (R, N, Hn + Hv), ('kv_lora', 'heads', 'kv'))

    inv_freq, attention_factor, scale = rope_parameters(t)
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)  # [B, T, Hr/2]
    q_rope = apply_rope_interleaved(q_rope, cos[:, :, None, :], sin[:, :, None, :])
    k_rope = apply_rope_interleaved(k_rope, cos, sin)               # [B, S, Hr], shared by heads
    o_proj = self._proj('o_proj', (N, Hv, D), ('heads', 'kv', 'embed'))
    if self.mode == 'decode':
      out, entries = self._decode(q_nope, q_rope, ckv, k_rope, positions, cache, kv_b_proj, scale)
      return o_proj('BTNH,NHD->BTD', out), entries

    q = jnp.concatenate([q_nope, q_rope], axis=-1)                  # [B, T, N, Hqk]
    kw = dict(kernel=self.kernels.attention, layout=self.layout)
    if self.kernels.latent_attention is None:
      # Expand here, then the (single-device or context-parallel) attention over K/V.
      k, v = heads_kv(kv_b_proj('BSR,RNH->BSNH', ckv), k_rope, Hn)  # [B, S, N, Hqk], [.., Hv]
      out = self.kernels.causal_attention(q, k, v, segment_ids, scale, **kw)
    else:
      # The kernel expands the latent [c_kv | rope(k_rope)] [B, S, R + Hr] where it wants
      # (context parallelism: after gathering it), with kv_b_proj's kernel read in the compute
      # dtype (an einsum with the scalar 1, as `_decode` does).
      latent = jnp.concatenate([ckv, k_rope], axis=-1)
      w_kv = kv_b_proj(',RNH->RNH', jnp.ones((), self.dtype))       # [R, N, Hn + Hv]
      expand = functools.partial(expand_latent, nope_dim=Hn, dtype=self.dtype)
      out = self.kernels.latent_attention(q, latent, expand, w_kv, segment_ids, scale, **kw)
    out = constrain(out, ('act_batch', 'act_len', 'act_heads', 'act_kv'))
    out = o_proj('BTNH,NHD->BTD', out)
    if self.mode == 'prefill':
      return out, (ckv, k_rope)
    return out

  def _decode(self, q_nope: Array, q_rope: Array, ckv: Array, k_rope: Array, positions: Array,
              cache: tuple[Array, Array], kv_b_proj: Einsum, scale: float):
    """Attention of the T new queries over the cache and over their own entries.

    q_nope [B, T, N, Hn], q_rope [B, T, N, Hr] (rotated), ckv [B, T, R], k_rope [B, T, Hr]
    (rotated), positions [B, T] (consecutive per row; = cache slots), cache ([B, S, R],
    [B, S, Hr]) -> (out [B, T, N, Hv], (ckv, k_rope) in the cache dtype, for the caller to
    write at `positions`).

    The cache is only read: a query sees the cache slots before its row's first new position
    and the new tokens up to itself, one softmax over both.
    """
    t = self.config
    Hn = t.qk_nope_head_dim
    cache_ckv, cache_rope = cache
    B, S = cache_ckv.shape[:2]
    if cache_ckv.shape != (B, S, t.kv_lora_rank) or cache_rope.shape != (B, S, t.qk_rope_head_dim):
      raise ValueError(f'MLA decode: cache shapes {cache_ckv.shape}, {cache_rope.shape} must be '
                       f'[B, S, {t.kv_lora_rank}] and [B, S, {t.qk_rope_head_dim}]')
    entries = (ckv.astype(cache_ckv.dtype), k_rope.astype(cache_rope.dtype))
    # Round the new entries through the cache dtype, so a step sees what later steps will read.
    ckv, k_rope = (e.astype(self.dtype) for e in entries)
    c, kr = cache_ckv.astype(self.dtype), cache_rope.astype(self.dtype)
    T = positions.shape[1]
    mask = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(S)[None, None, :] < positions[:, :1, None], (B, T, S)),
        positions[:, :, None] >= positions[:, None, :]], axis=-1)            # [B, T, S + T]
    if not self.absorb:
      c_all, kr_all = jnp.concatenate([c, ckv], 1), jnp.concatenate([kr, k_rope], 1)
      kv = kv_b_proj('BSR,RNH->BSNH', c_all)
      k = jnp.concatenate(
          [kv[..., :Hn], jnp.broadcast_to(kr_all[:, :, None, :], kv.shape[:-1] + kr.shape[-1:])],
          -1)
      q = jnp.concatenate([q_nope, q_rope], axis=-1)
      return dot_product_attention(q, k, kv[..., Hn:], mask, scale), entries
    # The kernel itself: an einsum with the scalar 1 reads it in the compute dtype.
    w = kv_b_proj(',RNH->RNH', jnp.ones((), self.dtype))                      # [R, N, Hn + Hv]
    w_uk, w_uv = w[..., :Hn], w[..., Hn:]
    q_lat = jnp.einsum('BTNH,RNH->BTNR', q_nope, w_uk)

    def scores(c_, kr_):                                                      # [B, N, T, S]
      return (jnp.einsum('BTNR,BSR->BNTS', q_lat, c_, preferred_element_type=jnp.float32)
              + jnp.einsum('BTNH,BSH->BNTS', q_rope, kr_, preferred_element_type=jnp.float32))

    logits = jnp.concatenate([scores(c, kr), scores(ckv, k_rope)], axis=-1) * scale
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)                # [B, N, T, S + T]
    o_lat = (jnp.einsum('BNTS,BSR->BTNR', probs[..., :S], c)
             + jnp.einsum('BNTS,BSR->BTNR', probs[..., S:], ckv))
    return jnp.einsum('BTNR,RNH->BTNH', o_lat, w_uv), entries
