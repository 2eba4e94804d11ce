"""Two CPU processes on localhost (gloo collectives) train, checkpoint and restore together, and
load an HF checkpoint into shardings that span both.

The 2-process run (2 devices each, a 2 x 2 ('data', 'expert') mesh across both) must give the same
losses as one process with 4 devices fed the same global batch, and continuing from the restored
checkpoint must match continuing from memory. `hf.load` with shardings must read in each process
only the blocks of its own devices.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from kimi_vl_jax.checkpoint import hf, hf_mapping
from kimi_vl_jax.model import config as config_lib
from tests.xla_env import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, 'multihost_worker.py')
HF_WORKER = os.path.join(HERE, 'hf_load_worker.py')
BUCKET_WORKER = os.path.join(HERE, 'bucket_checkpoint_worker.py')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(local_devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'))}
  env.update(XLA_FLAGS=xla_flags(local_devices),
             JAX_PLATFORMS='cpu', **extra)
  return env


def _launch(tmp_path, name: str, nproc: int, local_devices: int):
  out = str(tmp_path / f'{name}.json')
  work = tmp_path / name
  work.mkdir()
  return out, _spawn([WORKER, out, str(work)], nproc, local_devices)


def _spawn(argv: list[str], nproc: int, local_devices: int) -> list[subprocess.Popen]:
  """`nproc` processes of `python *argv` joined by jax.distributed on a free localhost port."""
  port = _free_port()
  procs = []
  for pid in range(nproc):
    extra = {}
    if nproc > 1:
      extra = dict(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(nproc),
                   JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, *argv], env=_env(local_devices, **extra),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, timeout=600):
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]


@pytest.mark.slow
def test_two_processes_train_checkpoint_restore(tmp_path):
  two_out, two = _launch(tmp_path, 'two', nproc=2, local_devices=2)
  _wait(two)
  one_out, one = _launch(tmp_path, 'one', nproc=1, local_devices=4)
  _wait(one)
  with open(two_out) as f:
    r2 = json.load(f)
  with open(one_out) as f:
    r1 = json.load(f)
  assert (r2['process_count'], r2['device_count'], r2['local_devices']) == (2, 4, 2)
  assert (r1['process_count'], r1['device_count']) == (1, 4)
  # Training makes progress and both layouts compute the same thing.
  assert r2['losses'][-1] < r2['losses'][0]
  np.testing.assert_allclose(r2['losses'], r1['losses'], rtol=2e-5)
  # Restored state continues exactly as the in-memory one.
  np.testing.assert_allclose(r2['restored_losses'], r2['losses'], rtol=1e-6)
  np.testing.assert_allclose(r2['restored_checksum'], r2['checksum'], rtol=1e-6)
  # ZeRO-1: the restored Adam moment of the experts is split over expert and data.
  assert r2['mu_spec'] == r1['mu_spec'] and 'data' in r2['mu_spec'] and 'expert' in r2['mu_spec']
  assert np.prod(r2['mu_local_shape']) * 4 == np.prod(r2['mu_shape'])


@pytest.mark.slow  # 9-21 s on 2 busy cores (two jax start-ups); the loads take < 1 s
def test_two_processes_each_read_only_their_part_of_an_hf_checkpoint(tmp_path):
  config = config_lib.tiny()
  rng = np.random.default_rng(0)
  hf.save(config, hf_mapping.unflatten(
      {p: rng.standard_normal(s).astype(np.float32)
       for p, s in hf_mapping.param_shapes(config).items()}), str(tmp_path / 'hf'))
  prefix = str(tmp_path / 'out')
  _wait(_spawn([HF_WORKER, str(tmp_path / 'hf'), prefix], nproc=2, local_devices=2))
  results = []
  for pid in range(2):
    with open(f'{prefix}.{pid}.json') as f:
      results.append(json.load(f))
  tree = sum(results[0]['param_bytes'].values())
  split = [p for p, s in results[0]['spans_processes'].items() if s]
  split_bytes = sum(results[0]['param_bytes'][p] for p in split)
  for pid, r in enumerate(results):
    assert (r['process_count'], r['device_count']) == (2, 4)
    assert r['local_equal']
    # 'embed'-like dims split 4 ways over 'data' (2 devices per process): each process reads
    # exactly half of every split parameter, and all of the replicated ones (norms, kv_b_proj).
    for p, full in r['param_bytes'].items():
      assert r['bytes_by_param'][p] == (full // 2 if p in split else full), p
    print(f'\nprocess {pid}: read {r["bytes_read"]:,d} of {tree:,d} B (split params: '
          f'{sum(r["bytes_by_param"][p] for p in split):,d} of {split_bytes:,d} B)')
  assert split_bytes > 0.9 * tree
  assert all(r['bytes_read'] < 0.6 * tree for r in results)


@pytest.mark.slow  # two jax start-ups, about 10-20 s on 2 busy cores
def test_two_processes_checkpoint_to_a_gcs_bucket_directly(tmp_path, gcs_env):
  """Train checkpoints on gs:// (the GCS emulator on localhost) from a 2-process run: each
  process writes its own shards to the bucket (no staging directory), retention applies, and a
  restart restores every process's shards and its data-iterator position."""
  from kimi_vl_jax.storage import paths
  _, bucket = gcs_env
  url = f'gs://{bucket}/run/checkpoints'
  prefix = str(tmp_path / 'out')
  _wait(_spawn([BUCKET_WORKER, prefix, url], nproc=2, local_devices=2), timeout=300)
  for pid in range(2):
    with open(f'{prefix}.{pid}.json') as f:
      r = json.load(f)
    assert r['manager'] == 'CheckpointManager' and r['location'] == url   # not mirrored
    assert r['all_steps'] == [2, 3] and r['latest'] == 3 and r['step'] == 3
    assert r['shards_ok'] and r['local_shards'] == 2
    assert r['iterator_pos'] == 300 + pid and r['meta'] == {'phase': 0}
  assert paths.listdir(url) == ['2', '3']
  assert paths.exists(f'{url}/3/commit_success.txt')
  state = paths.listdir(f'{url}/3/state')
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(state)   # each process wrote its shards
  cache_dir = os.environ['KIMI_VL_JAX_STORAGE_CACHE_DIR']
  assert not os.path.exists(os.path.join(cache_dir, 'staging'))
