"""Moonlight Muon + AdamW, as one optax transformation (the optimizer of every Kimi-VL stage).

Kimi-VL trains every stage with Muon as modified in Moonlight ("Muon is Scalable for LLM
Training", arXiv 2502.16982): for a weight matrix W [rows, cols] with gradient G,

  M <- beta * M + G                      # plain sum, not an EMA (no bias correction)
  U <- G + beta * M                      # Nesterov
  O <- NewtonSchulz5(U)                  # fp32; X = U / (||U||_F + eps), transposed if rows > cols,
                                         # 5 x  X <- a X + (b A + c A^2) X,  A = X X^T
  W <- W - lr * (0.2 * sqrt(max(rows, cols)) * O + wd * W)

so the update RMS matches AdamW's. Token embeddings, the LM head, biases and every 1-D parameter
use AdamW (b1 0.9, b2 0.95, eps 1e-8) with the same LR and decoupled weight decay.

What is reused from optax and what is not: the momentum is `optax.trace(beta, nesterov=True)`
(exactly `M = beta M + G`, `G + beta M`), weight decay `optax.add_decayed_weights`, the LR
`optax.scale_by_learning_rate`, the AdamW group `optax.adamw`, the grouping `optax.partition`, and
the per-tensor matrix view `optax.contrib.MuonDimensionNumbers`. `optax.contrib.muon` itself is
not used: its momentum is a bias-corrected EMA (a different direction in the first steps), it
sends every 2-D tensor (embeddings, LM head) to Muon, and its Newton-Schulz and RMS-scaling
helpers are private (`optax.contrib._muon`), so Newton-Schulz is written here (a few lines).

Matrix view (must equal the PyTorch reference's matrix shapes). Scanned layers carry a leading
`layers` axis and routed experts an `expert` axis: the leading run of those axes are *batch* axes,
each slice its own matrix (each expert is its own matrix). Of the remaining axes
the first is the input and the rest the output, except kernels whose input is per-head (`o_proj`
[N, Hv, D], vision `wo` [Nv, Hv, Dv]): there the head axes are the input. E.g. q_proj
[L, D, N, Hqk] is L matrices [D, N*Hqk]; experts [L, E, D, Fe] are L*E matrices [D, Fe].

Distributed Muon (ZeRO-1): every per-parameter state leaf has its parameter's shape and sits
under the parameter's dict path, so `parallel/rules.py` (`opt_state_shardings`) shards it like the
parameter and further over 'data'.

Sharded Newton-Schulz (`scale_by_newton_schulz`, the default): the Muon updates are cut into their
matrices, oriented so rows <= cols, and the matrices of one shape are stacked into one
[n, rows, cols] array per shape (e.g. all routed experts' gate, up and down projections of every
layer). Each stack is padded to a multiple of the device count and its leading axis is sharded
over every axis of the mesh in context (`jax.set_mesh`, as the trainer traces its step), so each
device orthogonalises 1/devices of the matrices, whole, in a rolled `lax.fori_loop` (three dots
per shape in the program); the results go back to the parameters' layout and shardings. A leaf
with a matrix axis the device count divides (every large one of A3B on 128 devices) moves in and
out of the stack by explicit all-to-alls inside a `shard_map`, so no device holds more than a
slice of it; the others are resharded by XLA. The per-leaf form (`orthogonalize_update`,
matrices gathered and replicated) is kept as `stack=False`.
`ns_dtype='bfloat16'` runs the iteration in bf16 as Moonlight and Keller Jordan's Muon do (the
default stays fp32).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

from kimi_vl_jax.optim import schedules

BATCH_AXES = ('layers', 'expert')          # leading axes that index separate matrices
HEAD_INPUT_AXES = ('heads', 'kv', 'vit_heads', 'vit_kv')  # per-head input of o_proj / wo

# Ordered (path regex, group, reason) rules checked before the shape rules below; first match wins.
PATH_RULES = (
    (r'(^|/)e_score_correction_bias$', 'frozen', 'MoE router bias (trainer updates it)'),
    (r'^language_model/embed_tokens/embedding$', 'adamw', 'token embedding'),
    (r'^language_model/lm_head/kernel$', 'adamw', 'LM head'),
    (r'(^|/)pos_emb$', 'adamw', 'position-embedding grid'),
    # MoonViT pre-training's SigLIP text tower (model/siglip_text.py): its embedding tables.
    (r'(^|/)token_embedding$', 'adamw', 'token embedding'),
    (r'(^|/)position_embedding$', 'adamw', 'position-embedding table'),
    (r'(^|/)bias$', 'adamw', 'bias'),
)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Where one parameter goes. `dim_nums` (Muon only) gives its input/output axes; every other
  axis is a batch axis (one matrix per slice)."""
  kind: str                       # 'muon' | 'adamw' | 'frozen'
  reason: str
  shape: tuple[int, ...]
  dim_nums: MuonDimensionNumbers | None = None
  axes: tuple[str | None, ...] = ()   # logical axis names (for the Newton-Schulz gather)

  def __post_init__(self):
    if self.kind not in ('muon', 'adamw', 'frozen'):
      raise ValueError(f'ParamGroup.kind must be muon, adamw or frozen, got {self.kind!r}')
    if (self.kind == 'muon') != (self.dim_nums is not None):
      raise ValueError(f'a {self.kind} ParamGroup {"needs" if self.kind == "muon" else "takes no"} '
                       'dim_nums')
    if self.dim_nums is not None:  # ints -> tuples of non-negative axes
      norm = lambda ax: tuple(a % len(self.shape) for a in ((ax,) if isinstance(ax, int) else ax))
      object.__setattr__(self, 'dim_nums', MuonDimensionNumbers(
          norm(self.dim_nums.reduction_axis), norm(self.dim_nums.output_axis)))

  @property
  def matrix_shape(self) -> tuple[int, int, int]:
    """(number of matrices, rows, cols) of the Muon view."""
    rows = math.prod(self.shape[a] for a in self.dim_nums.reduction_axis)
    cols = math.prod(self.shape[a] for a in self.dim_nums.output_axis)
    return math.prod(self.shape) // (rows * cols), rows, cols


# --------------------------------------------------------------------------------------------
# Parameter grouping.

def path_str(path) -> str:
  """'language_model/moe_layers/mlp/gate/kernel' from a jax key path."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _is_axes(x) -> bool:
  return isinstance(x, (jax.sharding.PartitionSpec, tuple)) and all(
      a is None or isinstance(a, str) for a in x)


def _flatten_params(params) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple], Any]:
  """(path -> shape, path -> logical axes found in boxes, treedef of the unboxed tree)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
  shapes, axes = {}, {}
  for path, leaf in leaves:
    if is_box(leaf):
      axes[path_str(path)] = tuple(leaf.names)
      leaf = leaf.value
    shapes[path_str(path)] = tuple(np.shape(leaf))
  return shapes, axes, jax.tree.structure(nn.meta.unbox(params))


def _flatten_axes(logical_axes) -> dict[str, tuple]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_axes)
  out = {}
  for path, leaf in leaves:
    if not _is_axes(leaf):
      raise ValueError(f'logical_axes/{path_str(path)}: expected a PartitionSpec or tuple of axis '
                       f'names, got {leaf!r}')
    out[path_str(path)] = tuple(leaf)
  return out


def trainable_fn(trainable, frozen_patterns: Sequence[str] = ()) -> Callable[[str], bool]:
  """`path -> trains?` for a parameter path (`path_str`): `trainable` is None (all), a list of
  path regexes (re.search, any matches) or a dict path -> bool; `frozen_patterns` (path regexes)
  freeze on top of that."""
  frozen_res = [re.compile(p) for p in frozen_patterns]
  if trainable is None:
    base = lambda p: True
  elif isinstance(trainable, dict):
    base = lambda p: bool(trainable[p])
  else:
    if isinstance(trainable, str):
      raise ValueError(f'trainable must be a list of regexes, not the string {trainable!r}')
    res = [re.compile(p) for p in trainable]
    base = lambda p: any(r.search(p) for r in res)
  return lambda p: base(p) and not any(r.search(p) for r in frozen_res)


def _classify(path: str, shape: tuple[int, ...], axes: tuple) -> ParamGroup:
  for pattern, kind, reason in PATH_RULES:
    if re.search(pattern, path):
      return ParamGroup(kind, reason, shape, axes=axes)
  n_batch = 0
  while n_batch < len(axes) and axes[n_batch] in BATCH_AXES:
    n_batch += 1
  rest = axes[n_batch:]
  if len(rest) <= 1:
    return ParamGroup('adamw', '1-D' if n_batch == 0 else '1-D per layer/expert', shape,
                      axes=axes)
  n_in = 1
  if rest[0] in HEAD_INPUT_AXES:  # o_proj / wo: the input is (heads, head_dim)
    while n_in < len(rest) - 1 and rest[n_in] in HEAD_INPUT_AXES:
      n_in += 1
  dims = MuonDimensionNumbers(reduction_axis=tuple(range(n_batch, n_batch + n_in)),
                              output_axis=tuple(range(n_batch + n_in, len(axes))))
  return ParamGroup('muon', 'matrix', shape, dims, axes)


def muon_param_groups(params, logical_axes=None, trainable=None,
                      frozen_patterns: Sequence[str] = ()) -> Any:
  """Assigns every parameter to 'muon' (with its matrix view), 'adamw' or 'frozen'.

  Args:
    params: the parameter tree, real or abstract (`jax.eval_shape(model.init, ...)['params']`),
      boxed (`nn.LogicallyPartitioned`, whose names are then used) or plain.
    logical_axes: tree of logical axis names (PartitionSpec or tuple per leaf, e.g.
      `nn.get_partition_spec(boxed_params)`); needed when `params` is not boxed.
    trainable: None (all), a list of path regexes (a param trains if any matches), or a pytree of
      bools with the params' structure.
    frozen_patterns: path regexes of parameters to freeze on top of `trainable`.
  Returns:
    A tree with the (unboxed) params' structure whose leaves are `ParamGroup`s.
  """
  shapes, box_axes, treedef = _flatten_params(params)
  axes = _flatten_axes(logical_axes) if logical_axes is not None else box_axes
  missing = [p for p in shapes if p not in axes]
  if missing:
    raise ValueError(f'no logical axis names for {len(missing)} parameters (e.g. {missing[:3]}); '
                     'pass boxed params or `logical_axes` (nn.get_partition_spec of them)')
  if not isinstance(trainable, (type(None), list, tuple, str)):
    trainable = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    if set(trainable) != set(shapes):
      raise ValueError('the trainable mask tree does not match the params: differing paths '
                       f'{sorted(set(trainable) ^ set(shapes))[:5]}')
  is_trainable = trainable_fn(trainable, frozen_patterns)
  groups = []
  for path, shape in shapes.items():
    if len(axes[path]) != len(shape):
      raise ValueError(f'{path}: {len(axes[path])} logical axes {axes[path]} for shape {shape}')
    if not is_trainable(path):
      groups.append(ParamGroup('frozen', 'not trainable', shape, axes=axes[path]))
    else:
      groups.append(_classify(path, shape, axes[path]))
  return jax.tree.unflatten(treedef, groups)


def _fmt_count(n: int) -> str:
  for unit, div in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= div:
      return f'{n / div:.2f}{unit}'
  return str(n)


def groups_summary(groups, max_examples: int = 3) -> str:
  """One line per group (tensors, parameters, reasons) plus example paths, for the log."""
  flat = [(path_str(p), g) for p, g in jax.tree_util.tree_flatten_with_path(groups)[0]]
  lines = ['optimizer groups (Moonlight Muon + AdamW):']
  for kind in ('muon', 'adamw', 'frozen'):
    members = [(p, g) for p, g in flat if g.kind == kind]
    n_params = sum(math.prod(g.shape) for _, g in members)
    reasons = sorted({g.reason for _, g in members})
    lines.append(f'  {kind:6s}: {len(members):4d} tensors, {_fmt_count(n_params):>8s} params'
                 + (f'  [{", ".join(reasons)}]' if reasons else ''))
    # Examples: the largest tensor of each reason first, then the next largest.
    by_size = sorted(members, key=lambda m: -math.prod(m[1].shape))
    firsts = [next(m for m in by_size if m[1].reason == r) for r in reasons]
    examples = (firsts + [m for m in by_size if m not in firsts])[:max(max_examples, 1)]
    for p, g in examples:
      view = ''
      if kind == 'muon':
        n, r, c = g.matrix_shape
        view = f' -> {n} x [{r}, {c}]'
      lines.append(f'      {p} {list(g.shape)}{view}')
  return '\n'.join(lines)


# --------------------------------------------------------------------------------------------
# Newton-Schulz and the Muon update.

NS_DTYPES = ('float32', 'bfloat16')


def _newton_schulz_wide(x: jax.Array, coeffs, steps: int, eps: float, precision,
                        dtype) -> jax.Array:
  """The iteration on matrices x [..., m, k] with m <= k, in `dtype`, as a rolled loop."""
  a, b, c = coeffs
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
  x = (x / (norm + eps)).astype(dtype)
  mm = lambda p, q: jnp.matmul(p, q, precision=precision)

  def step(_, x):
    gram = mm(x, jnp.swapaxes(x, -1, -2))    # A = X X^T  [..., m, m]
    return (a * x + mm(b * gram + c * mm(gram, gram), x)).astype(dtype)

  return jax.lax.fori_loop(0, steps, step, x).astype(jnp.float32)


def newton_schulz(x: jax.Array, coeffs: Sequence[float] = (3.4445, -4.7750, 2.0315),
                  steps: int = 5, eps: float = 1e-7, precision=None,
                  dtype: str = 'float32') -> jax.Array:
  """Approximate orthogonalisation of the matrices x [..., rows, cols].

  Moonlight / Keller Jordan's quintic iteration: X = x / (||x||_F + eps) per matrix (fp32),
  transposed when rows > cols (so A = X X^T is the smaller Gram matrix), then `steps` times
  X <- a X + (b A + c A^2) X in `dtype` ('float32' or 'bfloat16'). Returns fp32 with x's shape.
  """
  transpose = x.shape[-2] > x.shape[-1]
  if transpose:
    x = jnp.swapaxes(x, -1, -2)
  x = _newton_schulz_wide(x, coeffs, steps, eps, precision, jnp.dtype(dtype))
  return jnp.swapaxes(x, -1, -2) if transpose else x


def _explicit_spec(x: jax.Array):
  """x's PartitionSpec (padded to x.ndim) under an Explicit-axes mesh, else None (Auto mode,
  where XLA places the collectives itself)."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  mesh = getattr(sharding, 'mesh', None)
  if mesh is None or not getattr(mesh, 'explicit_axes', ()):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def orthogonalize_update(u: jax.Array, group: ParamGroup, coeffs, steps: int, eps: float,
                         rms_scale: float, precision=None, dtype: str = 'float32') -> jax.Array:
  """Newton-Schulz on the matrix view of u, scaled by rms_scale * sqrt(max(rows, cols)).

  Batch axes stay separate axes (so an expert-sharded axis stays sharded); the matrix axes are
  gathered for the iteration and the result is re-sliced like u (distributed Muon). Under Auto
  sharding this is a logical constraint (batch axes by their logical names, matrix axes
  replicated; resolved by the trainer's `nn.logical_axis_rules`, a no-op without them) and XLA
  re-slices the result per the step's out_shardings; under Explicit sharding both are reshards.
  """
  _, rows, cols = group.matrix_shape
  dn = group.dim_nums
  batch = tuple(a for a in range(u.ndim) if a not in dn.reduction_axis + dn.output_axis)
  perm = batch + tuple(dn.reduction_axis) + tuple(dn.output_axis)  # the identity for our tree
  ut = jnp.transpose(u, perm)
  spec = _explicit_spec(ut)
  gathered = [None] * (u.ndim - len(batch))
  if spec is not None:  # gather the matrix axes, keep the batch axes' sharding
    ut = jax.sharding.reshard(ut, P(*spec[:len(batch)], *gathered))
  elif group.axes:
    ut = nn.with_logical_constraint(ut, tuple(group.axes[a] for a in batch) + tuple(gathered))
  mats = ut.reshape(ut.shape[:len(batch)] + (rows, cols))   # [*batch, rows, cols]
  o = newton_schulz(mats, coeffs, steps, eps, precision, dtype) * (
      rms_scale * math.sqrt(max(rows, cols)))
  o = o.astype(u.dtype).reshape(ut.shape)
  if spec is not None:  # keep only the local slice, like the parameter
    o = jax.sharding.reshard(o, P(*spec))
  return jnp.transpose(o, tuple(np.argsort(perm)))


def _context_mesh():
  """The mesh set with `jax.set_mesh` while tracing (None without one): its axes split the
  Newton-Schulz stacks."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def _as_wide_matrices(u: jax.Array, group: ParamGroup, explicit: bool) -> jax.Array:
  """A Muon update -> its matrices [n, m, k] (m <= k; transposed when rows > cols)."""
  n, rows, cols = group.matrix_shape
  dn = group.dim_nums
  batch = tuple(a for a in range(u.ndim) if a not in dn.reduction_axis + dn.output_axis)
  ut = jnp.transpose(u, batch + tuple(dn.reduction_axis) + tuple(dn.output_axis))
  if explicit:  # explicit sharding does not reshape split axes; the stack re-splits it
    ut = jax.sharding.reshard(ut, P())
  mats = ut.reshape(n, rows, cols).astype(jnp.float32)
  return jnp.swapaxes(mats, 1, 2) if rows > cols else mats


def _from_wide_matrices(o: jax.Array, u: jax.Array, group: ParamGroup, explicit: bool
                        ) -> jax.Array:
  """The inverse of `_as_wide_matrices`, back in u's shape, dtype (and explicit sharding)."""
  _, rows, cols = group.matrix_shape
  dn = group.dim_nums
  batch = tuple(a for a in range(u.ndim) if a not in dn.reduction_axis + dn.output_axis)
  perm = batch + tuple(dn.reduction_axis) + tuple(dn.output_axis)
  if rows > cols:
    o = jnp.swapaxes(o, 1, 2)
  o = o.astype(u.dtype).reshape(tuple(u.shape[a] for a in perm))
  o = jnp.transpose(o, tuple(np.argsort(perm)))
  spec = _explicit_spec(u) if explicit else None
  return jax.sharding.reshard(o, P(*spec)) if spec is not None else o


def _all_to_all_axis(group: ParamGroup, devices: int) -> int | None:
  """1 (rows) or 2 (cols) of the [n, rows, cols] view: a matrix axis `devices` divides (the
  larger one first), or None."""
  _, rows, cols = group.matrix_shape
  for axis, size in sorted(((1, rows), (2, cols)), key=lambda a: -a[1]):
    if size % devices == 0:
      return axis
  return None


def _all_to_all_newton_schulz(updates, groups, mesh, axes, devices, coeffs, steps, eps,
                              rms_scale, precision, dtype):
  """The stacked Newton-Schulz as a `shard_map` over the whole mesh: each leaf enters split on a
  matrix axis over every device (XLA reshards it from the parameter's layout, an all-to-all), an
  explicit all-to-all turns that into whole matrices, n / devices per device (after zero padding),
  the matrices of one shape are concatenated locally and orthogonalised in one rolled loop, and
  the inverse all-to-all returns each leaf split on its matrix axis. No device ever holds more
  than its share of a leaf (plus padding)."""
  paths = list(updates)
  views, specs = {}, {}
  for p in paths:
    g, u = groups[p], updates[p]
    n, rows, cols = g.matrix_shape
    dn = g.dim_nums
    batch = tuple(a for a in range(u.ndim) if a not in dn.reduction_axis + dn.output_axis)
    perm = batch + tuple(dn.reduction_axis) + tuple(dn.output_axis)
    views[p] = jnp.transpose(u, perm).reshape(n, rows, cols)
    axis = _all_to_all_axis(g, devices)
    specs[p] = P(*([None] * axis), axes)

  def local(*xs):
    blocks, by_shape = {}, {}
    for p, x in zip(paths, xs):                  # x [n, rows, cols] split on one matrix axis
      n = x.shape[0]
      axis = _all_to_all_axis(groups[p], devices)
      x = x.astype(jnp.float32)
      pad = -n % devices
      if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
      x = jax.lax.all_to_all(x, axes, 0, axis, tiled=True)   # [(n + pad) / d, rows, cols]
      if x.shape[1] > x.shape[2]:
        x = jnp.swapaxes(x, 1, 2)
      blocks[p] = x
      by_shape.setdefault(x.shape[1:], []).append(p)
    outs = {}
    for group_paths in by_shape.values():
      stack = (jnp.concatenate([blocks[p] for p in group_paths], axis=0)
               if len(group_paths) > 1 else blocks[group_paths[0]])
      o = _newton_schulz_wide(stack, coeffs, steps, eps, precision, jnp.dtype(dtype))
      start = 0
      for p in group_paths:
        size = blocks[p].shape[0]
        outs[p] = jax.lax.slice_in_dim(o, start, start + size, axis=0)
        start += size
    result = []
    for p, x in zip(paths, xs):
      n, rows, cols = groups[p].matrix_shape
      o = outs[p]
      if rows > cols:
        o = jnp.swapaxes(o, 1, 2)
      o = jax.lax.all_to_all(o, axes, _all_to_all_axis(groups[p], devices), 0, tiled=True)
      o = jax.lax.slice_in_dim(o, 0, n, axis=0) * (rms_scale * math.sqrt(max(rows, cols)))
      result.append(o.astype(x.dtype))
    return tuple(result)

  spec_list = tuple(specs[p] for p in paths)
  outs = jax.shard_map(local, mesh=mesh, in_specs=spec_list, out_specs=spec_list,
                       check_vma=False)(*(views[p] for p in paths))
  out = {}
  for p, o in zip(paths, outs):
    g, u = groups[p], updates[p]
    dn = g.dim_nums
    batch = tuple(a for a in range(u.ndim) if a not in dn.reduction_axis + dn.output_axis)
    perm = batch + tuple(dn.reduction_axis) + tuple(dn.output_axis)
    o = o.reshape(tuple(u.shape[a] for a in perm))
    out[p] = jnp.transpose(o, tuple(np.argsort(perm)))
  return out


def stacked_newton_schulz(updates: dict[str, jax.Array], groups: dict[str, ParamGroup], coeffs,
                          steps: int, eps: float, rms_scale: float, precision=None,
                          dtype: str = 'float32') -> dict[str, jax.Array]:
  """`orthogonalize_update` of every leaf of `updates` (path -> Muon update), computed as one
  stacked, mesh-sharded Newton-Schulz per matrix shape (module docstring).

  Layout: with d devices, each leaf's n matrices are padded with zero matrices to a multiple of
  d (zeros stay zeros: x / (0 + eps) = 0) and device i gets the i-th n / d of every leaf. Leaves
  with a matrix axis d divides go through `_all_to_all_newton_schulz` (explicit all-to-alls);
  the others are split as [d, n / d, m, k] with the leaves of one shape concatenated on the
  second axis, so going in and out of the stack is a reshard of each leaf alone (left to XLA)
  and slices of a local axis, never a slice across shards.
  """
  mesh = _context_mesh()
  explicit = mesh is not None and bool(mesh.explicit_axes)
  axes = tuple(a for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n > 1) if mesh else ()
  devices = math.prod(mesh.shape[a] for a in axes) if mesh else 1
  if axes and not explicit:
    # Leaves with a matrix axis the device count divides: all-to-all inside a shard_map.
    fits = {p for p, u in updates.items()
            if _all_to_all_axis(groups[p], devices) is not None}
    out = _all_to_all_newton_schulz({p: updates[p] for p in fits}, groups, mesh, axes, devices,
                                    coeffs, steps, eps, rms_scale, precision, dtype) if fits else {}
    updates = {p: u for p, u in updates.items() if p not in fits}
    if not updates:
      return out
  else:
    out = {}

  def split(x):  # leading axis over every mesh axis
    if not axes:
      return x
    spec = P(axes)
    return (jax.sharding.reshard(x, spec) if explicit
            else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)))

  by_shape: dict[tuple[int, int], list[str]] = {}
  blocks = {}
  for path, u in updates.items():
    mats = _as_wide_matrices(u, groups[path], explicit)              # [n, m, k]
    n, m, k = mats.shape
    pad = -n % devices
    if pad:
      mats = jnp.concatenate([mats, jnp.zeros((pad, m, k), mats.dtype)], axis=0)
    blocks[path] = split(split(mats).reshape(devices, (n + pad) // devices, m, k))
    by_shape.setdefault((m, k), []).append(path)
  for paths in by_shape.values():
    stack = (jnp.concatenate([blocks[p] for p in paths], axis=1) if len(paths) > 1
             else blocks[paths[0]])                                  # [d, sum n / d, m, k]
    o = _newton_schulz_wide(split(stack), coeffs, steps, eps, precision, jnp.dtype(dtype))
    start = 0
    for p in paths:
      size = blocks[p].shape[1]
      n, rows, cols = groups[p].matrix_shape
      mats = jax.lax.slice_in_dim(o, start, start + size, axis=1)
      mats = split(mats.reshape((devices * size,) + mats.shape[2:]))
      if explicit:
        mats = jax.sharding.reshard(mats, P())
      mats = jax.lax.slice_in_dim(mats, 0, n, axis=0) * (rms_scale * math.sqrt(max(rows, cols)))
      out[p] = _from_wide_matrices(mats, updates[p], groups[p], explicit)
      start += size
  return out


def scale_by_newton_schulz(groups, coeffs=(3.4445, -4.7750, 2.0315), steps: int = 5,
                           eps: float = 1e-7, rms_scale: float = 0.2, precision=None,
                           dtype: str = 'float32',
                           stack: bool = True) -> optax.GradientTransformation:
  """Stateless: replaces each Muon leaf's update by its scaled orthogonalisation.

  `groups` is the `muon_param_groups` tree; leaves are found by path, so this works inside
  `optax.partition` (where non-Muon leaves are masked out). `stack`: one sharded Newton-Schulz
  per matrix shape over the mesh in context (`stacked_newton_schulz`); False: per leaf, the
  matrices replicated (`orthogonalize_update`). `dtype`: of the iteration ('float32' or
  'bfloat16').
  """
  if dtype not in NS_DTYPES:
    raise ValueError(f'Newton-Schulz dtype must be one of {NS_DTYPES}, got {dtype!r}')
  by_path = {path_str(p): g for p, g in jax.tree_util.tree_flatten_with_path(groups)[0]}

  def check(path, u):
    g = by_path[path]
    if g.kind != 'muon':
      raise ValueError(f'{path} reached Newton-Schulz but is in group {g.kind!r}')
    if tuple(u.shape) != g.shape:
      raise ValueError(f'{path}: update shape {u.shape} != grouped shape {g.shape}')
    return g

  def update_fn(updates, state, params=None):
    del params
    if not stack:
      return jax.tree_util.tree_map_with_path(
          lambda path, u: orthogonalize_update(u, check(path_str(path), u), coeffs, steps, eps,
                                               rms_scale, precision, dtype), updates), state
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    flat = {path_str(p): u for p, u in leaves}
    for p, u in flat.items():
      check(p, u)
    out = stacked_newton_schulz(flat, by_path, coeffs, steps, eps, rms_scale, precision, dtype)
    return jax.tree.unflatten(treedef, [out[path_str(p)] for p, _ in leaves]), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def moonlight_muon(learning_rate, groups, weight_decay: float = 0.1, beta: float = 0.95,
                   nesterov: bool = True, ns_coeffs=(3.4445, -4.7750, 2.0315), ns_steps: int = 5,
                   eps: float = 1e-7, rms_scale: float = 0.2, mu_dtype=jnp.float32,
                   precision=None, ns_dtype: str = 'float32',
                   ns_stack: bool = True) -> optax.GradientTransformation:
  """The Muon branch: sum momentum, Nesterov, Newton-Schulz, RMS scale, decoupled wd, -lr."""
  return optax.chain(
      optax.trace(decay=beta, nesterov=nesterov, accumulator_dtype=mu_dtype),
      scale_by_newton_schulz(groups, ns_coeffs, ns_steps, eps, rms_scale, precision, ns_dtype,
                             ns_stack),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )


def _zero_frozen(labels) -> optax.GradientTransformation:
  """Zeroes frozen leaves' gradients before clipping, so they do not enter the global norm."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, l: jnp.zeros_like(u) if l == 'frozen' else u,
                        updates, labels), state
  return optax.GradientTransformation(optax.init_empty_state, update_fn)


# --------------------------------------------------------------------------------------------
# The whole optimizer from its config.

def default_config() -> ml_collections.ConfigDict:
  """`optim` fields (every stage config sets a subset; the rest keep these values).

  schedule        LR schedule, see `schedules.make_schedule` (kind + fields), shared by both groups
  weight_decay    decoupled weight decay, both groups (W <- W - lr * wd * W)
  grad_clip_norm  clip by global norm of the trainable gradients; None = no clipping
  muon.beta       momentum (M = beta M + G);  muon.nesterov: use G + beta M
  muon.ns_steps, muon.ns_coeffs (a, b, c), muon.eps   Newton-Schulz iteration and norm epsilon
  muon.rms_scale  the 0.2 in 0.2 * sqrt(max(rows, cols))
  muon.ns_precision  matmul precision of Newton-Schulz: 'default' | 'high' | 'highest'
  muon.ns_dtype   dtype of the Newton-Schulz iteration: 'float32' | 'bfloat16' (Moonlight's)
  muon.ns_stack   True: one Newton-Schulz per matrix shape, its stack sharded over the whole mesh;
                  False: per parameter, each matrix replicated on every device holding it
  adam.b1, adam.b2, adam.eps   the AdamW group
  mu_dtype        dtype of the momentum / first-moment buffers
  trainable       None = all; else a list of path regexes (re.search) of parameters that train
  frozen          path regexes of parameters to freeze (zero update, no state) on top of that
  """
  c = ml_collections.ConfigDict()
  c.schedule = ml_collections.ConfigDict({'kind': 'constant', 'peak_lr': 1e-4})
  c.weight_decay = 0.1
  c.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  c.muon = ml_collections.ConfigDict({
      'beta': 0.95, 'nesterov': True, 'ns_steps': 5, 'ns_coeffs': (3.4445, -4.7750, 2.0315),
      'eps': 1e-7, 'rms_scale': 0.2, 'ns_precision': 'default', 'ns_dtype': 'float32',
      'ns_stack': True})
  c.adam = ml_collections.ConfigDict({'b1': 0.9, 'b2': 0.95, 'eps': 1e-8})
  c.mu_dtype = 'float32'
  c.trainable = ml_collections.config_dict.placeholder(tuple)
  c.frozen = ()
  return c


def _merge(default: dict, user: dict, where: str = 'optim') -> dict:
  out = dict(default)
  for k, v in user.items():
    if k not in default:
      raise ValueError(f'unknown config field {where}.{k}; known: {sorted(default)}')
    if isinstance(default[k], dict) and k != 'schedule':
      if not isinstance(v, dict):
        raise ValueError(f'{where}.{k} must be a dict of fields, got {v!r}')
      out[k] = _merge(default[k], v, f'{where}.{k}')
    else:
      out[k] = v
  return out


_PRECISIONS = {'default': None, 'high': jax.lax.Precision.HIGH,
               'highest': jax.lax.Precision.HIGHEST}


def make_optimizer(optim_cfg, params_or_abstract, logical_axes=None, trainable_mask=None
                   ) -> tuple[optax.GradientTransformation, str]:
  """Moonlight Muon + AdamW for a parameter tree; returns (transformation, groups summary).

  Args:
    optim_cfg: ConfigDict (or dict) with the fields of `default_config()` (missing ones default).
    params_or_abstract: params or `jax.eval_shape` of them, boxed or plain (see
      `muon_param_groups`); the transformation then expects the plain (unboxed) tree.
    logical_axes: logical axis names per leaf, when the params are not boxed.
    trainable_mask: optional pytree of bools (True = trains) instead of `optim_cfg.trainable`.
  """
  user = optim_cfg.to_dict() if isinstance(optim_cfg, ml_collections.ConfigDict) else optim_cfg
  cfg = _merge(default_config().to_dict(), dict(user))
  m, a = cfg['muon'], cfg['adam']
  if m['ns_precision'] not in _PRECISIONS:
    raise ValueError(f"optim.muon.ns_precision must be one of {sorted(_PRECISIONS)}, "
                     f"got {m['ns_precision']!r}")
  if m['ns_dtype'] not in NS_DTYPES:
    raise ValueError(f"optim.muon.ns_dtype must be one of {NS_DTYPES}, got {m['ns_dtype']!r}")
  if len(tuple(m['ns_coeffs'])) != 3:
    raise ValueError(f"optim.muon.ns_coeffs must be (a, b, c), got {m['ns_coeffs']!r}")
  if trainable_mask is not None and cfg['trainable'] is not None:
    raise ValueError('give either trainable_mask or optim.trainable, not both')
  trainable = trainable_mask if trainable_mask is not None else cfg['trainable']
  if isinstance(trainable, tuple):
    trainable = list(trainable)
  groups = muon_param_groups(params_or_abstract, logical_axes, trainable, tuple(cfg['frozen']))
  labels = jax.tree.map(lambda g: g.kind, groups)
  lr = schedules.make_schedule(cfg['schedule'])
  mu_dtype = jnp.dtype(cfg['mu_dtype'])
  wd = cfg['weight_decay']
  tx = optax.partition(
      {
          'muon': moonlight_muon(lr, groups, wd, m['beta'], m['nesterov'],
                                 tuple(m['ns_coeffs']), m['ns_steps'], m['eps'], m['rms_scale'],
                                 mu_dtype, _PRECISIONS[m['ns_precision']], m['ns_dtype'],
                                 bool(m['ns_stack'])),
          'adamw': optax.adamw(lr, b1=a['b1'], b2=a['b2'], eps=a['eps'], weight_decay=wd,
                               mu_dtype=mu_dtype),
          'frozen': optax.set_to_zero(),
      },
      labels)
  parts = [_zero_frozen(labels)]
  clip = cfg['grad_clip_norm']
  if clip is not None:
    if not clip > 0:
      raise ValueError(f'optim.grad_clip_norm must be positive or None, got {clip!r}')
    parts.append(optax.clip_by_global_norm(clip))
  summary = groups_summary(groups)
  summary += (f"\n  lr schedule {cfg['schedule']}, weight decay {wd}, grad clip {clip}, "
              f"muon beta {m['beta']} ns {m['ns_steps']}x{tuple(m['ns_coeffs'])} "
              f"{m['ns_dtype']}{' stacked' if m['ns_stack'] else ''}, "
              f"adam ({a['b1']}, {a['b2']}, {a['eps']})")
  return optax.chain(*parts, tx), summary

