"""Pipeline parallelism for a stack of identical layers: GPipe microbatching, optionally circular.

The decoder's MoE stack (`model/decoder.py`, L layers stacked `[L, ...]` by nn.scan) runs through
the `Pipeline` in its `Kernels` (`parallel.kernels.build_kernels` puts one there when
`KimiVLConfig.pipeline_stages > 1`). The stack is cut into S stages of consecutive layers; the stage
axis carries the logical name 'stage' (mesh axis 'pipeline' unless the active rules map 'stage'
elsewhere), so every device of a pipeline rank holds and runs only its stage's layers. The batch is
split into M microbatches that flow through the stages one iteration apart (GPipe, arXiv
1811.06965):

    iteration t: stage s runs its layers on work item k = t - s (if 0 <= k < R*M),
                 then every stage's output shifts to the next stage (`jnp.roll` on the
                 stage-sharded axis, which XLA lowers to a collective permute).

With R circular repeats (the "circular" / interleaved schedule of MaxText's `layers/pipeline.py`
and Narayanan et al. 2021) each stage holds R non-adjacent blocks of J = L/(R*S) layers: layer
`l = (r*S + s)*J + j` is block r of stage s, so the params are *viewed* as `[R, S, J, ...]` (the
stored layout stays `[L, ...]`, so checkpoints, HF import and the optimizer do not change). Work
item k is microbatch `k % M` on repeat `k // M`; a microbatch leaving the last stage waits in a
buffer until stage 0 takes it for its next repeat, which requires M >= S when R > 1.
Iterations: R*M + S - 1, of which S - 1 per stage are idle: bubble fraction (S-1)/(R*M+S-1).

Everything is a function of the stacked params and a per-layer function `layer_fn(params_l, x,
positions, segment_ids) -> (x, aux)`; positions and segment ids travel with their microbatch.
Per-layer aux comes back per microbatch (`[M, L, ...]`) for the caller to combine exactly.

Sharding inside the pipeline: the active logical rules are rewritten so that the stage mesh axes
are used only by 'stage' (e.g. `act_batch -> (data, expert, pipeline)` becomes `(data, expert)`
for the microbatch rows), and the per-stage computation is `jax.vmap(..., spmd_axis_name=<stage
mesh axes>)` so activation constraints inside the layers keep the stage axis split.

Costs and limits. Stage 0 reads and the last stage writes one microbatch of the `[M, b, T, D]`
buffer per iteration; the buffer is not split over the stage axis (each pipeline rank holds all M
microbatches of its data shard). With R > 1 the stored order of the `[L, ...]` stack (contiguous
blocks per 'pipeline' rank under the `layers -> pipeline` rule) is not the circular order, so XLA
re-lays the stack out once per step (an all-gather over 'pipeline'); R = 1 moves no weights.
Routing with fixed per-expert capacity ('capacity', 'ep_capacity') sizes buffers from the tokens
of one call, i.e. of one microbatch, so it drops differently than unpipelined unless nothing
overflows; dropless routing is exact.

Shape letters: L layers, R repeats, S stages, J layers per stage, M microbatches, b rows per
microbatch (B = M*b), T tokens, D model, I iterations.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from kimi_vl_jax.model.config import check_pipeline
from kimi_vl_jax.model.layers import remat_policy as get_remat_policy

Array = jax.Array
STAGE = 'stage'                      # logical name of the stage axis
DEFAULT_STAGE_MESH_AXES = ('pipeline',)
_ACT = ('act_batch', 'act_len', 'act_embed')
_FREE = P.UNCONSTRAINED


def num_iterations(stages: int, microbatches: int, repeats: int = 1) -> int:
  """Schedule length R*M + S - 1 (each of the R*M work items enters stage 0 once, the last one
  needs S - 1 more iterations to drain)."""
  return repeats * microbatches + stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Fraction of stage-iterations that are idle: (S-1)/(R*M+S-1); 0 without pipelining."""
  return (stages - 1) / num_iterations(stages, microbatches, repeats)


def config_bubble_fraction(config) -> float:
  """`bubble_fraction` of a `KimiVLConfig` (its pipeline_* fields), for the trainer to log."""
  return bubble_fraction(config.pipeline_stages, config.pipeline_microbatches,
                         config.pipeline_repeats)


# ---------------------------------------------------------------------------------------------
# Microbatches: microbatch m holds rows m, m + M, m + 2M, ... (a strided split), so that rows
# split over the data-like mesh axes stay on their devices; only the stage axis gathers them.

def to_microbatches(x: Array, microbatches: int) -> Array:
  """[B, ...] -> [M, B/M, ...]; microbatch m is rows m::M."""
  B = x.shape[0]
  if B % microbatches:
    raise ValueError(f'{B} rows are not divisible by pipeline_microbatches={microbatches}')
  return x.reshape((B // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)


def from_microbatches(x: Array) -> Array:
  """[M, b, ...] -> [B, ...], the inverse of `to_microbatches`."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


# ---------------------------------------------------------------------------------------------
# Logical rules inside the pipeline.

def _as_tuple(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def stage_rules(rules) -> tuple[tuple, tuple[str, ...]]:
  """(rules for inside the pipeline, stage mesh axes).

  The stage axis takes the mesh axes of a 'stage' rule if the preset has one, else 'pipeline';
  every other rule loses those axes (they are busy with stages), the rest of its axes stay.
  """
  rules = tuple(rules or ())
  stage_axes = next((_as_tuple(v) for k, v in rules if k == STAGE), DEFAULT_STAGE_MESH_AXES)
  inner = [(STAGE, stage_axes if len(stage_axes) != 1 else stage_axes[0])]
  for k, v in rules:
    if k == STAGE:
      continue
    rest = tuple(a for a in _as_tuple(v) if a not in stage_axes)
    inner.append((k, None if not rest else rest[0] if len(rest) == 1 else rest))
  return tuple(inner), stage_axes


def _stage_mesh(stage_axes, stages: int):
  """The stage mesh axes present in the active mesh (for vmap's spmd_axis_name), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not all(a in mesh.axis_names for a in stage_axes):
    return None
  ways = int(np.prod([mesh.shape[a] for a in stage_axes]))
  if stages % ways:
    raise ValueError(f'pipeline_stages={stages} is not divisible by the {ways} devices of mesh '
                     f'axes {stage_axes} that hold the stages')
  return stage_axes[0] if len(stage_axes) == 1 else stage_axes


def _check_microbatch_rows(rows: int, inner_rules) -> None:
  """A microbatch's rows are split over the non-stage batch mesh axes: they must divide."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = [a for a in next((_as_tuple(v) for k, v in inner_rules if k == 'act_batch'), ())
          if a in mesh.axis_names]
  ways = int(np.prod([mesh.shape[a] for a in axes]))
  if rows % ways:
    raise ValueError(f'each pipeline microbatch has {rows} rows, not divisible by the {ways} '
                     f'devices of mesh axes {tuple(axes)} that split it; use a batch size that is '
                     f'a multiple of pipeline_microbatches x {ways}')


# ---------------------------------------------------------------------------------------------
# The schedule.

def pipeline(layer_fn: Callable, params: Any, x: Array, positions: Array, segment_ids: Array, *,
             stages: int, microbatches: int, repeats: int = 1, remat_policy: str = 'none'
             ) -> tuple[Array, Any]:
  """Runs the L stacked layers of `params` over x [B, T, D] as an S-stage pipeline.

  Args:
    layer_fn: `(params_l, x [b, T, D], positions [b, T], segment_ids [b, T]) -> (x, aux)` for one
      layer; params_l is `params` without the leading layer axis. Must be pure.
    params: pytree of stacked layer parameters, every leaf `[L, ...]`.
    x, positions, segment_ids: the whole batch, [B, T, D] / [B, T] / [B, T].
    stages, microbatches, repeats: S, M, R (L divisible by S*R, B by M, M >= S if R > 1).
    remat_policy: a `layers.remat_policy` name, applied to every layer of every stage iteration.
  Returns:
    (y [B, T, D] = the layers applied in order to every row, aux with leaves [M, L, ...]: the
    per-layer aux of microbatch m = rows m::M, bubble iterations excluded).
  """
  S, M, R = stages, microbatches, repeats
  lengths = {a.shape[0] for a in jax.tree.leaves(params)}
  if len(lengths) != 1:
    raise ValueError(f'pipeline: stacked params have different leading sizes {lengths}')
  L = lengths.pop()
  J = check_pipeline(L, S, M, R, batch=x.shape[0])
  rules = nn.get_logical_axis_rules()
  inner, stage_axes = stage_rules(rules)
  spmd = _stage_mesh(stage_axes, S) if rules else None
  if spmd is not None:
    _check_microbatch_rows(x.shape[0] // M, inner)
  ctx = nn.logical_axis_rules(inner) if rules else contextlib.nullcontext()
  with ctx:
    return _schedule(layer_fn, params, x, positions, segment_ids, S, M, R, J, remat_policy, spmd)


def _schedule(layer_fn, params, x, positions, segment_ids, S, M, R, J, remat, spmd):
  cons = nn.with_logical_constraint
  # View each [L, ...] leaf as [R, S, J, ...]: layer (r*S + s)*J + j is layer j of stage s in
  # repeat r. Only the stage axis is pinned; the per-layer dims keep the sharding they came with.
  def split(w):
    w = w.reshape((R, S, J) + w.shape[1:])
    return cons(w, (None, STAGE, None) + (_FREE,) * (w.ndim - 3))
  w_rsj = jax.tree.map(split, params)

  def select_repeat(r):
    """Per-stage weights [S, J, ...] of repeat r[s] (the repeat each stage is working on)."""
    if R == 1:
      w = jax.tree.map(lambda a: a[0], w_rsj)
    else:
      w = jax.tree.map(lambda a: jax.vmap(lambda a_s, i: a_s[i], in_axes=(1, 0))(a, r), w_rsj)
    return jax.tree.map(lambda a: cons(a, (STAGE, None) + (_FREE,) * (a.ndim - 2)), w)

  layer = layer_fn
  if remat != 'none':
    layer = jax.checkpoint(layer_fn, policy=get_remat_policy(remat), prevent_cse=False)

  def stage(w_s, h, pos, seg):
    """One stage on one microbatch: its J layers in order. h [b, T, D] -> (h, aux [J, ...])."""
    return jax.lax.scan(lambda h, w_l: layer(w_l, h, pos, seg), h, w_s)

  run_stages = jax.vmap(stage, spmd_axis_name=spmd)

  buf = cons(to_microbatches(x, M), (None,) + _ACT)                     # [M, b, T, D]
  pos_mb = cons(to_microbatches(positions, M), (None, 'act_batch', 'act_len'))
  seg_mb = cons(to_microbatches(segment_ids, M), (None, 'act_batch', 'act_len'))
  stage_ids = jnp.arange(S)

  def iteration(carry, t):
    state, buf = carry                          # stage inputs [S, b, T, D], microbatches
    k = t - stage_ids                           # [S] work item of each stage
    m, r = k % M, jnp.clip(k // M, 0, R - 1)
    # Stage 0 takes work item t: microbatch t % M, fresh (repeat 0) or back from the last stage.
    feed = jax.lax.dynamic_index_in_dim(buf, t % M, 0, keepdims=False)
    state = jnp.where((stage_ids == 0)[:, None, None, None], feed[None], state)
    state = cons(state, (STAGE,) + _ACT)
    pos = cons(jnp.take(pos_mb, m, axis=0), (STAGE, 'act_batch', 'act_len'))
    seg = cons(jnp.take(seg_mb, m, axis=0), (STAGE, 'act_batch', 'act_len'))
    out, aux = run_stages(select_repeat(r), state, pos, seg)
    out = cons(out, (STAGE,) + _ACT)
    # The last stage finished work item t - (S-1): store it in its microbatch's slot.
    done = t - (S - 1)
    slot = done % M
    old = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)
    buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(done >= 0, out[S - 1], old), slot, 0)
    buf = cons(buf, (None,) + _ACT)
    state = jnp.roll(out, 1, axis=0)            # stage s output -> stage s+1 input
    return (state, buf), aux

  state0 = jnp.zeros((S,) + buf.shape[1:], buf.dtype)
  I = R * M + S - 1
  (_, buf), aux = jax.lax.scan(iteration, (state0, buf), jnp.arange(I))   # aux [I, S, J, ...]
  y = cons(from_microbatches(buf), _ACT)
  # Work item (microbatch m, repeat r) ran on stage s at iteration t = r*M + m + s.
  mi, ri, si = np.meshgrid(np.arange(M), np.arange(R), np.arange(S), indexing='ij')
  t_idx = ri * M + mi + si                                              # [M, R, S]
  aux = jax.tree.map(lambda a: a[t_idx, si].reshape((M, R * S * J) + a.shape[3:]), aux)
  return y, aux


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The `Kernels.pipeline` of a pipelined run: `pipeline` with this schedule, the per-microbatch
  aux recombined by the caller's `combine_aux(aux [M, L, ...], segment_ids [M, b, T])`."""
  stages: int
  microbatches: int
  repeats: int = 1
  remat_policy: str = 'none'

  def __call__(self, layer_fn: Callable, params: Any, x: Array, positions: Array,
               segment_ids: Array, *, combine_aux: Callable) -> tuple[Array, Any]:
    y, aux = pipeline(layer_fn, params, x, positions, segment_ids, stages=self.stages,
                      microbatches=self.microbatches, repeats=self.repeats,
                      remat_policy=self.remat_policy)
    return y, combine_aux(aux, to_microbatches(segment_ids, self.microbatches))
