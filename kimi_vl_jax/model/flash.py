"""Blockwise (flash) attention in pure JAX: O(T x block) memory for the forward and the gradient.

Same contract as `attention.segment_mask` + `attention.dot_product_attention`: query i attends key
j iff their segment ids are equal and positive (and, when causal, `q_index[i] >= kv_index[j]`),
softmax in fp32. Padding (segment 0) attends to nothing and nothing attends to it: its output
is 0 (every real row has a non-empty softmax, since a token sees itself).

Algorithm (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023, Alg. 1 and 2):

* forward: queries in blocks of `block_q`; for each, a scan over key blocks of `block_kv` keeps a
  running max m, running sum l and unnormalised output acc (all fp32, "online softmax", Milakov &
  Gimelshein 2018). Only `out` and the log-sum-exp `lse = m + log l` [B, N, T] are kept.
* backward (`jax.custom_vjp`): recomputes each block's probabilities `exp(s - lse)`; a scan over
  key blocks carries dK_j, dV_j over an inner scan over query blocks, which adds its share to
  dQ_i. With `D = rowsum(dO * O)`: dV += P^T dO, dS = P * (dO V^T - D), dQ += dS K, dK += dS^T Q.
* block skipping: a [nq, nk] table says which (query block, key block) pairs can hold an
  unmasked entry for any row of the batch (the ranges of the blocks' non-padding segment ids
  overlap, and for causal the last query index reaches the first key index); the others are
  skipped with `lax.cond`, so a causal row costs about half the blocks, a row of many small
  images only its diagonal band, and a block of padding nothing. The table is a conservative
  test: a block it keeps may still be fully masked for some rows, which the per-element mask
  handles exactly.
* `per_row=True` (a per-device call, e.g. MoonViT's): the live (row, query block, key block)
  triples are listed (`jnp.nonzero` of the per-row table, a static-size list) and a `while_loop`
  visits only the first `count` of them, forward and backward, each on its own row: no iteration
  is spent on a dead pair, a block live for one row is computed for that row only, and an
  all-padding row costs nothing. The accumulators (and dQ, dK, dV) are whole `[B, ...]` buffers
  updated in place. Under XLA's automatic sharding of the batch the dynamic row index would
  gather the batch, so callers on a mesh run it inside `shard_map` (parallel/local_attention.py).

Lengths that are not multiples of the block sizes are padded internally (padded queries get
segment -1 and are sliced off, padded keys -2, so nothing real sees them).

`attention.AttentionKernel` (what MLA and MoonViT use) selects this or the dense computation by
`KimiVLConfig.attention_impl`. `online_softmax_fold` is the forward's block step; ring attention
(`parallel/context.py`) folds the key blocks arriving from other devices with it.

Einsum letters: B batch, T query, S key, N heads, H head dim (Hv for values), I/J block counts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = float(jnp.finfo(jnp.float32).min)
_Q_PAD, _KV_PAD = -1, -2  # segment ids of internal padding: never equal to each other or real ids


def flash_attention(q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array, *,
                    causal: bool, scale: float, q_positions: Array | None = None,
                    kv_positions: Array | None = None, block_q: int = 512,
                    block_kv: int = 512, per_row: bool = False) -> Array:
  """q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv], segment ids [B, T] / [B, S] -> [B, T, N, Hv].

  `q_positions` / `kv_positions` ([B or 1, T] / [B or 1, S], default the sequence index) order the
  tokens for the causal test, as in `attention.segment_mask` (context parallelism passes each
  token's original sequence index). The result has v's dtype. `per_row`: visit only the live
  block pairs, row by row (see the module docstring); the same result.
  """
  B, T, N, H = q.shape
  S = k.shape[1]
  if k.shape != (B, S, N, H) or v.shape[:3] != (B, S, N):
    raise ValueError(f'flash_attention: q {q.shape}, k {k.shape}, v {v.shape} must be '
                     '[B, T, N, H], [B, S, N, H], [B, S, N, Hv]')
  if q_segment_ids.shape != (B, T) or kv_segment_ids.shape != (B, S):
    raise ValueError(f'flash_attention: segment ids {q_segment_ids.shape} / '
                     f'{kv_segment_ids.shape} must be [B, T]=({B}, {T}) / [B, S]=({B}, {S})')
  if block_q < 1 or block_kv < 1:
    raise ValueError(f'flash_attention: block sizes must be positive, got {block_q}, {block_kv}')
  bq, bk = min(block_q, T), min(block_kv, S)
  q_pos = _positions(q_positions, B, T, 'q_positions')
  kv_pos = _positions(kv_positions, B, S, 'kv_positions')
  # Pad to whole blocks; padded rows / keys get segment ids nothing else has.
  Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
  qs = _pad(q_segment_ids.astype(jnp.int32), Tp, _Q_PAD)
  ks = _pad(kv_segment_ids.astype(jnp.int32), Sp, _KV_PAD)
  q_pos, kv_pos = _pad(q_pos, Tp, 0), _pad(kv_pos, Sp, 0)
  q, k, v = _pad(q, Tp, 0), _pad(k, Sp, 0), _pad(v, Sp, 0)
  flash = _flash_listed if per_row else _flash
  return flash(q, k, v, qs, ks, q_pos, kv_pos, causal, float(scale), bq, bk)[:, :T]


def _positions(pos: Array | None, B: int, T: int, name: str) -> Array:
  if pos is None:
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if pos.ndim != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
    raise ValueError(f'flash_attention: {name} must be [B or 1, {T}], got {pos.shape}')
  return jnp.broadcast_to(pos.astype(jnp.int32), (B, T))


def _pad(x: Array, n: int, value) -> Array:
  if x.shape[1] == n:
    return x
  widths = [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, widths, constant_values=value)


def _blocks(x: Array, b: int) -> Array:
  """[B, T, ...] -> [T/b, B, b, ...]: the block index leads, so scans iterate over it."""
  return jnp.moveaxis(x.reshape((x.shape[0], x.shape[1] // b, b) + x.shape[2:]), 1, 0)


def _unblocks(x: Array) -> Array:
  """Inverse of `_blocks`."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def live_blocks(qs: Array, ks: Array, q_pos: Array, kv_pos: Array, causal: bool, bq: int,
                bk: int) -> Array:
  """[T/bq, S/bk] bool: may the (query block, key block) pair hold an unmasked entry in any row?
  (`row_live_blocks` taken over the batch.)"""
  return row_live_blocks(qs, ks, q_pos, kv_pos, causal, bq, bk).any(axis=0)


def row_live_blocks(qs: Array, ks: Array, q_pos: Array, kv_pos: Array, causal: bool, bq: int,
                    bk: int) -> Array:
  """[B, T/bq, S/bk] bool: may the (query block, key block) pair hold an unmasked entry in row b?

  The positive (non-padding) segment ids of a block span [lo, hi]; two blocks can share a
  segment only if the spans overlap; a block of padding only has an empty span and is never
  live. Causal: the largest query index must reach the smallest key index.
  """
  big = jnp.iinfo(jnp.int32).max

  def span(x, b):                                                             # [B, nblocks] x 2
    x = x.reshape(x.shape[0], -1, b)
    return jnp.where(x > 0, x, big).min(-1), jnp.where(x > 0, x, 0).max(-1)
  (q_lo, q_hi), (k_lo, k_hi) = span(qs, bq), span(ks, bk)
  live = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
  if causal:
    q_last = q_pos.reshape(q_pos.shape[0], -1, bq).max(-1)
    k_first = kv_pos.reshape(kv_pos.shape[0], -1, bk).min(-1)
    live &= q_last[:, :, None] >= k_first[:, None, :]
  return live


def _vma(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, 'mat', None)  # jax >= 0.9: ManualAxisType; older: aval.vma
  return frozenset(mat.varying if mat is not None else getattr(aval, 'vma', ()))


def _varying_like(xs, *refs):
  """Marks the loop carries `xs` as varying over the manual mesh axes the inputs `refs` vary
  over (inside `shard_map`, where `cond` / `scan` need equal types; a no-op outside)."""
  vma = frozenset().union(*(_vma(r) for r in refs))
  def cast(x):
    missing = tuple(sorted(vma - _vma(x)))
    return jax.lax.pcast(x, missing, to='varying') if missing else x
  return jax.tree.map(cast, xs)


def _block_logits(q, k, qs, ks, qp, kp, causal: bool, scale: float):
  """Scores and mask of one block pair: q [B, bq, N, H], k [B, bk, N, H] -> s, mask
  [B, N, bq, bk] (s fp32, masked entries set to the most negative float)."""
  mask = (qs[:, :, None] == ks[:, None, :]) & (qs > 0)[:, :, None]
  if causal:
    mask &= qp[:, :, None] >= kp[:, None, :]
  mask = mask[:, None]
  s = jnp.einsum('BTNH,BSNH->BNTS', q, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask, s, _NEG), mask


def online_softmax_fold(carry, q: Array, k: Array, v: Array, q_segment_ids: Array,
                        kv_segment_ids: Array, q_positions: Array, kv_positions: Array, *,
                        causal: bool, scale: float):
  """Folds one key block into the running (m, l, acc) of a query block (online softmax, all fp32).

  carry: m, l [B, N, tq], acc [B, N, tq, Hv]; q [B, tq, N, H], k / v [B, tk, N, .], segment ids
  [B, tq] / [B, tk], positions [B or 1, tq] / [B or 1, tk]. Masked scores contribute exactly 0, so
  a block entirely masked for a row leaves the row unchanged (a padding row keeps l = 0). The
  running max is only a numerical shift (the result does not depend on it), hence
  `stop_gradient` where the fold is differentiated by autodiff (ring attention,
  `parallel/context.py`). `out = acc / l` once every block is in (0 where l = 0).
  """
  m, l, acc = carry
  s, mask = _block_logits(q, k, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal,
                          scale)
  m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))                       # [B, N, tq]
  p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  corr = jnp.exp(m - m_new)
  pv = jnp.einsum('BNTS,BSNH->BNTH', p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv


def _forward(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk):
  """Returns out [B, T, N, Hv] (v.dtype) and lse [B, N, T] fp32 (0 for rows that see nothing)."""
  B, _, N, _ = q.shape
  Hv = v.shape[-1]
  qs, ks, qp, kp, q = jax.lax.optimization_barrier((qs, ks, qp, kp, q))  # as in `_flash_bwd`
  live = live_blocks(qs, ks, qp, kp, causal, bq, bk)                            # [I, J]
  kv_blocks = (_blocks(k, bk), _blocks(v, bk), _blocks(ks, bk), _blocks(kp, bk))

  def q_block(args):
    qi, qsi, qpi, live_i = args

    def kv_step(carry, xs):
      kj, vj, ksj, kpj, live_ij = xs

      def fold(carry):
        return online_softmax_fold(carry, qi, kj, vj, qsi, ksj, qpi, kpj, causal=causal,
                                   scale=scale)

      return jax.lax.cond(live_ij, fold, lambda c: c, carry), None

    init = (jnp.full((B, N, bq), _NEG, jnp.float32), jnp.zeros((B, N, bq), jnp.float32),
            jnp.zeros((B, N, bq, Hv), jnp.float32))
    init = _varying_like(init, q, k, v, qs, ks, qp, kp)
    (m, l, acc), _ = jax.lax.scan(kv_step, init, kv_blocks + (live_i,))
    seen = l > 0                                           # False for padding rows
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return jnp.einsum('BNTH->BTNH', out).astype(v.dtype), lse

  out, lse = jax.lax.map(q_block, (_blocks(q, bq), _blocks(qs, bq), _blocks(qp, bq), live))
  return _unblocks(out), jnp.moveaxis(lse, 0, 2).reshape(B, N, -1)     # lse [I, B, N, bq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk):
  return _forward(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk)[0]


def _flash_fwd(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk):
  out, lse = _forward(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk)
  return out, (q, k, v, qs, ks, qp, kp, out, lse)


def _flash_bwd(causal, scale, bq, bk, res, dout):
  """FlashAttention-2 backward (Dao 2023, Alg. 2): key blocks outside, query blocks inside."""
  q, k, v, qs, ks, qp, kp, out, lse = res
  # Tie the integer inputs to the cotangent: under a `lax.scan` over layers (nn.scan) the segment
  # ids are loop invariants, and JAX would hoist every block mask that depends on them alone out
  # of the layer loop, materialising all [T/bq, S/bk, B, N, bq, bk] of them (T^2 memory).
  qs, ks, qp, kp, dout = jax.lax.optimization_barrier((qs, ks, qp, kp, dout))
  B, _, N, H = q.shape
  Hv = v.shape[-1]
  live = live_blocks(qs, ks, qp, kp, causal, bq, bk)                            # [I, J]
  # D_i = rowsum(dO_i * O_i) [B, N, T]: the softmax Jacobian's correction term.
  delta = jnp.einsum('BTNH,BTNH->BNT', dout.astype(jnp.float32), out.astype(jnp.float32))
  lse_b = jnp.moveaxis(lse.reshape(B, N, -1, bq), 2, 0)                         # [I, B, N, bq]
  delta_b = jnp.moveaxis(delta.reshape(B, N, -1, bq), 2, 0)
  q_blocks = (_blocks(q, bq), _blocks(dout, bq), _blocks(qs, bq), _blocks(qp, bq), lse_b, delta_b)

  def kv_block(dq, xs):
    kj, vj, ksj, kpj, live_j = xs

    def q_step(carry, xs):
      qi, doi, qsi, qpi, lsei, di, live_ij, dqi = xs

      def grads(args):
        (dk, dv), dqi = args
        s, mask = _block_logits(qi, kj, qsi, ksj, qpi, kpj, causal, scale)
        p = jnp.where(mask, jnp.exp(s - lsei[..., None]), 0.0)                  # [B, N, bq, bk]
        dv = dv + jnp.einsum('BNTS,BTNH->BSNH', p.astype(doi.dtype), doi,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum('BTNH,BSNH->BNTS', doi, vj, preferred_element_type=jnp.float32)
        ds = (p * (dp - di[..., None]) * scale).astype(q.dtype)
        dqi = dqi + jnp.einsum('BNTS,BSNH->BTNH', ds, kj, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum('BNTS,BTNH->BSNH', ds, qi, preferred_element_type=jnp.float32)
        return (dk, dv), dqi

      return jax.lax.cond(live_ij, grads, lambda a: a, (carry, dqi))

    init = (jnp.zeros((B, bk, N, H), jnp.float32), jnp.zeros((B, bk, N, Hv), jnp.float32))
    init = _varying_like(init, *res, dout)
    (dk, dv), dq = jax.lax.scan(q_step, init, q_blocks + (live_j, dq))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = _varying_like(jnp.zeros((q.shape[1] // bq, B, bq, N, H), jnp.float32), *res, dout)
  kv_xs = (_blocks(k, bk), _blocks(v, bk), _blocks(ks, bk), _blocks(kp, bk), live.T)
  dq, (dk, dv) = jax.lax.scan(kv_block, dq0, kv_xs)
  return (_unblocks(dq).astype(q.dtype), _unblocks(dk), _unblocks(dv), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)



# ------------------------------------------------------------------------------------------
# per_row=True: a while_loop over the listed live (row, query block, key block) triples.

def live_list(qs, ks, qp, kp, causal: bool, bq: int, bk: int) -> tuple[Array, tuple]:
  """(count, (rows, query blocks, key blocks)): the live triples of `row_live_blocks` in
  row-major order, in static-size int32 arrays [B * T/bq * S/bk] of which the first `count`
  hold them."""
  live = row_live_blocks(qs, ks, qp, kp, causal, bq, bk)                      # [B, I, J]
  _, nq, nk = live.shape
  (flat,) = jnp.nonzero(live.reshape(-1), size=live.size, fill_value=0)
  flat = flat.astype(jnp.int32)
  return live.sum().astype(jnp.int32), (flat // (nq * nk), flat // nk % nq, flat % nk)


def _rows(x, r, start, size, axis=1):
  """x[r:r+1] sliced to [start, start + size) along `axis` (the block of one row)."""
  idx = [jnp.zeros((), jnp.int32)] * x.ndim
  idx[0], idx[axis] = r, start
  shape = list(x.shape)
  shape[0], shape[axis] = 1, size
  return jax.lax.dynamic_slice(x, idx, shape)


def _put(x, update, r, start, axis=1):
  idx = [jnp.zeros((), jnp.int32)] * x.ndim
  idx[0], idx[axis] = r, start
  return jax.lax.dynamic_update_slice(x, update.astype(x.dtype), idx)


def _forward_listed(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk):
  """`_forward` visiting only the listed live triples, each for its own row."""
  B, Tp, N, _ = q.shape
  Hv = v.shape[-1]
  qs, ks, qp, kp, q = jax.lax.optimization_barrier((qs, ks, qp, kp, q))
  count, (rows, qb, kb) = live_list(qs, ks, qp, kp, causal, bq, bk)

  def step(n, carry):
    m, l, acc = carry
    r, i0, j0 = rows[n], qb[n] * bq, kb[n] * bk
    block = (_rows(m, r, i0, bq, 2), _rows(l, r, i0, bq, 2), _rows(acc, r, i0, bq, 2))
    block = online_softmax_fold(
        block, _rows(q, r, i0, bq), _rows(k, r, j0, bk), _rows(v, r, j0, bk),
        _rows(qs, r, i0, bq), _rows(ks, r, j0, bk), _rows(qp, r, i0, bq), _rows(kp, r, j0, bk),
        causal=causal, scale=scale)
    return tuple(_put(x, u, r, i0, 2) for x, u in zip(carry, block))

  init = (jnp.full((B, N, Tp), _NEG, jnp.float32), jnp.zeros((B, N, Tp), jnp.float32),
          jnp.zeros((B, N, Tp, Hv), jnp.float32))
  init = _varying_like(init, q, k, v, qs, ks, qp, kp)
  m, l, acc = jax.lax.fori_loop(0, count, step, init)
  seen = l > 0                                                   # False for padding rows
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
  return jnp.einsum('BNTH->BTNH', out).astype(v.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash_listed(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk):
  return _forward_listed(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk)[0]


def _flash_listed_fwd(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk):
  out, lse = _forward_listed(q, k, v, qs, ks, qp, kp, causal, scale, bq, bk)
  return out, (q, k, v, qs, ks, qp, kp, out, lse)


def _flash_listed_bwd(causal, scale, bq, bk, res, dout):
  """`_flash_bwd`'s block step over the listed live triples; dQ, dK, dV accumulate in place."""
  q, k, v, qs, ks, qp, kp, out, lse = res
  qs, ks, qp, kp, dout = jax.lax.optimization_barrier((qs, ks, qp, kp, dout))
  count, (rows, qb, kb) = live_list(qs, ks, qp, kp, causal, bq, bk)
  delta = jnp.einsum('BTNH,BTNH->BNT', dout.astype(jnp.float32), out.astype(jnp.float32))

  def step(n, carry):
    dq, dk, dv = carry
    r, i0, j0 = rows[n], qb[n] * bq, kb[n] * bk
    qi, doi, kj, vj = (_rows(q, r, i0, bq), _rows(dout, r, i0, bq), _rows(k, r, j0, bk),
                       _rows(v, r, j0, bk))
    s, mask = _block_logits(qi, kj, _rows(qs, r, i0, bq), _rows(ks, r, j0, bk),
                            _rows(qp, r, i0, bq), _rows(kp, r, j0, bk), causal, scale)
    p = jnp.where(mask, jnp.exp(s - _rows(lse, r, i0, bq, 2)[..., None]), 0.0)
    dv_j = jnp.einsum('BNTS,BTNH->BSNH', p.astype(doi.dtype), doi,
                      preferred_element_type=jnp.float32)
    dp = jnp.einsum('BTNH,BSNH->BNTS', doi, vj, preferred_element_type=jnp.float32)
    ds = (p * (dp - _rows(delta, r, i0, bq, 2)[..., None]) * scale).astype(q.dtype)
    dq_i = jnp.einsum('BNTS,BSNH->BTNH', ds, kj, preferred_element_type=jnp.float32)
    dk_j = jnp.einsum('BNTS,BTNH->BSNH', ds, qi, preferred_element_type=jnp.float32)
    return (_put(dq, _rows(dq, r, i0, bq) + dq_i, r, i0),
            _put(dk, _rows(dk, r, j0, bk) + dk_j, r, j0),
            _put(dv, _rows(dv, r, j0, bk) + dv_j, r, j0))

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
          jnp.zeros(v.shape, jnp.float32))
  init = _varying_like(init, *res, dout)
  dq, dk, dv = jax.lax.fori_loop(0, count, step, init)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_flash_listed.defvjp(_flash_listed_fwd, _flash_listed_bwd)
