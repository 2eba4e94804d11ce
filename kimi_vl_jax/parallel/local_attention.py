"""Per-device attention: the kernel under `shard_map` over the batch axes, so every device skips
the blocks its own rows do not need.

Under XLA's automatic sharding, a `lax.cond` whose predicate comes from batch-sharded segment ids
is decided for the global batch: flash attention (`model/flash.py`) would run a block pair on
every device as soon as any row anywhere needs it, so a device holding text-only rows (all
padding in MoonViT) would run attention over the images of the others. `LocalAttention` runs the
per-device kernel inside `shard_map` with the rows split over the mesh axes of `act_batch` (those
dividing the batch, as `rules.fit_spec` does), so the block table is each device's own; with
`per_row` (MoonViT's kernel) it is decided row by row, and an all-padding row costs nothing.
Same arguments and result as the kernel it wraps. `parallel.kernels.build_kernels` puts it in
`Kernels.vision_attention` on a mesh when `attention_impl='flash'` (dense attention computes every
score anyway).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, PartitionSpec as P

from kimi_vl_jax.model import attention
from kimi_vl_jax.parallel import rules as rules_lib

Array = jax.Array


def row_axes(mesh: Mesh, rules, batch: int) -> tuple[str, ...]:
  """The mesh axes of `act_batch` (in the rules in force while tracing, else `rules`) that split
  `batch` rows evenly, outermost first."""
  rules = nn.get_logical_axis_rules() or rules
  axes = tuple(a for a in rules_lib.mesh_axes_of(rules, 'act_batch') if a in mesh.axis_names)
  while axes and batch % math.prod(mesh.shape[a] for a in axes):
    axes = axes[:-1]
  return axes


@dataclasses.dataclass(frozen=True)
class LocalAttention:
  """`kernel` run per device over the rows split across `mesh`'s batch axes (module docstring)."""
  mesh: Mesh
  rules: tuple
  kernel: attention.AttentionKernel

  def __call__(self, q: Array, k: Array, v: Array, q_segment_ids: Array, kv_segment_ids: Array,
               *, causal: bool, scale: float, q_positions: Array | None = None,
               kv_positions: Array | None = None) -> Array:
    B = q.shape[0]
    axes = row_axes(self.mesh, self.rules, B)
    rows = P(axes if axes else None)
    positions = [p for p in (q_positions, kv_positions) if p is not None]
    pos_specs = tuple(rows if p.shape[0] == B else P() for p in positions)

    def body(q, k, v, qs, ks, *pos):
      pos = iter(pos)
      qp = next(pos) if q_positions is not None else None
      kp = next(pos) if kv_positions is not None else None
      return self.kernel(q, k, v, qs, ks, causal=causal, scale=scale, q_positions=qp,
                         kv_positions=kp)

    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(rows,) * 5 + pos_specs, out_specs=rows)
    return fn(q, k, v, q_segment_ids, kv_segment_ids, *positions)
