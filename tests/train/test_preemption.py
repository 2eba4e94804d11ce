"""Two processes on localhost: a SIGTERM to one of them makes both stop at the same step (JAX's
preemption sync service, `train/preemption.py`); the one-process SIGTERM path runs in
`test_resume.py`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.parallel.test_multihost import _free_port, _wait
from tests.xla_env import xla_flags

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'preemption_worker.py')
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))


def _progress(prefix, pid) -> int:
  try:
    with open(f'{prefix}.{pid}.progress') as f:
      return int(f.read() or 0)
  except (FileNotFoundError, ValueError):
    return 0


@pytest.mark.slow
def test_sigterm_to_one_host_stops_all_at_one_step(tmp_path):
  prefix, port = str(tmp_path / 'out'), _free_port()
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid), PYTHONPATH=ROOT)
    procs.append(subprocess.Popen([sys.executable, WORKER, prefix], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    deadline = time.time() + 300
    while min(_progress(prefix, 0), _progress(prefix, 1)) < 20:
      assert time.time() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.1)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  procs[1].send_signal(signal.SIGTERM)
  _wait(procs, timeout=120)  # both exit 0
  out = []
  for pid in range(2):
    with open(f'{prefix}.{pid}.json') as f:
      out.append(json.load(f))
  assert [o['process_count'] for o in out] == [2, 2]
  assert out[0]['stopped_at'] is not None and out[0]['stopped_at'] == out[1]['stopped_at']
  assert 20 <= out[0]['stopped_at'] < 3000
