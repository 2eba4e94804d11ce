"""Context parallelism: the sequence axis split over the mesh's 'context' axis.

When the active rule preset maps the logical `act_len` to 'context' (`dp_cp`, `fsdp_ep_cp`), every
activation `[B, T, ...]` of the language model lives on the context devices as C slices of T / C
tokens. Everything in a decoder layer is per token except attention, which is the only place a
token needs the others:

* `'all_gather'` (`ContextAttention(ring=False)`): each context shard keeps its T / C queries and
  all-gathers what the keys and values of the whole row are made of, and the segment ids, so its
  attention logits are `[B, N, T/C, T]` instead of `[B, N, T, T]`. MLA's keys and values are a
  per-token function of its latent (`mla.expand_latent`), so MLA calls `LatentContextAttention`
  (`Kernels.latent_attention`) with `[c_kv | rope(k_rope)]` (after `kv_a_layernorm` and RoPE) and
  `kv_b_proj`'s kernel: the shard gathers kv_lora_rank + qk_rope_head_dim values per token (576
  for Kimi-VL-A3B; 8.9x fewer than the expanded per-head K/V, num_heads x (qk_head_dim +
  v_head_dim) = 5,120) and expands K/V for the whole row itself, trading C x the `kv_b_proj`
  FLOPs for the bytes. The backward pass of the all-gather is a reduce-scatter of the latent's
  gradient; `kv_b_proj`'s gradient is each shard's own queries' share, summed over the shards by
  the `shard_map` (tested against one device). Causality uses each token's *original sequence
  index* (not its slot in the local buffer), which the shard computes from its `axis_index` and
  the static layout below; packed segment ids keep examples apart exactly as on one device.
  `ContextAttention(ring=False)` itself gathers given K/V (any attention with per-head K/V).
* `'ring'` (`ContextAttention(ring=True)`): expanded K/V blocks of T / C tokens travel around the
  context ring (C - 1 `ppermute`s) and are folded into an fp32 online softmax (flash attention's
  `online_softmax_fold`); blocks the causal mask cannot reach are skipped (`lax.cond`), so per-step
  scores are `[B, N, T/C, T/C]` and, in the load-balanced layout, every shard computes half a block
  per step.

Select with `TextConfig.context_parallel` ('all_gather' default, 'ring', or 'none' = leave the
sharded attention to XLA's propagation); the layout with `KimiVLConfig.context_load_balance`.
`parallel.kernels.build_kernels` puts a `ContextAttention` in the model's `Kernels.causal_attention`
(for 'all_gather' also a `LatentContextAttention` in `Kernels.latent_attention`) and, for the
balanced layout, a `LoadBalancedLayout` in `Kernels.sequence_layout`.

Load balancing ("dual chunk swap", zig-zag; Llama 3 context parallelism, Megatron-LM CP): with a
causal mask, query i sees i + 1 keys, so contiguous slices give the last shard C times the work of
the first one whenever the kernel skips fully masked blocks (flash / splash attention, ring
attention). Cutting the row into 2C equal chunks and giving shard i chunks i and 2C - 1 - i
equalises the count of unmasked (q, k) pairs (`load_balance_permutation`). The dense all-gather form
computes every [T/C, T] score block whatever the mask, so there the layout only matters for a
block-skipping kernel; the ring skips masked blocks and is balanced only in this layout. `KimiVL`
applies the permutation (`LoadBalancedLayout`) once, after the image features are scattered into the
token embeddings (the scatter fills `<|media_pad|>` slots in sequence order), to the embeddings,
positions and segment ids, runs the decoder in that order, and restores sequence order on the logits
(`to_load_balanced` / `from_load_balanced`: two `ppermute`s, each moving half of the local slice),
so callers and the loss see sequence order. RoPE reads the positions input, so it is unaffected; the
MoE is per token. KimiVL tells the decoder the layout (`LanguageModel(..., layout=...)`, passed on
to the attention), so `LanguageModel` called directly (no permutation) still masks by sequence
order. Caveat: `moe.sequence_balance_loss` finds packed sequences as *runs* of equal segment ids,
which this layout cuts at chunk boundaries, so under load balancing that auxiliary statistic (loss
weight 0 by default) differs from one device's, as does which tokens overflow with
`moe_impl='capacity'` (dropped in token order); logits, the CE loss, gradients and expert loads of
the default dropless MoE do not.

Outside a mesh, or when the context axis is 1 or not used by the rules, `build_kernels` keeps the
single-device attention and sequence order.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from kimi_vl_jax.model import attention, flash
from kimi_vl_jax.model.kernels import LOAD_BALANCED, SEQUENCE
from kimi_vl_jax.parallel import rules as rules_lib

Array = jax.Array
CONTEXT_AXIS = 'context'
LAYOUTS = (SEQUENCE, LOAD_BALANCED)

# --------------------------------------------------------------------------------------------
# Layouts of the sequence over the context shards.


def load_balance_permutation(seq_len: int, context: int) -> np.ndarray:
  """`perm [T]`: slot s of the load-balanced row holds the token at sequence index `perm[s]`.

  The row is cut into 2C chunks of T / 2C tokens; context shard i (slots [i T/C, (i+1) T/C))
  holds chunk i followed by chunk 2C - 1 - i. `x_balanced = x[:, perm]`.
  """
  check_seq_len(seq_len, context, load_balance=True)
  n = seq_len // (2 * context)
  chunks = np.arange(seq_len).reshape(2 * context, n)
  order = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
  return chunks[order].reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
  """`inv` with `inv[perm[s]] = s`, so `x_balanced[:, inv] = x`."""
  perm = np.asarray(perm)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(perm.size, dtype=perm.dtype)
  return inv


def layout_index(seq_len: int, context: int, layout: str) -> np.ndarray:
  """Sequence index of each slot [T] of a row stored in `layout` over `context` shards."""
  if layout not in LAYOUTS:
    raise ValueError(f'unknown sequence layout {layout!r}; choose one of {LAYOUTS}')
  if layout == 'load_balanced' and context > 1:
    return load_balance_permutation(seq_len, context)
  return np.arange(seq_len)


def check_seq_len(seq_len: int, context: int, *, load_balance: bool) -> None:
  ways = 2 * context if load_balance else context
  if seq_len % ways:
    why = ('load-balanced causal context parallelism cuts each row into 2 x context chunks'
           if load_balance else 'context parallelism gives each context shard T / context tokens')
    raise ValueError(f'sequence length {seq_len} is not divisible by {ways} ({why}); use a '
                     f'seq_len that is a multiple of {ways} (context axis = {context})')


# --------------------------------------------------------------------------------------------
# The mesh.


def context_size(mesh: Mesh | None, rules) -> int:
  """Number of context shards of the activations: the 'context' mesh axis size when `rules` map
  `act_len` to it, else 1 (no mesh, no such axis, or a preset without context parallelism)."""
  if mesh is None or CONTEXT_AXIS not in mesh.axis_names:
    return 1
  len_axes = rules_lib.mesh_axes_of(rules, 'act_len') if rules else ()
  if CONTEXT_AXIS not in len_axes:
    return 1
  if len_axes != (CONTEXT_AXIS,):
    raise ValueError(f'rules map act_len to {len_axes}; context parallelism supports the '
                     f"sequence split over {CONTEXT_AXIS!r} alone")
  return mesh.shape[CONTEXT_AXIS]


def _row_spec(mesh: Mesh, rules, batch: int) -> P:
  """Spec of a [B, T, ...] activation inside shard_map: rows over the mesh axes of `act_batch`
  that divide B (others replicated, as `rules.fit_spec` does), tokens over context. The rules in
  force while tracing win over `rules` (the pipeline narrows them inside its stages)."""
  rules = nn.get_logical_axis_rules() or rules
  axes = tuple(a for a in rules_lib.mesh_axes_of(rules, 'act_batch')
               if a in mesh.axis_names and a != CONTEXT_AXIS)
  while axes and batch % math.prod(mesh.shape[a] for a in axes):
    axes = axes[:-1]
  row = None if not axes else axes[0] if len(axes) == 1 else axes
  return P(row, CONTEXT_AXIS)


# --------------------------------------------------------------------------------------------
# Permuting rows between the sequence and load-balanced layouts.


def _chunk_owner(chunk: int, context: int) -> int:
  """The context shard holding sequence chunk `chunk` (of 2C) in the load-balanced layout."""
  return chunk if chunk < context else 2 * context - 1 - chunk


def _to_balanced_shard(x: Array, *, context: int) -> Array:
  """Per-shard body: shard j holds sequence chunks (2j, 2j+1); returns its balanced pair.

  Every shard has exactly one even and one odd chunk in both layouts, so the even chunks move
  with one `ppermute` and the odd ones with another (both are bijections between shards).
  """
  n = x.shape[1] // 2
  even, odd = x[:, :n], x[:, n:]
  to_even = [(j, _chunk_owner(2 * j, context)) for j in range(context)]
  to_odd = [(j, _chunk_owner(2 * j + 1, context)) for j in range(context)]
  r_even = jax.lax.ppermute(even, CONTEXT_AXIS, to_even)
  r_odd = jax.lax.ppermute(odd, CONTEXT_AXIS, to_odd)
  # Shard i holds (chunk i, chunk 2C-1-i): chunk i is its even chunk iff i is even.
  i_even = jax.lax.axis_index(CONTEXT_AXIS) % 2 == 0
  return jnp.concatenate([jnp.where(i_even, r_even, r_odd), jnp.where(i_even, r_odd, r_even)],
                         axis=1)


def _from_balanced_shard(x: Array, *, context: int) -> Array:
  """Inverse of `_to_balanced_shard`: shard i holds (chunk i, chunk 2C-1-i) -> (2j, 2j+1)."""
  n = x.shape[1] // 2
  i_even = jax.lax.axis_index(CONTEXT_AXIS) % 2 == 0
  first, second = x[:, :n], x[:, n:]
  even, odd = jnp.where(i_even, first, second), jnp.where(i_even, second, first)
  even_chunk = lambda i: i if i % 2 == 0 else 2 * context - 1 - i  # noqa: E731
  odd_chunk = lambda i: 2 * context - 1 - i if i % 2 == 0 else i  # noqa: E731
  r_even = jax.lax.ppermute(even, CONTEXT_AXIS,
                            [(i, even_chunk(i) // 2) for i in range(context)])
  r_odd = jax.lax.ppermute(odd, CONTEXT_AXIS, [(i, odd_chunk(i) // 2) for i in range(context)])
  return jnp.concatenate([r_even, r_odd], axis=1)


def _relayout(x: Array, to_balanced: bool, context: int, mesh: Mesh | None, rules) -> Array:
  if x.ndim < 2:
    raise ValueError(f'expected a [B, T, ...] array, got shape {x.shape}')
  if context == 1:
    return x
  check_seq_len(x.shape[1], context, load_balance=True)
  if mesh is None:
    # No context mesh: the same permutation as a plain gather (reference / single device).
    perm = load_balance_permutation(x.shape[1], context)
    return jnp.take(x, perm if to_balanced else inverse_permutation(perm), axis=1)
  spec = _row_spec(mesh, rules, x.shape[0])
  body = _to_balanced_shard if to_balanced else _from_balanced_shard
  fn = jax.shard_map(lambda a: body(a, context=context), mesh=mesh, in_specs=(spec,),
                     out_specs=spec)
  return fn(x)


def to_load_balanced(x: Array, context: int, mesh: Mesh | None = None, rules=()) -> Array:
  """[B, T, ...] in sequence order -> load-balanced order over `context` shards (`x[:, perm]`).

  On a mesh (its 'context' axis of size `context`) the slices move by `ppermute`; without one,
  the same permutation is a gather.
  """
  return _relayout(x, True, context, mesh, rules)


def from_load_balanced(x: Array, context: int, mesh: Mesh | None = None, rules=()) -> Array:
  """Inverse of `to_load_balanced`."""
  return _relayout(x, False, context, mesh, rules)


@dataclasses.dataclass(frozen=True)
class LoadBalancedLayout:
  """`Kernels.sequence_layout` of load-balanced context parallelism over `mesh`'s context axis."""
  mesh: Mesh | None
  rules: tuple
  context: int
  name: str = LOAD_BALANCED

  def to_layout(self, x: Array) -> Array:
    return to_load_balanced(x, self.context, self.mesh, self.rules)

  def from_layout(self, x: Array) -> Array:
    return from_load_balanced(x, self.context, self.mesh, self.rules)


# --------------------------------------------------------------------------------------------
# Attention over a context-sharded sequence.


def _gather_tokens(x):
  """[b, t, ...] on each context shard -> the whole row [b, T, ...] (a pytree, leaf by leaf); the
  backward pass is a reduce-scatter of the cotangent."""
  return jax.tree.map(lambda a: jax.lax.all_gather(a, CONTEXT_AXIS, axis=1, tiled=True), x)


def _all_gather_shard(q, k, v, q_segment_ids, kv_segment_ids, *, index: np.ndarray, scale: float,
                      kernel: attention.AttentionKernel):
  """Per-shard body: local queries [b, t] against the gathered keys / values [b, T]."""
  k, v = _gather_tokens((k, v))                                  # [b, T, N, H], [b, T, N, Hv]
  return _attend_gathered(q, k, v, q_segment_ids, _gather_tokens(kv_segment_ids), index=index,
                          scale=scale, kernel=kernel)


def _all_gather_latent_shard(q, latent, expand_params, q_segment_ids, kv_segment_ids, *,
                             expand, index: np.ndarray, scale: float,
                             kernel: attention.AttentionKernel):
  """Per-shard body: gather the latent [b, t, ...] of the row, expand K/V [b, T] here.

  `expand_params` enter replicated; the shard_map's transpose sums their gradient, each shard's
  share being its own queries' dK / dV through the gathered latent, over the context and batch
  shards (no double counting: a key's gradient is split by the queries that read it).
  """
  k, v = expand(expand_params, _gather_tokens(latent))          # [b, T, N, H], [b, T, N, Hv]
  return _attend_gathered(q, k, v, q_segment_ids, _gather_tokens(kv_segment_ids), index=index,
                          scale=scale, kernel=kernel)


def _attend_gathered(q, k, v, q_segment_ids, kv_segment_ids, *, index: np.ndarray, scale: float,
                     kernel: attention.AttentionKernel):
  """Local queries [b, t] (this shard's slots of the row) against the whole row's K/V [b, T]."""
  t = q.shape[1]
  index = jnp.asarray(index, jnp.int32)                                      # [T] sequence index
  q_index = jax.lax.dynamic_slice_in_dim(index, jax.lax.axis_index(CONTEXT_AXIS) * t, t)
  return kernel(q, k, v, q_segment_ids, kv_segment_ids, causal=True, scale=scale,
                q_positions=q_index[None], kv_positions=index[None])        # [b, t, N, Hv]


def _prepare(mesh: Mesh, rules, context: int, q: Array, kernel, layout: str):
  """(kernel, the shard_map spec of [B, T, ...] rows, the sequence index of every slot [T])."""
  if layout not in LAYOUTS:
    raise ValueError(f'unknown sequence layout {layout!r}; choose one of {LAYOUTS}')
  kernel = attention.AttentionKernel() if kernel is None else kernel
  T = q.shape[1]
  check_seq_len(T, context, load_balance=layout == LOAD_BALANCED)
  return kernel, _row_spec(mesh, rules, q.shape[0]), layout_index(T, context, layout)


@dataclasses.dataclass(frozen=True)
class ContextAttention:
  """`Kernels.causal_attention` over rows split over `mesh`'s context axis (`context` shards).

  `(q [B, T, N, H], k [B, T, N, H], v [B, T, N, Hv], segment_ids [B, T], scale, *, kernel,
  layout) -> [B, T, N, Hv]`, global shapes, rows stored in `layout`. `ring=False`: all-gather
  K/V, each shard's [T/C, T] problem on `kernel` (dense; 'flash' keeps it O(T/C x block)).
  `ring=True`: K/V blocks travel around the ring (C - 1 `ppermute`s), per-step scores
  [B, N, T/C, T/C], folded by flash's online softmax (`kernel` is not used). MLA reaches the
  all-gather form through `LatentContextAttention` (it gathers the latent instead of K/V); the
  ring keeps moving expanded K/V blocks (`build_kernels` gives it no `latent_attention`, so MLA
  expands before calling it).
  """
  mesh: Mesh
  rules: tuple
  context: int
  ring: bool = False

  def __call__(self, q: Array, k: Array, v: Array, segment_ids: Array, scale: float, *,
               kernel: attention.AttentionKernel | None = None, layout: str = SEQUENCE) -> Array:
    C = self.context
    kernel, seq, index = _prepare(self.mesh, self.rules, C, q, kernel, layout)
    if self.ring:
      body = lambda *a: _ring_shard(*a, index=index, scale=scale, context=C,  # noqa: E731
                                     layout=layout)
    else:
      body = lambda *a: _all_gather_shard(*a, index=index, scale=scale,  # noqa: E731
                                          kernel=kernel)
    # check_vma=False for the ring: under the pipeline's vmap(spmd_axis_name='pipeline') the
    # vma check rejects mixing the (pipeline-varying) blocks with the index constants inside the
    # scan / cond (jax 0.12 asks for this workaround); values and gradients are tested to match.
    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(seq,) * 5, out_specs=seq,
                       check_vma=not self.ring)
    return fn(q, k, v, segment_ids, segment_ids)


@dataclasses.dataclass(frozen=True)
class LatentContextAttention:
  """`Kernels.latent_attention` of the all-gather form over `mesh`'s context axis.

  `(q [B, T, N, H], latent, expand, expand_params, segment_ids [B, T], scale, *, kernel, layout)
  -> [B, T, N, Hv]`: `latent` is a pytree of [B, T, ...] arrays, `expand(expand_params, latent)
  -> (k, v)` works token by token, `expand_params` are replicated. Each shard all-gathers the
  latent and the segment ids of the row and expands K/V itself, then attends as
  `ContextAttention(ring=False)` does (MLA: 576 instead of 5,120 values per token for
  Kimi-VL-A3B, for C x the `kv_b_proj` FLOPs: every shard expands the whole row).
  """
  mesh: Mesh
  rules: tuple
  context: int

  def __call__(self, q: Array, latent, expand, expand_params, segment_ids: Array, scale: float,
               *, kernel: attention.AttentionKernel | None = None,
               layout: str = SEQUENCE) -> Array:
    kernel, seq, index = _prepare(self.mesh, self.rules, self.context, q, kernel, layout)
    body = lambda *a: _all_gather_latent_shard(*a, expand=expand, index=index,  # noqa: E731
                                               scale=scale, kernel=kernel)
    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(seq, seq, P(), seq, seq), out_specs=seq)
    return fn(q, latent, expand_params, segment_ids, segment_ids)


def _ring_shard(q, k, v, q_segment_ids, kv_segment_ids, *, index: np.ndarray, scale: float,
                context: int, layout: str):
  """Per-shard body of ring attention: K/V blocks travel around the context ring.

  Step 0 folds the shard's own block (the causal diagonal); step s = 1 .. C-1 receives the block
  of shard j = (i - s) mod C by one `ppermute` and folds only the part the causal mask can reach
  (online softmax, Milakov & Gimelshein 2018):

  * sequence layout: j < i is entirely visible, j > i entirely masked (skipped), so shard C-1 does
    C full blocks and shard 0 one: the ring runs at the pace of the slowest shard;
  * load-balanced layout (shard i = chunks i and 2C-1-i): for j < i only key chunk j is visible
    (to both query chunks), for j > i only query chunk 2C-1-i sees anything (both key chunks), so
    every step is exactly half a block on every shard: 2C + 2 chunk-pairs per shard instead of 4C.

  Every real row sees its own token in step 0 (same segment, equal index), so l > 0 at the end;
  padding rows see nothing (l = 0) and get 0.
  """
  C, t = context, q.shape[1]
  n = t // 2
  i = jax.lax.axis_index(CONTEXT_AXIS)
  index = jnp.asarray(index, jnp.int32)
  q_index = jax.lax.dynamic_slice_in_dim(index, i * t, t)[None]                # [1, t]
  ring = [(j, (j + 1) % C) for j in range(C)]
  def fold(carry, q, q_index, q_seg, k, v, kv_index, kv_seg):
    return flash.online_softmax_fold(carry, q, k, v, q_seg, kv_seg, q_index, kv_index,
                                     causal=True, scale=scale)

  def full(carry, blk):
    k, v, kv_seg, kv_index = blk
    return fold(carry, q, q_index, q_segment_ids, k, v, kv_index, kv_seg)

  def skip(carry, blk):
    del blk
    return carry

  def first_key_chunk(carry, blk):                      # balanced, j < i
    k, v, kv_seg, kv_index = blk
    return fold(carry, q, q_index, q_segment_ids, k[:, :n], v[:, :n], kv_index[:, :n],
                kv_seg[:, :n])

  def second_query_chunk(carry, blk):                   # balanced, j > i
    k, v, kv_seg, kv_index = blk
    late = fold(tuple(c[:, :, n:] for c in carry), q[:, n:], q_index[:, n:],
                q_segment_ids[:, n:], k, v, kv_index, kv_seg)
    return tuple(jnp.concatenate([c[:, :, :n], u], axis=2) for c, u in zip(carry, late))

  before, after = ((first_key_chunk, second_query_chunk) if layout == 'load_balanced'
                   else (full, skip))
  b, _, N, _ = q.shape
  carry = (jnp.full((b, N, t), jnp.finfo(jnp.float32).min, jnp.float32),
           jnp.zeros((b, N, t), jnp.float32), jnp.zeros((b, N, t, v.shape[-1]), jnp.float32))
  carry = full(carry, (k, v, kv_segment_ids, q_index))

  def step(state, s):
    carry, blk = state
    blk = tuple(jax.lax.ppermute(a, CONTEXT_AXIS, ring) for a in blk)
    j = (i - s) % C
    kv_index = jax.lax.dynamic_slice_in_dim(index, j * t, t)[None]
    carry = jax.lax.cond(j < i, before, after, carry, blk + (kv_index,))
    return (carry, blk), None

  if C > 1:
    (carry, _), _ = jax.lax.scan(step, (carry, (k, v, kv_segment_ids)), jnp.arange(1, C))
  _, l, acc = carry
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]                              # [b, N, t, Hv]
  return jnp.einsum('BNTH->BTNH', out).astype(v.dtype)
