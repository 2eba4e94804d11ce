"""The named device mesh ('data', 'expert', 'pipeline', 'context') and start-up config checks.

The mesh is built from the `parallel` section of a stage config (see `default_config`):

* `data`, `expert`, `pipeline`, `context`: axis sizes *within one slice* (ICI). One of them may be
  -1, meaning "the devices that are left".
* `dcn_data`, `dcn_expert`, `dcn_pipeline`, `dcn_context`: how many slices each axis spans across
  the data-centre network (multi-slice). Their product must equal the number of slices; one may be
  -1. The mesh axis size is `ici * dcn` (e.g. `data=16, dcn_data=2` gives a 32-way data axis whose
  outer factor crosses DCN). Only cheap, latency-tolerant traffic (data-parallel gradient
  reductions) should cross DCN, so in practice only `dcn_data` is > 1.
* `rules`: the name of a logical-axis rule preset in `parallel/rules.py`.

Axis order follows `mesh_utils`' convention of increasing network intensity: 'data' is outermost
(least traffic: one gradient all-reduce per step), then 'expert' (two all-to-alls per MoE layer),
'pipeline' (point-to-point), 'context' innermost (KV exchange inside every attention layer).

All mesh axes are `AxisType.Auto`: the model annotates logical axes and the compiler propagates
shardings (flax `nn.logical_axis_rules`), rather than the explicit-sharding mode that
`jax.make_mesh` defaults to.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.rules import AXES
DCN_KEYS = tuple(f'dcn_{a}' for a in AXES)


def default_config() -> ml_collections.ConfigDict:
  """The `parallel` section of a stage config, with every field this module reads."""
  c = ml_collections.ConfigDict()
  c.data = -1
  c.expert = 1
  c.pipeline = 1
  c.context = 1
  c.dcn_data = 1
  c.dcn_expert = 1
  c.dcn_pipeline = 1
  c.dcn_context = 1
  c.rules = 'dp'            # preset name in parallel/rules.py
  c.zero1 = True            # shard optimizer state over 'data' (ZeRO-1)
  return c


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default) if hasattr(cfg, key) else default


def _resolve(sizes: Sequence[int], total: int, what: str, keys: Sequence[str]) -> tuple[int, ...]:
  """Replaces at most one -1 in `sizes` so that the product equals `total`."""
  sizes = [int(s) for s in sizes]
  for k, s in zip(keys, sizes):
    if s == 0 or s < -1:
      raise ValueError(f'parallel.{k}={s}: axis sizes must be positive (or -1 for "the rest")')
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f'parallel: at most one of {", ".join(keys)} may be -1, got '
                     + ', '.join(f'{k}=-1' for k, s in zip(keys, sizes) if s == -1))
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if total % known:
      raise ValueError(
          f'parallel: {what} has {total} devices, not divisible by the fixed axes '
          + ' x '.join(f'{k}={s}' for k, s in zip(keys, sizes) if s != -1)
          + f' = {known}; change those sizes so their product divides {total}')
    sizes[free[0]] = total // known
  elif known != total:
    raise ValueError(
        f'parallel: ' + ' x '.join(f'{k}={s}' for k, s in zip(keys, sizes))
        + f' = {known} but {what} has {total} devices; make the product {total} '
        f'or set one axis to -1')
  return tuple(sizes)


def _num_slices(devices: Sequence[Any]) -> int:
  ids = {getattr(d, 'slice_index', 0) for d in devices}
  return len(ids)


def mesh_shape(parallel_cfg: Any, num_devices: int, num_slices: int = 1
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(per-slice ICI sizes, DCN sizes) over AXES, with -1 resolved; raises on inconsistency."""
  dcn = _resolve([_get(parallel_cfg, k, 1) for k in DCN_KEYS], num_slices,
                 f'the job ({num_slices} slice(s))', DCN_KEYS)
  if num_devices % num_slices:
    raise ValueError(f'{num_devices} devices do not split evenly into {num_slices} slices')
  ici = _resolve([_get(parallel_cfg, a, 1 if a != 'data' else -1) for a in AXES],
                 num_devices // num_slices,
                 'each slice' if num_slices > 1 else 'the job', AXES)
  return ici, dcn


def make_mesh(parallel_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` over AXES from the `parallel` config (sizes may use one -1).

  Args:
    parallel_cfg: the config's `parallel` section (ConfigDict or dict; see `default_config`).
    devices: defaults to `jax.devices()`; the AOT planner passes TPU topology devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n_slices = _num_slices(devices)
  ici, dcn = mesh_shape(parallel_cfg, len(devices), n_slices)
  if n_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                               allow_split_physical_axes=True)
  else:
    try:
      arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      # Device kinds mesh_utils has no physical layout for: plain id order.
      arr = np.asarray(devices).reshape(ici)
  return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return dict(zip(mesh.axis_names, mesh.devices.shape))


# --------------------------------------------------------------------------------------------
# Start-up validation.

def check(parallel_cfg: Any, *, num_devices: int, num_slices: int = 1,
          global_batch: int | None = None, seq_len: int | None = None,
          num_experts: int | None = None, num_moe_layers: int | None = None,
          num_dense_layers: int | None = None, num_processes: int = 1) -> dict[str, int]:
  """Checks a parallel config against the job and the model; returns the resolved axis sizes.

  Every error names the config field to change. Quantities left as None are not checked.
  """
  ici, dcn = mesh_shape(parallel_cfg, num_devices, num_slices)
  sizes = {a: i * d for a, i, d in zip(AXES, ici, dcn)}
  preset = _get(parallel_cfg, 'rules', 'dp')
  rules = rules_lib.get_rules(preset)  # raises on an unknown name
  errors = []
  batch_axes = rules_lib.mesh_axes_of(rules, 'act_batch')
  batch_ways = math.prod(sizes[a] for a in batch_axes)
  if global_batch is not None:
    if global_batch % batch_ways:
      errors.append(
          f'the global batch size {global_batch} is not divisible by the {batch_ways} ways the '
          f'batch is split (rules {preset!r} shard it over '
          + ' x '.join(f'{a}={sizes[a]}' for a in batch_axes)
          + f'); use a batch size that is a multiple of {batch_ways}')
    if global_batch % num_processes:
      errors.append(f'the global batch size {global_batch} is not divisible by the '
                    f'{num_processes} host processes; each host must feed the same number of rows')
  if seq_len is not None and sizes['context'] > 1:
    # Load-balanced causal context parallelism splits the sequence into 2 * context chunks.
    if seq_len % (2 * sizes['context']):
      errors.append(
          f'data.seq_len={seq_len} is not divisible by 2 x parallel.context = '
          f'{2 * sizes["context"]} (load-balanced causal context parallelism cuts each row into '
          f'2 x context chunks); pick seq_len a multiple of {2 * sizes["context"]} or a smaller '
          'context axis')
  if sizes['expert'] > 1:
    if not num_experts:
      if num_experts is not None:
        errors.append(f'parallel.expert={sizes["expert"]} but the model has no routed experts; '
                      'set parallel.expert=1')
    elif num_experts % sizes['expert']:
      errors.append(
          f'the model has {num_experts} routed experts, not divisible by parallel.expert='
          f'{sizes["expert"]} (x dcn_expert); choose an expert axis that divides {num_experts}')
    if 'expert' not in rules_lib.mesh_axes_of(rules, 'expert'):
      errors.append(f'parallel.expert={sizes["expert"]} but rules {preset!r} do not shard '
                    "experts over it; choose a preset with expert parallelism (e.g. 'dp_ep')")
  if sizes['pipeline'] > 1:
    # The pipeline stages split the MoE stack; the leading dense layer(s) run outside it.
    n = num_moe_layers or num_dense_layers
    if n and n % sizes['pipeline']:
      errors.append(
          f'the model has {n} pipelined decoder layers (the MoE stack), not divisible by '
          f'parallel.pipeline={sizes["pipeline"]}; every stage must hold the same number of '
          f'layers, so use a pipeline axis dividing {n}')
  if errors:
    raise ValueError('invalid parallel config:\n  - ' + '\n  - '.join(errors))
  return sizes


def validate(config: Any, model_config: Any = None, num_devices: int | None = None,
             num_slices: int | None = None, num_processes: int | None = None) -> dict[str, int]:
  """`check` driven by a whole stage config (`parallel`, `data`, `model` sections).

  Reads `config.parallel`, `config.data.seq_len` and the global batch: `config.data.
  global_batch_size` if set, else `config.data.batch_size` (rows per host, as the data pipeline
  reads it) times the number of processes. The model's expert and layer
  counts come from `model_config` (a `KimiVLConfig`) or, if None, from the `config.model` preset.
  Device, slice and process counts default to the running job's.
  """
  par = _get(config, 'parallel')
  if par is None:
    raise ValueError('the config has no `parallel` section (see parallel.mesh.default_config)')
  data = _get(config, 'data', {}) or {}
  if num_processes is None:
    num_processes = jax.process_count()
  batch = _get(data, 'global_batch_size')
  if batch is None and _get(data, 'batch_size') is not None:
    batch = int(_get(data, 'batch_size')) * num_processes
  seq_len = _get(data, 'seq_len')
  if model_config is None:
    name = _get(config, 'model')
    if isinstance(name, str):
      from kimi_vl_jax.model import config as model_config_lib
      if name in model_config_lib.PRESETS:
        model_config = model_config_lib.get_preset(name)
  text = getattr(model_config, 'text', None)
  devices = jax.devices() if num_devices is None or num_slices is None else None
  return check(
      par,
      num_devices=num_devices if num_devices is not None else len(devices),
      num_slices=num_slices if num_slices is not None else _num_slices(devices),
      global_batch=batch, seq_len=seq_len,
      num_experts=text.n_routed_experts if text is not None else None,
      num_moe_layers=text.num_moe_layers if text is not None else None,
      num_dense_layers=text.num_dense_layers if text is not None else None,
      num_processes=num_processes)
