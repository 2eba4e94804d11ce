"""The RL stage runs from its config; a run killed with SIGKILL mid-iteration, or stopped by
SIGTERM (it finishes the iteration, saves and exits 0), and restarted with the same command repeats
the uninterrupted run's iterations bitwise (prompt statistics, unfinished responses, rng and
iteration count live in the checkpoint)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kimi_vl_jax.train.metrics import read_metrics
from tests import session_once
from tests.xla_env import xla_flags

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERATIONS = 3


def _cmd(workdir):
  return [sys.executable, '-m', 'kimi_vl_jax.main', '--config=configs/rl.py:tiny',
          f'--workdir={workdir}', '--config.init_from=scratch',
          f'--config.rl.iterations={ITERATIONS}', '--config.rl.prompts_per_iteration=2',
          '--config.rl.k=4', '--config.rl.groups_per_step=2', '--config.rl.segment_tokens=8',
          # A random policy earns no answer reward; top-2 sampling makes it loop now and then,
          # and the loop penalty then gives the groups non-zero advantages to train on.
          '--config.rl.top_k=2', '--config.rl.loop_penalty.penalty=0.5',
          '--config.rl.loop_penalty.max_n=4', '--config.rl.loop_penalty.min_repeats=3',
          '--config.rl.max_segments=2', '--config.rl.heldout_examples=2',
          '--config.rl.heldout_samples=2', '--config.rl.eval_every=100',
          '--config.rl.length_buckets=(64,)', '--config.rl.batch_buckets=(8,)',
          '--config.train.tensorboard=False']


def _env():
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_PLATFORMS='cpu')
  return env


KEYS = ('loss', 'grad_norm', 'reward/total_mean', 'length/mean', 'kl/to_pi_i',
        'rollout/unfinished', 'rollout/groups_done', 'priority/chosen_mean_weight')


def _rl(workdir):
  return [{k: r.get(k) for k in ('step',) + KEYS} for r in read_metrics(workdir, kind='rl')]


def _reference(d):
  d = str(d)
  subprocess.run(_cmd(d), check=True, cwd=ROOT, env=_env(), capture_output=True)
  return _rl(d)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  ref = session_once.once(tmp_path_factory, 'rl_reference', _reference)
  assert [r['step'] for r in ref] == list(range(1, ITERATIONS + 1))
  assert any(r['rollout/unfinished'] for r in ref)        # partial rollouts were carried over
  assert any(r['loss'] for r in ref)                      # and some groups trained
  return ref


def test_sigkill_mid_iteration_resumes_bitwise(tmp_path, reference):
  run = str(tmp_path / 'run')
  proc = subprocess.Popen(_cmd(run), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt = os.path.join(run, 'checkpoints')
  deadline = time.time() + 1800
  while time.time() < deadline:   # iteration 2 checkpointed: kill during iteration 3
    if os.path.isdir(os.path.join(ckpt, '2')) and proc.poll() is None:
      time.sleep(0.5)
      break
    if proc.poll() is not None:
      pytest.fail('the run ended before it could be killed')
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(read_metrics(run, kind='rl')) < ITERATIONS
  out = subprocess.run(_cmd(run), check=True, cwd=ROOT, env=_env(), capture_output=True,
                       text=True)
  assert 'resuming from' in out.stdout
  got = _rl(run)
  by_step = {r['step']: r for r in got}        # iterations re-run after the kill log twice
  assert sorted(by_step) == list(range(1, ITERATIONS + 1))
  for r in reference:
    assert by_step[r['step']] == r, (r, by_step[r['step']])


def test_sigterm_finishes_the_iteration_saves_and_resumes_bitwise(tmp_path, reference):
  run = str(tmp_path / 'run')
  proc = subprocess.Popen(_cmd(run), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  ckpt = os.path.join(run, 'checkpoints')
  deadline = time.time() + 1800
  while not os.path.isdir(os.path.join(ckpt, '1')):   # during iteration 2
    if proc.poll() is not None or time.time() > deadline:
      pytest.fail('the run ended before it could be stopped')
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=1800)
  assert proc.returncode == 0, out
  assert 'preempted (SIGTERM)' in out
  with open(os.path.join(run, 'summary.json')) as f:
    stopped = json.load(f)['preempted_at']
  assert 1 <= stopped < ITERATIONS
  assert os.path.isdir(os.path.join(ckpt, str(stopped)))   # saved at the iteration it stopped
  assert len(read_metrics(run, kind='rl')) == stopped
  subprocess.run(_cmd(run), check=True, cwd=ROOT, env=_env(), capture_output=True)
  got = {r['step']: r for r in _rl(run)}
  assert sorted(got) == list(range(1, ITERATIONS + 1))
  for r in reference:
    assert got[r['step']] == r, (r, got[r['step']])
