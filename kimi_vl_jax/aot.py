"""TPU ahead-of-time memory planning on a CPU-only machine.

    python -m kimi_vl_jax.aot --config=configs/joint_sft.py --topology=v5p-256 [--phase=NAME]
        [--num_slices=2] [--config.parallel.expert=16 ...]
    python -m kimi_vl_jax.aot --config=configs/rl.py --topology=v5p-256   # `aot_rl.py`

compiles the real train step (`train/train_step.py`, with the optimizer, ZeRO-1 shardings and the
rule preset of the config) of the configured model for a TPU topology that is not attached, using
jax's topology descriptions and the `libtpu` compiler, and prints per-device argument / output /
temporary memory against the chip's HBM, whether it fits, and the step's accounting (below).
Nothing is allocated: parameters, optimizer state and the batch are `jax.ShapeDtypeStruct`s
carrying their shardings. (MaxText's `train_compile.py` is the model; topology names follow Cloud TPU's
user-facing accelerator types, `v5p-256` = 128 v5p chips, `v5e-256` = 256 v5e chips.)

Notes on the figures: XLA's `memory_analysis()` reports the per-device sizes of one SPMD program;
total = arguments + outputs + temporaries - aliased (the donated train state is updated in place,
so its outputs alias its arguments).

Accounting (`parallel/hlo_cost.py`): per-device FLOPs, HBM bytes and collective bytes of the
compiled program with every loop body multiplied by its trip count (`cost_analysis()` counts a
`while` body once, so a scanned layer stack counts as one layer), split by part of the model;
the useful FLOPs of the step (`model/flops.py`: 6 x active matmul parameters x tokens +
attention, MoonViT included) over the devices; `waste factor` = compiled matmul FLOPs / useful
FLOPs; a roofline step time = max(matmul FLOPs / peak bf16 FLOP/s, HBM bytes / HBM bandwidth)
from the chip's published figures (`CHIP_SPECS`), collectives assumed overlapped (their time at
the ICI bandwidth is printed beside it); projected MFU = useful FLOPs / (roofline time x peak).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Any

# The compile runs on the CPU host; libtpu is only the compiler. Several jax processes on one
# machine must not fight over libtpu's single-process lock file for that.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kimi_vl_jax.model import flops as flops_lib  # noqa: E402
from kimi_vl_jax.parallel import hlo_cost  # noqa: E402
from kimi_vl_jax.parallel import mesh as mesh_lib  # noqa: E402
from kimi_vl_jax.parallel import rules as rules_lib  # noqa: E402

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
  """What `jax.experimental.topologies.get_topology_desc` needs, plus the chip's HBM."""
  name: str                      # user-facing, e.g. 'v5p-256'
  topology_name: str             # libtpu's, e.g. 'v5:4x4x8'
  chip_config_name: str          # 'megacore' (v4/v5p: one device per chip) or 'default'
  chips_per_host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]  # torus wrap-around links per dimension
  hbm_bytes: int
  num_chips: int
  chip: str = ''                 # 'v5p', ... (key of CHIP_SPECS)


# Chip -> (libtpu prefix, HBM per chip, counts TensorCores in the name, dims of the ICI).
_CHIPS = {
    'v4': ('v4', 32 * GiB, True, 3),
    'v5p': ('v5', 95 * GiB, True, 3),
    'v5e': ('v5e', 16 * GiB, False, 2),
    'v6e': ('v6e', 32 * GiB, False, 2),
}
# Standard slice shapes by chip count (Cloud TPU docs; MaxText accelerator_to_spec_map).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 192: (4, 4, 12), 256: (4, 8, 8), 384: (4, 8, 12), 512: (8, 8, 8),
              1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published per-chip figures (Google Cloud TPU system architecture pages)."""
  peak_bf16_flops: float        # FLOP/s
  hbm_bytes_per_s: float
  hbm_bytes: float              # as published (GB or GiB)
  ici_bytes_per_s: float | None  # bidirectional inter-chip interconnect per chip


CHIP_SPECS = {
    'v4': ChipSpec(275e12, 1200e9, 32 * GiB, None),
    'v5e': ChipSpec(197e12, 819e9, 16e9, 400e9),
    'v5p': ChipSpec(459e12, 2765e9, 95 * GiB, 1200e9),
    'v6e': ChipSpec(918e12, 1638e9, 32e9, 800e9),
}


def topology(name: str) -> Topology:
  """'v5p-256' / 'v5e-64' / 'v6e-8' / 'v4-32' -> the topology description arguments."""
  chip, _, count = name.partition('-')
  if chip not in _CHIPS or not count.isdigit():
    raise ValueError(f'unknown topology {name!r}: use <chip>-<size> with chip in {sorted(_CHIPS)}, '
                     'e.g. v5p-256, v5e-256, v6e-64')
  prefix, hbm, counts_cores, ndim = _CHIPS[chip]
  n = int(count)
  chips = n // 2 if counts_cores else n
  shapes = _SHAPES_3D if ndim == 3 else _SHAPES_2D
  if chips not in shapes or (counts_cores and n % 2):
    sizes = sorted(c * 2 if counts_cores else c for c in shapes)
    raise ValueError(f'{name!r}: no standard {chip} slice of that size; choose one of '
                     + ', '.join(f'{chip}-{s}' for s in sizes))
  shape = shapes[chips]
  if ndim == 3:
    wrap = (True, True, True) if chips >= 64 else (False, False, False)
    per_host = (2, 2, 1)
  else:
    wrap = {256: (True, True, False), 128: (False, True, False)}.get(chips, (False,) * 3)
    per_host = {1: (1, 1, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
  return Topology(name, f'{prefix}:' + 'x'.join(map(str, shape)),
                  'megacore' if counts_cores else 'default', per_host, wrap, hbm, chips, chip)


def topology_devices(topo: Topology, num_slices: int = 1) -> list:
  from jax.experimental.topologies import get_topology_desc
  desc = get_topology_desc(platform='tpu', topology_name=topo.topology_name,
                           chip_config_name=topo.chip_config_name,
                           chips_per_host_bounds=topo.chips_per_host_bounds,
                           num_slices=num_slices, wrap=topo.wrap)
  return list(desc.devices)


# --------------------------------------------------------------------------------------------
# The step to compile.

def _phase(cfg, phase: str | None):
  """The named phase of the config (default: the last), with its merged data config; source
  paths stay unresolved: compiling reads no data, so `config.data_dir` is not needed."""
  from kimi_vl_jax.train.stage_config import resolve_phases
  phases = resolve_phases(cfg, resolve_paths=False)
  if phase is None:
    return phases[-1]
  for ph in phases:
    if ph['name'] == phase:
      return ph
  raise ValueError(f'--phase={phase!r}: the config has phases {[p["name"] for p in phases]}')


def lower_train_step(cfg, devices, *, phase: str | None = None, global_batch: int | None = None):
  """(jax.stages.Lowered, info dict) of the config's train step on a mesh of `devices` (abstract
  inputs). The parallel config is validated against the devices first (`parallel.mesh.validate`),
  so a bad one stops here with the field to change, before any tracing or compiling."""
  import ml_collections

  from kimi_vl_jax.data.batch import BatchSpec
  from kimi_vl_jax.train.init import StateFactory, model_config
  from kimi_vl_jax.train.train_step import jit_train_step

  ph = _phase(cfg, phase)
  data = ph['data']
  num_hosts = len({d.process_index for d in devices})
  if global_batch is None:
    global_batch = int(data.get('global_batch_size', 0) or 0) or int(data.batch_size) * num_hosts
  mc = model_config(cfg, ph['model_overrides'])
  checked = ml_collections.ConfigDict({'parallel': cfg.parallel, 'data': {
      'seq_len': int(data.seq_len), 'global_batch_size': global_batch}})
  sizes = mesh_lib.validate(
      checked, mc, num_devices=len(devices),
      num_slices=len({getattr(d, 'slice_index', 0) for d in devices}), num_processes=num_hosts)
  mesh = mesh_lib.make_mesh(cfg.parallel, devices=devices)
  factory = StateFactory(cfg, mc, mesh)
  spec = BatchSpec.from_config(data, mc, rows=global_batch)
  jitted = jit_train_step(factory, mc, cfg.train, spec)
  with rules_lib.sharding_context(mesh, factory.rules):
    lowered = jitted.lower(factory.abstract,
                           spec.abstract(rules_lib.batch_sharding(mesh, factory.rules)))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(factory.abstract.params))
  image = data.get('image', None) or {}
  useful = flops_lib.useful_flops(
      mc, rows=global_batch, seq_len=spec.seq_len, max_patches=spec.max_patches,
      image_patches=image.get('max_patches', None), params=factory.abstract.params)
  info = {'phase': ph['name'], 'seq_len': spec.seq_len, 'global_batch': global_batch,
          'max_patches': spec.max_patches, 'mesh': sizes, 'rules': cfg.parallel.rules,
          'params': n_params, 'dtype': mc.dtype, 'param_dtype': mc.param_dtype,
          'remat': mc.remat_policy, 'devices': len(devices),
          'useful': {k: v / len(devices) for k, v in useful.items()}}
  return lowered, info


# --------------------------------------------------------------------------------------------
# Report.

def memory_report(compiled, hbm_bytes: int) -> dict[str, Any]:
  """Per-device byte counts from `compiled.memory_analysis()` and FLOPs from `cost_analysis()`."""
  m = compiled.memory_analysis()
  arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  code = int(getattr(m, 'generated_code_size_in_bytes', 0))
  total = arg + out + temp - alias + code
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get('flops', float('nan')))
  return {'argument': arg, 'output': out, 'temp': temp, 'alias': alias, 'code': code,
          'total': total, 'hbm': hbm_bytes, 'fits': total <= hbm_bytes, 'flops': flops}


_OOM = re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM '
                  r'\(([\d.]+)([KMGT])\)')


def oom_report(error: Exception, hbm_bytes: int) -> dict[str, Any] | None:
  """The report of a compile that XLA refused because temporaries exceed HBM (else None).

  The TPU compiler stops at `CompileTimeHbmOom` before producing an executable; its message
  carries the temporaries it needed, which is the figure that matters for planning.
  """
  m = _OOM.search(str(error))
  if m is None:
    return None
  unit = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
  temp = int(float(m.group(1)) * unit[m.group(2)])
  nan = float('nan')
  return {'argument': None, 'output': None, 'temp': temp, 'alias': None, 'code': None,
          'total': temp, 'hbm': hbm_bytes, 'fits': False, 'flops': nan,
          'error': 'CompileTimeHbmOom'}


def accounting(cost: hlo_cost.StepCost, useful: dict[str, float], chip: str) -> dict[str, Any]:
  """Waste factor, roofline step time and projected MFU of a loop-corrected per-device cost
  (`hlo_cost.compiled_cost`) against the per-device useful FLOPs (`model.flops.useful_flops`
  divided by the devices) on `chip` (a key of CHIP_SPECS)."""
  spec = CHIP_SPECS[chip]
  t_compute = cost.matmul_flops / spec.peak_bf16_flops
  t_memory = cost.bytes / spec.hbm_bytes_per_s
  t_step = max(t_compute, t_memory)
  return {
      'waste_factor': cost.matmul_flops / useful['total'] if useful['total'] else float('nan'),
      't_compute': t_compute, 't_memory': t_memory, 't_step': t_step,
      't_collective': (cost.collective_bytes / spec.ici_bytes_per_s
                       if spec.ici_bytes_per_s else float('nan')),
      'mfu': useful['total'] / (t_step * spec.peak_bf16_flops) if t_step else float('nan'),
  }


def format_accounting(cost: hlo_cost.StepCost, useful: dict[str, float], chip: str,
                      xla_flops: float) -> list[str]:
  acc = accounting(cost, useful, chip)
  spec = CHIP_SPECS[chip]
  e = lambda x: f'{x:.3e}'  # noqa: E731
  lines = [
      f'loop-corrected per device per step: FLOPs {e(cost.flops)} (matmul '
      f'{e(cost.matmul_flops)}; cost_analysis {e(xla_flops)}), HBM bytes {e(cost.bytes)}, '
      f'collective bytes {e(cost.collective_bytes)}',
      '  by part           matmul FLOPs    HBM bytes   collective bytes',
  ]
  for part, m in cost.by_part.items():
    if any(m.values()):
      lines.append(f'  {part:<14} {e(m["matmul_flops"]):>14} {e(m["bytes"]):>12} '
                   f'{e(m["collective_bytes"]):>14}')
  if cost.collectives:
    lines.append('  collectives: ' + ', '.join(f'{k} {e(v)}' for k, v in
                                               sorted(cost.collectives.items())))
  if cost.lower['matmul_flops'] != cost.matmul_flops:
    lines.append(f'  (conditionals at their costliest branch; at the cheapest: matmul FLOPs '
                 f'{e(cost.lower["matmul_flops"])}, bytes {e(cost.lower["bytes"])})')
  if cost.unknown_trip_counts:
    lines.append(f'  {len(cost.unknown_trip_counts)} loop(s) of unknown trip count counted once')
  if cost.custom_calls:
    lines.append('  custom calls not costed (executions): ' + ', '.join(
        f'{k} {v:.0f}' for k, v in sorted(cost.custom_calls.items())))
  lines += [
      f'useful FLOPs per device: {e(useful["total"])} (text matmuls {e(useful["text_matmul"])}, '
      f'text attention {e(useful["text_attention"])}, vision matmuls '
      f'{e(useful["vision_matmul"])}, vision attention {e(useful["vision_attention"])})',
      f'waste factor: {acc["waste_factor"]:.2f}' + (
          f' ({cost.lower["matmul_flops"] / useful["total"]:.2f} with conditionals at their '
          'cheapest branch)' if cost.lower['matmul_flops'] != cost.matmul_flops else ''),
      f'roofline on {chip} ({spec.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, '
      f'{spec.hbm_bytes_per_s / 1e9:.0f} GB/s HBM): compute {acc["t_compute"]:.3f} s, memory '
      f'{acc["t_memory"]:.3f} s -> step {acc["t_step"]:.3f} s; collectives '
      f'{acc["t_collective"]:.3f} s at ICI bandwidth (assumed overlapped); projected MFU '
      f'{100 * acc["mfu"]:.1f}%',
  ]
  return lines


def format_report(topo: Topology, num_slices: int, info: dict, rep: dict,
                  seconds: float) -> str:
  g = lambda b: f'{b / GiB:.2f} GiB' if b >= GiB / 10 else f'{b / 2**20:.1f} MiB'  # noqa: E731
  mesh = ' x '.join(f'{k}={v}' for k, v in info['mesh'].items())
  head = [
      f'topology {topo.name} x {num_slices} slice(s) ({topo.topology_name}, '
      f'{topo.num_chips * num_slices} chips), mesh {mesh}, rules {info["rules"]!r}',
      f'phase {info["phase"]!r}: global batch {info["global_batch"]} x seq_len {info["seq_len"]}'
      f' (max_patches {info["max_patches"]}), {info["params"] / 1e9:.2f}B params '
      f'({info["param_dtype"]} storage, {info["dtype"]} compute, remat {info["remat"]!r})']
  if rep.get('error') == 'CompileTimeHbmOom':
    return '\n'.join(head + [
        f'DOES NOT FIT: the TPU compiler stopped (CompileTimeHbmOom) because the step needs '
        f'{g(rep["temp"])} of temporaries per device alone, vs HBM {g(rep["hbm"])} '
        f'({rep["temp"] / rep["hbm"]:.1f}x); compile time {seconds:.0f} s'])
  lines = head + [
      f'per-device memory:  arguments {g(rep["argument"])}   outputs {g(rep["output"])}   '
      f'temporaries {g(rep["temp"])}   aliased {g(rep["alias"])}',
      f'                    total {g(rep["total"])}  vs HBM {g(rep["hbm"])}  '
      f'({100 * rep["total"] / rep["hbm"]:.0f}%)  -> ' + ('FITS' if rep['fits'] else 'DOES NOT FIT'),
      f'compile time {seconds:.0f} s',
  ]
  if rep.get('cost') is not None:
    lines += format_accounting(rep['cost'], info['useful'], topo.chip, rep['flops'])
  return '\n'.join(lines)


def plan(cfg, topology_name: str, *, num_slices: int = 1, phase: str | None = None,
         global_batch: int | None = None, hlo_out: str | None = None) -> tuple[str, dict]:
  """Compiles the config's step for the topology; (report text, figures). `hlo_out`: also
  write the optimised per-device HLO module's text there (`hlo_cost.hlo_cost` reads it)."""
  topo = topology(topology_name)
  devices = topology_devices(topo, num_slices)
  t0 = time.time()
  lowered, info = lower_train_step(cfg, devices, phase=phase, global_batch=global_batch)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    compiled, rep = None, oom_report(e, topo.hbm_bytes)
    if rep is None:
      raise
  seconds = time.time() - t0
  if compiled is not None:
    rep = memory_report(compiled, topo.hbm_bytes)
    text = compiled.as_text()
    if hlo_out:
      with open(hlo_out, 'w') as f:
        f.write(text)
    rep['cost'] = hlo_cost.hlo_cost(text)
    rep.update(accounting(rep['cost'], info['useful'], topo.chip))
  return format_report(topo, num_slices, info, rep, seconds), {**info, **rep,
                                                               'seconds': seconds}


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'stage config file (path[:arg])',
                                  lock_config=False)
  flags.DEFINE_string('topology', 'v5p-256', 'TPU slice type, e.g. v5p-256, v5e-256, v6e-64')
  flags.DEFINE_integer('num_slices', 1, 'number of slices (multi-slice over DCN)')
  flags.DEFINE_string('phase', None, 'phase name of the stage config (default: the last)')
  flags.DEFINE_integer('global_batch', None, 'override the global batch (rows)')
  flags.DEFINE_string('hlo_out', None, 'also write the compiled HLO module text to this file')

  def run(_):
    FLAGS = flags.FLAGS
    if FLAGS.config is None:
      raise app.UsageError('--config is required, e.g. --config=configs/joint_sft.py')
    if FLAGS.config.stage == 'rl':   # the policy step and the colocated decode step
      from kimi_vl_jax import aot_rl
      if FLAGS.num_slices != 1 or FLAGS.phase or FLAGS.global_batch or FLAGS.hlo_out:
        raise app.UsageError('an rl config takes --topology only (rows, lengths and the decode '
                             'batch come from its rl section)')
      text, _ = aot_rl.plan(FLAGS.config, FLAGS.topology)
    else:
      text, _ = plan(FLAGS.config, FLAGS.topology, num_slices=FLAGS.num_slices,
                     phase=FLAGS.phase, global_batch=FLAGS.global_batch,
                     hlo_out=FLAGS.hlo_out)
    print(text, flush=True)

  app.run(run, argv=argv or sys.argv)


if __name__ == '__main__':
  main()
