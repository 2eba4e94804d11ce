"""TPU AOT planning: topology names, and a compile for an unattached TPU slice with libtpu."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from kimi_vl_jax import aot  # noqa: E402
from kimi_vl_jax.parallel import mesh as mesh_lib  # noqa: E402


def test_topology_names():
  t = aot.topology('v5p-256')
  assert (t.topology_name, t.chip_config_name, t.num_chips, t.wrap) == (
      'v5:4x4x8', 'megacore', 128, (True, True, True))
  t = aot.topology('v5e-256')
  assert (t.topology_name, t.chips_per_host_bounds, t.wrap, t.hbm_bytes) == (
      'v5e:16x16', (2, 2, 1), (True, True, False), 16 * aot.GiB)
  assert aot.topology('v6e-8').chips_per_host_bounds == (2, 4, 1)
  assert aot.topology('v5p-16').wrap == (False, False, False)
  with pytest.raises(ValueError, match='v5p-8, v5p-16'):
    aot.topology('v5p-12')
  with pytest.raises(ValueError, match='unknown topology'):
    aot.topology('h100-8')


def test_compile_for_an_unattached_tpu_slice_reports_memory():
  libtpu = pytest.importorskip('libtpu')
  del libtpu
  topo = aot.topology('v5e-8')
  devices = aot.topology_devices(topo)
  assert len(devices) == 8 and 'v5' in devices[0].device_kind.lower()
  cfg = mesh_lib.default_config()
  cfg.expert = 4
  mesh = mesh_lib.make_mesh(cfg, devices=devices)
  w_sh = NamedSharding(mesh, P('expert', None))
  x_sh = NamedSharding(mesh, P('data'))
  w = jax.ShapeDtypeStruct((1024, 2048), jnp.float32, sharding=w_sh)
  x = jax.ShapeDtypeStruct((64, 1024), jnp.float32, sharding=x_sh)
  compiled = jax.jit(lambda w, x: jnp.tanh(x @ w).sum(), in_shardings=(w_sh, x_sh)).lower(
      w, x).compile()
  rep = aot.memory_report(compiled, topo.hbm_bytes)
  # Per device: a quarter of w (2 MiB) and half of x (128 KiB) as arguments.
  assert rep['argument'] == 1024 * 2048 * 4 // 4 + 64 * 1024 * 4 // 2
  assert rep['fits'] and rep['total'] >= rep['argument']
  # 2 * M * K * N over 8 devices, within what XLA adds for tanh / sum.
  np.testing.assert_allclose(rep['flops'], 2 * 64 * 1024 * 2048 / 8, rtol=0.05)
  # The loop-corrected count reads the same matmul from the TPU program (a `convolution` there).
  from kimi_vl_jax.parallel import hlo_cost
  cost = hlo_cost.compiled_cost(compiled)
  assert cost.matmul_flops == 2 * 64 * 1024 * 2048 / 8
  assert cost.collective_bytes > 0 and not cost.loops


def test_compile_time_hbm_oom_becomes_a_does_not_fit_report():
  err = RuntimeError('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the '
                     'total memory required for HLO temporaries (310.53G) exceeds available HBM '
                     '(95.73G). HLO module: jit_train_step.')
  rep = aot.oom_report(err, 95 * aot.GiB)
  assert not rep['fits'] and abs(rep['temp'] / aot.GiB - 310.53) < 1e-6
  assert aot.oom_report(RuntimeError('INTERNAL: something else'), 95 * aot.GiB) is None


# --------------------------------------------------------------------------------------------
# The train step of a stage config: no data needed, the batch contract, start-up validation.

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stage_config(variant: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'joint_sft_config', os.path.join(ROOT, 'configs', 'joint_sft.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def test_lowering_needs_no_data_dir_and_takes_the_batch_contract():
  from kimi_vl_jax.data.batch import BatchSpec
  from kimi_vl_jax.model.config import get_preset
  from kimi_vl_jax.train.stage_config import resolve_phases
  c = _stage_config('')  # the full recipe: its sources read `{data_dir}/...`, left unset here
  with pytest.raises(ValueError, match='data_dir'):
    resolve_phases(c)  # reading data needs it ...
  c.model = 'tiny'     # ... compiling does not (tiny model: a cheap trace)
  c.parallel = mesh_lib.default_config()
  lowered, info = aot.lower_train_step(c, jax.devices(), global_batch=8)
  batch = lowered.args_info[0][1]
  data = resolve_phases(c, resolve_paths=False)[-1]['data']
  want = BatchSpec.from_config(data, get_preset('tiny'), rows=8)
  assert info['seq_len'] == want.seq_len and info['global_batch'] == 8
  assert {k: (a.shape, a.dtype) for k, a in batch.items()} == want.shapes()


def test_bad_parallel_config_stops_before_building_the_step(monkeypatch):
  from kimi_vl_jax.train import init

  def unreachable(*a, **k):
    raise AssertionError('the state / step was built for an invalid parallel config')

  monkeypatch.setattr(init, 'StateFactory', unreachable)
  c = _stage_config('tiny')
  c.parallel.expert = 8  # the tiny demo model has 8 experts, but rules 'dp' do not split them
  with pytest.raises(ValueError, match=r"parallel.expert=8 but rules 'dp'"):
    aot.lower_train_step(c, jax.devices())


def test_cli_stops_on_a_bad_parallel_config_without_data_dir():
  """The full SFT recipe (context=4 x expert=8 = 32 devices per slice) on an 8-chip slice."""
  pytest.importorskip('libtpu')
  import subprocess
  import sys
  import time
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  t0 = time.time()
  out = subprocess.run(
      [sys.executable, '-m', 'kimi_vl_jax.aot', f'--config={ROOT}/configs/joint_sft.py',
       '--topology=v5e-8'], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert out.returncode != 0
  assert 'data_dir' not in out.stderr
  assert 'context=4' in out.stderr and 'the job has 8 devices' in out.stderr, out.stderr[-2000:]
  assert time.time() - t0 < 60


def test_accounting_waste_factor_roofline_and_mfu():
  from kimi_vl_jax.parallel import hlo_cost
  metrics = dict.fromkeys(hlo_cost.METRICS, 0.0)
  cost = hlo_cost.StepCost(
      totals={**metrics, 'flops': 4.2e14, 'matmul_flops': 4.0e14, 'bytes': 5.53e12,
              'collective_bytes': 1.2e11},
      lower={**metrics, 'flops': 3.2e14, 'matmul_flops': 3.0e14, 'bytes': 5.0e12},
      by_part={'vision': {**metrics, 'matmul_flops': 1e14}, 'optimizer': dict(metrics)},
      collectives={'all-gather': 1.2e11}, loops=[('scan', 26)], unknown_trip_counts=[],
      custom_calls={})
  useful = {'total': 2.0e14, 'text_matmul': 1.5e14, 'text_attention': 2e13,
            'vision_matmul': 2e13, 'vision_attention': 1e13}
  acc = aot.accounting(cost, useful, 'v5p')
  assert acc['waste_factor'] == pytest.approx(2.0)
  # v5p: 459 TFLOP/s, 2765 GB/s: compute 0.871 s, memory 2.0 s -> memory-bound.
  assert acc['t_compute'] == pytest.approx(4.0e14 / 459e12)
  assert acc['t_step'] == acc['t_memory'] == pytest.approx(2.0)
  assert acc['mfu'] == pytest.approx(2.0e14 / (2.0 * 459e12))
  assert acc['t_collective'] == pytest.approx(1.2e11 / 1200e9)
  text = '\n'.join(aot.format_accounting(cost, useful, 'v5p', xla_flops=1.6e13))
  assert 'waste factor: 2.00 (1.50 with conditionals at their cheapest branch)' in text
  assert 'projected MFU 21.8%' in text
  assert 'cost_analysis 1.600e+13' in text and 'at the cheapest: matmul FLOPs 3.000e+14' in text
  assert set(aot.CHIP_SPECS) >= {'v5e', 'v5p', 'v6e'}
  assert aot.topology('v6e-8').chip == 'v6e'
