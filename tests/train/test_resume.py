"""Kill a training run with SIGKILL part-way, rerun the same command: the losses of every step
equal (bitwise) those of an uninterrupted run, with the same data order; half-written
checkpoints are never picked up."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kimi_vl_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'train', 'resume_config.py')
STEPS = 14


def _cmd(workdir):
  return [sys.executable, '-m', 'kimi_vl_jax.main', f'--config={CONFIG}:{STEPS}',
          f'--workdir={workdir}']


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _complete_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise(tmp_path):
  ref_dir, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
  subprocess.run(_cmd(ref_dir), check=True, cwd=ROOT, env=_env(), capture_output=True)
  ref = read_metrics(ref_dir)
  assert [r['step'] for r in ref] == list(range(1, STEPS + 1))

  proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  # Kill once the checkpoint at step 9 (mid phase b, so the data iterator position is restored)
  # is complete and at least one more step ran.
  while time.time() < deadline:
    done = read_metrics(run_dir)
    if 9 in _complete_steps(run_dir) and done and done[-1]['step'] >= 10:
      break
    if proc.poll() is not None:
      pytest.fail('the run finished before it could be killed; make it longer')
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = read_metrics(run_dir)[-1]['step']
  assert killed_at < STEPS
  resume_from = max(_complete_steps(run_dir))
  # A checkpoint cut off mid-write (what a kill during an async save leaves) is ignored.
  junk = os.path.join(run_dir, 'checkpoints', f'{STEPS - 1}.orbax-checkpoint-tmp-1234')
  os.makedirs(os.path.join(junk, 'state'), exist_ok=True)
  with open(os.path.join(junk, 'state', 'garbage'), 'w') as f:
    f.write('not a checkpoint')

  subprocess.run(_cmd(run_dir), check=True, cwd=ROOT, env=_env(), capture_output=True)
  with open(os.path.join(run_dir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['resumed_from'] == resume_from
  assert not os.path.exists(junk)
  run = read_metrics(run_dir)
  assert [r['step'] for r in run] == list(range(1, STEPS + 1))
  for a, b in zip(ref, run):
    assert a['loss'] == b['loss'], (a['step'], a['loss'], b['loss'])            # bitwise
    assert a['loss_tokens'] == b['loss_tokens'], a['step']                      # same data
    assert a['grad_norm'] == b['grad_norm'], a['step']
  # The resumed run really re-ran steps after the checkpoint (not just re-read the old log).
  lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl')) if l.strip()]
  steps_logged = [r['step'] for r in lines if r.get('kind') == 'train']
  if resume_from < killed_at:
    assert steps_logged.count(resume_from + 1) == 2
