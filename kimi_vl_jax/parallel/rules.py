"""Logical-axis rule presets and the shardings of parameters, optimizer state and batches.

The model names every parameter and activation dimension with a logical axis (docs/param_tree.md);
a preset maps those names to the mesh axes `AXES` (flax `nn.logical_axis_rules`
format: `(logical_name, mesh_axis | tuple of mesh axes | None)`, first matching rule wins, a mesh
axis is used at most once per array). Presets, selected by `config.parallel.rules`:

| preset       | batch over                        | parameters                               |
|--------------|-----------------------------------|------------------------------------------|
| `dp`         | data                              | replicated                               |
| `fsdp`       | data                              | `embed`-like dims over data (ZeRO-3)     |
| `dp_ep`      | data, expert                      | experts over expert                      |
| `fsdp_ep`    | data, expert                      | experts over expert, `embed` over data   |
| `dp_ep_pp`   | data, expert, pipeline            | experts over expert, layer stacks over pipeline |
| `dp_cp`      | data (sequence over context)      | replicated                               |
| `fsdp_ep_cp` | data, expert (sequence over context) | experts over expert, `embed` over data x context |

In the expert-parallel presets the expert axis also splits the batch (as MaxText does): outside
the MoE layers the expert devices are ordinary data-parallel replicas, and the dispatch
(`parallel/expert.py`) moves tokens to their experts with all-to-all. In `dp_ep_pp` the layer
stacks are stored split by layer over 'pipeline' and the pipeline's stage axis (`stage`) maps to
it. With `model.pipeline_stages > 1` the MoE stack runs as a GPipe schedule (`parallel/pipeline.py`)
and each pipeline rank holds and runs only its stage's layers; with `pipeline_stages == 1` XLA
gathers each layer inside the scan and the batch is split over 'pipeline' too (layer-wise ZeRO-3).

ZeRO-1 (`opt_state_shardings`): whatever the parameters do, each optimizer-state buffer is further
split over 'data' on its largest dimension that divides evenly, so Adam moments and Muon momentum
cost 1/data of their size per device; the update then all-gathers parameters implicitly (XLA
inserts the collectives from the in/out shardings of the jitted step).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_vl_jax.optim.muon import path_str as _path_str

Rules = tuple[tuple[str, Any], ...]

# The mesh axes (`parallel/mesh.py` builds meshes over them), outermost first.
AXES = ('data', 'expert', 'pipeline', 'context')

# Vision / projector "model width" dims that FSDP shards alongside the decoder's `embed`.
_WIDTH = ('embed', 'vit_embed', 'mm_embed')


def _fsdp(axes) -> Rules:
  return tuple((name, axes) for name in _WIDTH)


_EP = (('expert', 'expert'), ('act_expert', 'expert'))

PRESETS: dict[str, Rules] = {
    'dp': (('act_batch', 'data'),),
    'fsdp': (('act_batch', 'data'),) + _fsdp('data'),
    'dp_ep': (('act_batch', ('data', 'expert')),) + _EP,
    'fsdp_ep': (('act_batch', ('data', 'expert')),) + _EP + _fsdp('data'),
    'dp_ep_pp': ((('act_batch', ('data', 'expert', 'pipeline')), ('layers', 'pipeline'),
                  ('stage', 'pipeline')) + _EP),
    'dp_cp': (('act_batch', 'data'), ('act_len', 'context')),
    'fsdp_ep_cp': ((('act_batch', ('data', 'expert')), ('act_len', 'context')) + _EP
                   + _fsdp(('data', 'context'))),
}


def get_rules(preset: str | Sequence) -> Rules:
  """A preset name (or an explicit rule list, returned as a tuple) -> flax logical axis rules."""
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f'parallel.rules={preset!r} is not a rule preset; choose one of '
                       f'{sorted(PRESETS)}')
    return PRESETS[preset]
  rules = tuple((str(k), v) for k, v in preset)
  for k, v in rules:
    for a in (v if isinstance(v, (tuple, list)) else (v,)):
      if a is not None and a not in AXES:
        raise ValueError(f'rule ({k!r}, {v!r}) names mesh axis {a!r}; mesh axes are {AXES}')
  return rules


def mesh_axes_of(rules: Rules | str, logical: str) -> tuple[str, ...]:
  """The mesh axes a logical name maps to (first matching rule), as a tuple (maybe empty)."""
  for k, v in get_rules(rules):
    if k == logical:
      if v is None:
        return ()
      return tuple(v) if isinstance(v, (tuple, list)) else (v,)
  return ()


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules | str):
  """`with sharding_context(mesh, rules):` around tracing/lowering the step, so the model's
  `nn.with_logical_constraint` activation annotations resolve to this mesh and preset."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
    yield


# --------------------------------------------------------------------------------------------
# Parameters.

def _is_box(x) -> bool:
  return isinstance(x, meta.AxisMetadata)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[a] for a in names)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, where: str = '',
             dropped: list | None = None) -> P:
  """Drops trailing mesh axes from any dimension they do not divide evenly (logged)."""
  out = []
  for d, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    names = tuple(n for n in names if mesh.shape[n] > 1)
    while names and shape[d] % _axis_size(mesh, names):
      if dropped is not None:
        dropped.append(f'{where}[dim {d}={shape[d]}] not split over {names[-1]}')
      names = names[:-1]
    out.append(None if not names else names[0] if len(names) == 1 else names)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _mesh_spec(logical: P, shape, mesh: Mesh, rules: Rules, where: str, dropped: list) -> P:
  spec = nn.logical_to_mesh_axes(tuple(logical), rules) if len(logical) else P()
  return fit_spec(spec, shape, mesh, where, dropped)


def _leaves_with_path(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]


def param_specs(abstract_params, mesh: Mesh, rules: Rules | str) -> Any:
  """Mesh PartitionSpecs for a (boxed, possibly abstract) parameter tree, unboxed structure."""
  rules = get_rules(rules)
  dropped: list[str] = []

  def one(path, leaf):
    logical = leaf.get_partition_spec() if _is_box(leaf) else P()
    shape = np.shape(leaf.value if _is_box(leaf) else leaf)
    return _mesh_spec(logical, shape, mesh, rules, _path_str(path), dropped)

  specs = jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=_is_box)
  if dropped:
    logging.info('parameters left unsplit where the mesh axis does not divide them:\n  %s',
                 '\n  '.join(dropped))
  return specs


def param_shardings(abstract_boxed_params, mesh: Mesh, rules: Rules | str) -> Any:
  """NamedShardings for the parameters (unboxed structure), from their logical axis names."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      param_specs(abstract_boxed_params, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


# --------------------------------------------------------------------------------------------
# Optimizer state (ZeRO-1).

def zero1_spec(spec: P, shape: Sequence[int], mesh: Mesh, axis: str = 'data') -> P:
  """Adds `axis` to the largest dimension of `shape` that stays evenly divisible.

  A dimension already split over other mesh axes may take `axis` as an extra (inner) factor.
  Unchanged if `axis` is already used, has size 1, or divides nothing.
  """
  n = mesh.shape[axis]
  entries = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
  used = {a for e in entries if e is not None for a in (e if isinstance(e, tuple) else (e,))}
  if n == 1 or axis in used:
    return spec
  order = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in order:
    if shape[d] % (_axis_size(mesh, entries[d]) * n) == 0:
      e = entries[d]
      entries[d] = axis if e is None else (e if isinstance(e, tuple) else (e,)) + (axis,)
      while entries and entries[-1] is None:
        entries.pop()
      return P(*entries)
  return spec


def _trailing_dict_keys(path) -> list[str]:
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.insert(0, str(k.key))
  return keys


def opt_state_specs(abstract_opt_state, abstract_params, mesh: Mesh, rules: Rules | str,
                    zero1: bool = True, zero_axis: str = 'data') -> Any:
  """Mesh PartitionSpecs for an optimizer state; ZeRO-1 over `zero_axis` when `zero1`.

  Each per-parameter buffer (Adam moments, Muon momentum) sits in the optax state under the
  parameter's own dict path (optax partition / chain only add outer keys), so a leaf whose trailing
  dict keys name a parameter of the same shape takes that parameter's spec; leaves that are flax
  `Partitioned` boxes use their own names; anything else (step counts, scalars) is replicated.
  """
  rules = get_rules(rules)
  pspecs = param_specs(abstract_params, mesh, rules)
  by_path: dict[str, tuple[tuple[int, ...], P]] = {}
  for (path, leaf), (_, spec) in zip(
      _leaves_with_path(abstract_params),
      jax.tree_util.tree_flatten_with_path(pspecs, is_leaf=lambda x: isinstance(x, P))[0]):
    keys = _trailing_dict_keys(path)
    by_path['/'.join(keys)] = (tuple(np.shape(leaf.value if _is_box(leaf) else leaf)), spec)
  dropped: list[str] = []

  def one(path, leaf):
    if _is_box(leaf):
      shape = tuple(np.shape(leaf.value))
      spec = _mesh_spec(leaf.get_partition_spec(), shape, mesh, rules, _path_str(path), dropped)
    else:
      shape = tuple(np.shape(leaf))
      spec = P()
      keys = _trailing_dict_keys(path)
      while keys:
        hit = by_path.get('/'.join(keys))
        if hit is not None:
          if hit[0] == shape:
            spec = hit[1]
          break
        keys.pop(0)
    if zero1 and len(shape) > 0:
      spec = zero1_spec(spec, shape, mesh, zero_axis)
    return spec

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state, is_leaf=_is_box)


def opt_state_shardings(abstract_opt_state, abstract_params, mesh: Mesh, rules: Rules | str,
                        zero1: bool = True, zero_axis: str = 'data') -> Any:
  """NamedShardings for the optimizer state (see `opt_state_specs`)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      opt_state_specs(abstract_opt_state, abstract_params, mesh, rules, zero1,
                                      zero_axis),
                      is_leaf=lambda x: isinstance(x, P))


# --------------------------------------------------------------------------------------------
# Batches.

def batch_spec(rules: Rules | str = 'dp') -> P:
  """Leading (row) dimension over the mesh axes of `act_batch`; the rest replicated."""
  axes = mesh_axes_of(rules, 'act_batch')
  return P(axes if len(axes) > 1 else axes[0]) if axes else P()


def batch_sharding(mesh: Mesh, rules: Rules | str = 'dp') -> NamedSharding:
  return NamedSharding(mesh, batch_spec(rules))


def shard_batch(host_batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules | str = 'dp'
                ) -> dict[str, jax.Array]:
  """Global arrays from this host's rows (each process passes its own `B / process_count` rows).

  Rows are laid out in process order: process i holds global rows [i * b, (i + 1) * b).
  """
  sharding = batch_sharding(mesh, rules)
  out = {}
  for k, v in host_batch.items():
    v = np.asarray(v)
    if v.ndim == 0:
      raise ValueError(f'batch[{k!r}] is a scalar; every batch entry needs a leading row axis')
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
