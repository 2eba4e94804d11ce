"""Expert parallelism: routed experts split over the mesh's 'expert' axis, tokens sent all-to-all.

The MoE layer (`model/moe.py`) computes the router and calls its `Kernels.routed_experts`;
`parallel.kernels.build_kernels` puts an `ExpertParallel` there when `TextConfig.moe_impl` names
one of these dispatches and the mesh's 'expert' axis is larger than 1:

* `'ep_capacity'`: every device packs its (token, expert) assignments into fixed buffers
  `[E, C, D]` (C = ceil(capacity_factor * local_tokens * K / E) slots per expert, assignments past
  that dropped in token order, like `routed_experts_capacity`), sends each expert-shard's slice to
  the device holding those experts (`all_to_all` over 'expert'), runs its E/ep experts on what it
  received, and sends the results back the same way. Static shapes, GShard-style.
* `'ep_dropless'`: nothing is dropped. Each device sends every assignment to its expert's shard
  in a buffer `[ep, t*K, D]` sized for the worst case (all local assignments to one shard) with the
  expert id of each row (padding rows get the empty id L); the receiver sorts rows by expert and
  runs grouped matmuls (`ragged_dot`) over the real rows only (the empty ones sort last, past
  the sum of the group sizes, where `ragged_dot` computes nothing). This is the path that runs on
  XLA:CPU, which lacks `ragged_all_to_all`; it moves ep times more bytes than needed.
* `'ep_ragged'`: dropless, for TPU. Assignments sorted by expert go out once each with
  `jax.lax.ragged_all_to_all` (offsets from an all-gathered [ep, ep] table of send counts), into a
  receive buffer sized for the worst case, then grouped matmuls and the reverse exchange. XLA:CPU
  cannot run it ("ragged-all-to-all is not supported"); its bookkeeping is tested on CPU with an
  all_gather-based stand-in (dispatch 'ragged_emulated') and it compiles for TPU
  topologies ahead of time (tests/parallel/test_expert.py). The unused rows of the receive buffer
  are empty (id L) and, as above, not multiplied.

The single-device dropless names ('dropless', 'dropless_blocked') also run here on an expert axis
larger than 1 (`local_dispatch`): left to XLA's sharding propagation, the grouped matmul over all
experts would all-gather every expert's weights in every layer and sort the global token list.
They take 'ragged' where the backend has `ragged_all_to_all` and 'dropless' on CPU; both are
exactly the single-device dropless computation. 'capacity' stays with XLA (its per-expert
capacity is global, which the per-shard 'ep_capacity' is not).

Sorting and un-sorting rows are gathers both ways (`moe.permute_rows`: the inverse permutation's
gather instead of a scatter, and no scatter-add in the backward pass).

All run under `shard_map` over the whole mesh: tokens stay split the way the activations are
(the mesh axes of `act_batch` and `act_len` in the rules in force), expert weights enter split
over 'expert' only (a preset that also splits `embed` over 'data', ZeRO-3 style, has XLA gather
those shards on entry). The per-device pieces (capacity slots, SwiGLU over buffers or groups, the
weighted combine) are `model/moe.py`'s. Outside a mesh, or when the 'expert' axis has size 1,
`build_kernels` keeps the single-device function of the same name (`moe.local_routed_experts`),
so a config can select them unconditionally.

Einsum letters: T tokens, K top-k, D model, E experts (L local ones), F expert ffn width, C slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from kimi_vl_jax.model import moe
from kimi_vl_jax.parallel import rules as rules_lib

Array = jax.Array
EXPERT_AXIS = 'expert'


def _local_swiglu(rows: Array, ids: Array, L: int, w_gate, w_up, w_down, dtype):
  """rows [m, D] for local experts `ids` [m] -> [m, D] in the same order. Rows with id L are
  empty (buffer padding, masked tokens): they sort last, beyond sum(group sizes), where
  `ragged_dot` computes nothing and returns 0, so only the real rows are multiplied."""
  order = jnp.argsort(ids, stable=True)
  inv = moe.inverse_permutation(order)
  sizes = jnp.bincount(ids, length=L + 1)[:L].astype(jnp.int32)             # no dummy group
  out = moe.swiglu_grouped(moe.permute_rows(rows, order, inv), w_gate.astype(dtype),
                           w_up.astype(dtype), w_down.astype(dtype), sizes)  # sorted rows
  return moe.permute_rows(out, inv, order)


def _capacity_shard(x, topk_idx, topk_weights, token_mask, w_gate, w_up, w_down, *, ep: int,
                    capacity_factor: float, dtype):
  """Per-device body of 'ep_capacity' (inside shard_map). x [t, D], w_* [L, ...] local experts."""
  t, K = topk_idx.shape
  L, D = w_gate.shape[0], x.shape[-1]
  E = L * ep
  C = moe.expert_capacity(t, K, E, capacity_factor)
  send, slots = moe.capacity_dispatch(x, topk_idx, token_mask, E, C, dtype)  # [E, C, D]
  # Expert e lives on shard e // L as its local expert e % L: [ep, L, C, D] splits by shard.
  recv = jax.lax.all_to_all(send.reshape(ep, L, C, D), EXPERT_AXIS, 0, 0)  # [src, L, C, D]
  h = recv.transpose(1, 0, 2, 3).reshape(L, ep * C, D)
  out = moe.swiglu_batched(h, w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype))
  out = out.reshape(L, ep, C, D).transpose(1, 0, 2, 3)                      # [src, L, C, D]
  back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0).reshape(E, C, D)       # my assignments
  return moe.capacity_combine(back, slots, topk_weights, dtype)


def _dropless_shard(x, topk_idx, topk_weights, token_mask, w_gate, w_up, w_down, *, ep: int,
                    dtype):
  """Per-device body of 'ep_dropless': worst-case padded all-to-all + grouped matmuls."""
  t, K = topk_idx.shape
  L, D = w_gate.shape[0], x.shape[-1]
  n = t * K
  flat_e = topk_idx.reshape(-1)
  dest, local_e = flat_e // L, flat_e % L                                   # shard, expert there
  valid = jnp.repeat(token_mask, K)
  # Row of each assignment inside its destination's buffer: rank among same-destination ones.
  onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
  row = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), dest[:, None], 1)[:, 0] - 1
  send = jnp.zeros((ep, n, D), dtype).at[dest, row].set(x.astype(dtype)[jnp.arange(n) // K])
  # Padding rows and masked tokens get id L: empty, never multiplied (`_local_swiglu`).
  ids = jnp.full((ep, n), L, jnp.int32).at[dest, row].set(jnp.where(valid, local_e, L))
  recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0).reshape(ep * n, D)
  recv_ids = jax.lax.all_to_all(ids, EXPERT_AXIS, 0, 0).reshape(ep * n)
  out = _local_swiglu(recv, recv_ids, L, w_gate, w_up, w_down, dtype).reshape(ep, n, D)
  back = jax.lax.all_to_all(out, EXPERT_AXIS, 0, 0)                        # [dest, n, D]
  ys = back[dest, row].reshape(t, K, D)
  return moe.combine(ys, topk_weights * valid.reshape(t, K), dtype)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` from all_gather + gathers, for backends without it (XLA:CPU).

  Same contract: rows `operand[input_offsets[j] : + send_sizes[j]]` land in peer j's `output` at
  `output_offsets[j]`; rows of `output` nobody writes keep their value. Moves ep times the data,
  so it only serves to test the offset bookkeeping of the ragged path on CPU.
  """
  del recv_sizes
  me = jax.lax.axis_index(axis_name)
  ops = jax.lax.all_gather(operand, axis_name)                              # [ep, N, D]
  ins = jax.lax.all_gather(input_offsets, axis_name)[:, me]                 # what source i sends me
  sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
  outs = jax.lax.all_gather(output_offsets, axis_name)[:, me]
  pos = jnp.arange(output.shape[0])
  for i in range(ops.shape[0]):
    rel = pos - outs[i]
    hit = (rel >= 0) & (rel < sizes[i])
    rows = ops[i][jnp.clip(ins[i] + rel, 0, ops.shape[1] - 1)]
    output = jnp.where(hit.reshape((-1,) + (1,) * (output.ndim - 1)), rows, output)
  return output


def _ragged_shard(x, topk_idx, topk_weights, token_mask, w_gate, w_up, w_down, *, ep: int,
                  dtype, exchange=jax.lax.ragged_all_to_all):
  """Per-device body of 'ep_ragged': dropless, each row sent once (`ragged_all_to_all`).

  Assignments are sorted by expert (hence by destination shard); a [ep, ep] table of send counts
  (all-gathered) gives every offset: source i's rows land in shard j's buffer after the rows of
  sources < i. The receive buffer holds the worst case (ep * t*K rows) so nothing is dropped.
  """
  t, K = topk_idx.shape
  L, D = w_gate.shape[0], x.shape[-1]
  n = t * K
  me = jax.lax.axis_index(EXPERT_AXIS)
  valid = jnp.repeat(token_mask, K)
  # Masked tokens are sent nowhere: give them expert id E (sorted last, never counted).
  flat_e = jnp.where(valid, topk_idx.reshape(-1), L * ep)
  rows, order, inv = moe.sort_by_expert(x.astype(dtype), flat_e, K)        # [n, D] by expert
  ids = flat_e[order]
  send_sizes = jnp.bincount(ids // L, length=ep + 1)[:ep].astype(jnp.int32)  # to each shard
  input_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
  table = jax.lax.all_gather(send_sizes, EXPERT_AXIS)                      # [src, dst]
  before = jnp.cumsum(table, axis=0) - table                                # rows of earlier srcs
  output_offsets = before[me].astype(jnp.int32)                             # in each dst buffer
  recv_sizes = table[:, me].astype(jnp.int32)
  recv_offsets = before[:, me].astype(jnp.int32)
  m = ep * n
  recv = exchange(rows, jnp.zeros((m, D), dtype), input_offsets, send_sizes, output_offsets,
                  recv_sizes, axis_name=EXPERT_AXIS)
  recv_ids = exchange(ids % L, jnp.full((m,), L, jnp.int32), input_offsets, send_sizes,
                      output_offsets, recv_sizes, axis_name=EXPERT_AXIS)   # L = empty row
  out = _local_swiglu(recv, recv_ids, L, w_gate, w_up, w_down, dtype)      # receive order
  # Back to the senders: my rows from source i return to i's buffer at its input offset for me.
  back = exchange(out, jnp.zeros((n, D), dtype), recv_offsets, recv_sizes,
                  jax.lax.all_gather(input_offsets, EXPERT_AXIS)[:, me], send_sizes,
                  axis_name=EXPERT_AXIS)                                    # [n, D] by expert
  ys = moe.permute_rows(back, inv, order).reshape(t, K, D)
  return moe.combine(ys, topk_weights * valid.reshape(t, K), dtype)


_BODIES = {
    'capacity': _capacity_shard,
    'dropless': _dropless_shard,
    'ragged': _ragged_shard,
    # The ragged bookkeeping with an all_gather-based exchange: runs anywhere, for testing on CPU.
    'ragged_emulated': functools.partial(_ragged_shard, exchange=_emulated_ragged_all_to_all),
}
# TextConfig.moe_impl -> dispatch.
DISPATCHES = {'ep_capacity': 'capacity', 'ep_dropless': 'dropless', 'ep_ragged': 'ragged'}
# Single-device names whose exact computation an expert-parallel dispatch reproduces.
LOCAL_DROPLESS = ('dropless', 'dropless_blocked')


def local_dispatch(mesh: Mesh) -> str:
  """The dispatch running the single-device dropless names on `mesh`: 'ragged' (each row sent
  once) except on XLA:CPU, which has no `ragged_all_to_all`, where it is 'dropless'."""
  platform = mesh.devices.flat[0].platform
  return 'dropless' if platform == 'cpu' else 'ragged'


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """`Kernels.routed_experts` over `mesh`'s 'expert' axis, by `dispatch` ('capacity', 'dropless',
  'ragged' or 'ragged_emulated', see the module docstring); same signature and result as
  `moe.routed_experts_capacity` / `_dropless`. Token mesh axes: those of `act_batch` and `act_len`
  in the rules in force while tracing (the pipeline narrows them), else in `rules`."""
  mesh: Mesh
  rules: tuple
  dispatch: str

  def __post_init__(self):
    if self.dispatch not in _BODIES:
      raise ValueError(f'unknown expert dispatch {self.dispatch!r}; choose one of '
                       f'{sorted(_BODIES)}')

  def __call__(self, x: Array, topk_idx: Array, topk_weights: Array, w_gate: Array, w_up: Array,
               w_down: Array, *, token_mask: Array | None = None,
               capacity_factor: float | None = None, dtype=jnp.float32) -> Array:
    mesh = self.mesh
    rules = nn.get_logical_axis_rules() or self.rules
    token_axes = tuple(a for a in (rules_lib.mesh_axes_of(rules, 'act_batch')
                                   + rules_lib.mesh_axes_of(rules, 'act_len'))
                       if a in mesh.axis_names)
    ep = mesh.shape[EXPERT_AXIS]
    E = w_gate.shape[0]
    if E % ep:
      raise ValueError(f'{E} experts cannot be split over the expert axis of size {ep}; set '
                       'parallel.expert to a divisor of n_routed_experts')
    ways = math.prod(mesh.shape[a] for a in token_axes)
    if x.shape[0] % ways:
      raise ValueError(f'{x.shape[0]} tokens do not split evenly over mesh axes {token_axes} '
                       f'({ways} ways)')
    if token_mask is None:
      token_mask = jnp.ones((x.shape[0],), jnp.bool_)
    kw = ({'capacity_factor': capacity_factor or 1.25} if self.dispatch == 'capacity' else {})
    tok = P(token_axes if token_axes else None)
    wspec = P(EXPERT_AXIS)
    fn = jax.shard_map(functools.partial(_BODIES[self.dispatch], ep=ep, dtype=dtype, **kw),
                       mesh=mesh, in_specs=(tok, tok, tok, tok, wspec, wspec, wspec),
                       out_specs=tok, check_vma=False)
    return fn(x, topk_idx, topk_weights, token_mask.astype(jnp.bool_), w_gate, w_up, w_down)
