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


def test_compile_time_hbm_oom_becomes_a_does_not_fit_report():
  err = RuntimeError('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the '
                     'total memory required for HLO temporaries (310.53G) exceeds available HBM '
                     '(95.73G). HLO module: jit_train_step.')
  rep = aot.oom_report(err, 95 * aot.GiB)
  assert not rep['fits'] and abs(rep['temp'] / aot.GiB - 310.53) < 1e-6
  assert aot.oom_report(RuntimeError('INTERNAL: something else'), 95 * aot.GiB) is None
