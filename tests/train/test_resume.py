"""Kill a training run with SIGKILL part-way, rerun the same command: the losses of every step
equal (bitwise) those of an uninterrupted run, with the same data order; half-written
checkpoints are never picked up. Preempt one with SIGTERM: it saves a checkpoint at the step it
stopped at and exits cleanly, and the rerun again reproduces the uninterrupted losses bitwise.
Both compare with one uninterrupted reference run, which also shows the optimizer grouping at
start (printed whatever the log verbosity)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kimi_vl_jax.train.metrics import read_metrics
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'train', 'resume_config.py')
# The three tests share one reference run: keep them on one xdist worker (pytest.ini: --dist
# loadgroup), so the reference is computed once.
pytestmark = pytest.mark.xdist_group('resume')

STEPS = 20  # phases a (steps 1-10) and b (11-20); checkpoints every 3 steps


def _cmd(workdir):
  return [sys.executable, '-m', 'kimi_vl_jax.main', f'--config={CONFIG}:{STEPS}',
          f'--workdir={workdir}']


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(1)
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _complete_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(metrics, stdout) of an uninterrupted run."""
  ref_dir = str(tmp_path_factory.mktemp('ref'))
  proc = subprocess.run(_cmd(ref_dir), check=True, cwd=ROOT, env=_env(), capture_output=True,
                        text=True)
  ref = read_metrics(ref_dir)
  assert [r['step'] for r in ref] == list(range(1, STEPS + 1))
  return ref, proc.stdout


def _assert_same_losses(ref, run):
  assert [r['step'] for r in run] == list(range(1, STEPS + 1))
  for a, b in zip(ref, run):
    assert a['loss'] == b['loss'], (a['step'], a['loss'], b['loss'])            # bitwise
    assert a['loss_tokens'] == b['loss_tokens'], a['step']                      # same data
    assert a['grad_norm'] == b['grad_norm'], a['step']


def _wait_for(proc, ready, what):
  deadline = time.time() + 1800  # a tiny run takes 4 min on an idle 2-core CPU, 14 on a busy one
  while time.time() < deadline:
    if ready():
      return
    if proc.poll() is not None:
      pytest.fail(f'the run finished before it could be {what}; make it longer')
    time.sleep(0.2)
  proc.kill()
  pytest.fail(f'the run did not get far enough to be {what} in time')


@pytest.mark.slow
def test_optimizer_grouping_printed_at_start(reference):
  _, stdout = reference
  assert 'optimizer groups' in stdout and 'Muon' in stdout
  assert stdout.index('optimizer groups') < stdout.index('run summary')


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise(tmp_path, reference):
  ref, _ = reference
  run_dir = str(tmp_path / 'run')

  proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Kill once the checkpoint at step 12 (mid phase b, so the data iterator position is
  # restored) is complete and at least one more step ran; 7 steps are left to catch it.
  def ready():
    done = read_metrics(run_dir)
    return 12 in _complete_steps(run_dir) and done and done[-1]['step'] >= 13
  _wait_for(proc, ready, 'killed')
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
  _assert_same_losses(ref, read_metrics(run_dir))
  # The resumed run really re-ran steps after the checkpoint (not just re-read the old log).
  lines = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl')) if l.strip()]
  steps_logged = [r['step'] for r in lines if r.get('kind') == 'train']
  if resume_from < killed_at:
    assert steps_logged.count(resume_from + 1) == 2


@pytest.mark.slow
def test_sigterm_checkpoints_exits_and_resumes_bitwise(tmp_path, reference):
  ref, _ = reference
  run_dir = str(tmp_path / 'run')
  log = str(tmp_path / 'log.txt')
  with open(log, 'w') as f:
    proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, env=_env(), stdout=f,
                            stderr=subprocess.STDOUT)
    # Signal once phase a (steps 1-10) is logged, while phase b compiles: the run stops after
    # step 11, mid phase b (so the data iterator position is saved with the state) and off the
    # checkpoint interval (3).
    _wait_for(proc, lambda: (read_metrics(run_dir) or [{'step': 0}])[-1]['step'] >= STEPS // 2,
              'preempted')
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
  out = open(log).read()
  assert proc.returncode == 0, out[-3000:]
  with open(os.path.join(run_dir, 'summary.json')) as f:
    stopped = json.load(f)['preempted_at']
  assert STEPS // 2 < stopped < STEPS
  assert f'preempted (SIGTERM): checkpoint at step {stopped}' in out
  assert max(_complete_steps(run_dir)) == stopped           # saved at that step, interval or not
  assert read_metrics(run_dir)[-1]['step'] == stopped       # every step it ran is logged

  subprocess.run(_cmd(run_dir), check=True, cwd=ROOT, env=_env(), capture_output=True)
  with open(os.path.join(run_dir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['resumed_from'] == stopped and 'preempted_at' not in summary
  _assert_same_losses(ref, read_metrics(run_dir))
