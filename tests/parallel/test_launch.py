"""launch/tpu.sh: the gcloud commands it would run (DRY_RUN). The notebook: tests/launch."""

import json
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, 'launch', 'tpu.sh')


def _dry(*args, **env):
  if shutil.which('bash') is None:
    pytest.skip('no bash')
  e = {**os.environ, 'DRY_RUN': '1', 'REPO_URL': 'https://example.org/kimi_vl_jax.git', **env}
  r = subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, env=e, timeout=60)
  return r.returncode, r.stdout, r.stderr


def test_single_slice_create_and_run_on_every_host():
  rc, out, _ = _dry('create', ACCEL='v5e-64', SPOT='1')
  assert rc == 0
  assert ('gcloud compute tpus tpu-vm create kimi-vl --zone=us-east5-a '
          '--accelerator-type=v5litepod-64 --version=v2-alpha-tpuv5-lite --spot') in out
  rc, out, _ = _dry('run', '--config=configs/joint_sft.py:tiny')
  assert rc == 0 and out.count('--worker=all') == 1
  assert 'python -m kimi_vl_jax.main --config=configs/joint_sft.py:tiny' in out.replace('\\', '')


def test_multislice_queued_resource_and_one_ssh_per_slice():
  rc, out, _ = _dry('queue', NUM_SLICES='2', ACCEL='v5p-256')
  assert rc == 0
  assert '--node-count=2 --node-prefix=kimi-vl' in out and '--runtime-version=v2-alpha-tpuv5' in out
  rc, out, _ = _dry('install', NUM_SLICES='3')
  lines = [l for l in out.splitlines() if l.startswith('gcloud')]
  assert [l.split()[5] for l in lines] == ['kimi-vl-0', 'kimi-vl-1', 'kimi-vl-2']
  assert all('--worker=all' in l and 'pip install' in l.replace('\\', '') for l in lines)
  rc, _, err = _dry('create', NUM_SLICES='2')
  assert rc == 2 and 'queued resource' in err


def test_bad_input_is_refused():
  rc, _, err = _dry('create', ACCEL='h100-8')
  assert rc != 0 and 'unknown accelerator type h100-8' in err
  rc, _, err = _dry('frobnicate')
  assert rc == 2 and "unknown subcommand 'frobnicate'" in err
