"""The training loop without compiling the model: the step is a stand-in whose metrics are
device arrays, to check when the loop reads them back (never right after dispatching the step
that made them, except where it must wait anyway: a phase's last step); the profile window; the
start-up check of the parallel config through `python -m kimi_vl_jax.main`."""

import glob
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax._src.array import ArrayImpl

from kimi_vl_jax.data.batch import BatchSpec
from kimi_vl_jax.model.config import get_preset
from kimi_vl_jax.train import loop as loop_lib
from kimi_vl_jax.train.metrics import read_metrics
from tests.train.helpers import packed_batch
from tests.train.resume_config import get_config
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Rows:
  """A checkpointable iterator of identical packed batches (8 rows: one per data shard)."""

  def __init__(self, data_cfg, *, seed):
    del seed
    self.i = 0
    # The helper's small rows, zero-padded to the batch shape of the phase's data config.
    self.batch = BatchSpec.from_config(data_cfg, get_preset('tiny')).zeros()
    for k, v in packed_batch(get_preset('tiny'), B=8).items():
      self.batch[k][tuple(slice(0, n) for n in v.shape)] = v

  def __iter__(self):
    return self

  def __next__(self):
    self.i += 1
    return self.batch

  def get_state(self):
    return {'i': self.i}

  def set_state(self, state):
    self.i = state['i']


def test_metrics_fetched_one_step_late_and_profile_window(tmp_path, monkeypatch):
  dispatched = []        # steps dispatched so far (1-based)
  made = {}              # id(metric array) -> (array, step that made it)
  reads = []             # (step whose metric was read, steps dispatched at that moment)

  def fake_jit_step(factory, mc, train_cfg, batch_spec):
    def step(state, batch):
      dispatched.append(len(dispatched) + 1)
      s = len(dispatched)
      metrics = {'loss': jnp.asarray(float(s)), 'counters/skipped_steps': jnp.zeros((), jnp.int32)}
      for a in metrics.values():
        made[id(a)] = (a, s)
      return state.replace(step=state.step + 1), metrics
    return step

  value = ArrayImpl._value

  def recording_value(self):
    if id(self) in made and made[id(self)][0] is self:
      reads.append((made[id(self)][1], len(dispatched)))
    return value.fget(self)

  monkeypatch.setattr(loop_lib, 'jit_train_step', fake_jit_step)
  monkeypatch.setattr(ArrayImpl, '_value', property(recording_value))
  cfg = get_config('10')  # phases a (steps 1-5) and b (6-10)
  cfg.data.batch_size = 8
  cfg.train.log_every = 4
  cfg.train.profile_steps = '2,3'
  workdir = str(tmp_path / 'run')
  summary = loop_lib.Trainer(cfg, workdir, iterator_fn=lambda d, seed: (_Rows(d, seed=seed), None)
                             ).run()

  assert summary['final_step'] == 10 and dispatched == list(range(1, 11))
  assert sorted({s for s, _ in reads}) == list(range(1, 11))
  for s, at in reads:
    if s not in (5, 10):  # a phase's last step is read before the next phase compiles
      assert at > s, f'metrics of step {s} read before step {s + 1} was dispatched'
  recs = read_metrics(workdir)
  assert [r['step'] for r in recs] == list(range(1, 11))
  assert [r['loss'] for r in recs] == [float(s) for s in range(1, 11)]
  # Log steps (every 4th and each phase's last) carry throughput; the others only the metrics.
  assert [r['step'] for r in recs if 'tokens_per_s' in r] == [4, 5, 8, 10]
  assert [r['phase'] for r in recs if 'phase' in r] == [0, 0, 1, 1]
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert traces and os.path.getsize(traces[0]) > 0


def test_bad_profile_steps():
  with pytest.raises(ValueError, match='config.train.profile_steps'):
    cfg = get_config('4')
    cfg.data.batch_size = 8
    cfg.train.profile_steps = '3,2'
    loop_lib.Trainer(cfg, '/nonexistent/never-made')


@pytest.mark.parametrize('override,field', [
    ('--config.parallel.expert=2', 'parallel.expert'),      # rules 'dp' do not split experts
    ('--config.parallel.pipeline=4', 'parallel.pipeline'),  # 3 MoE layers over 4 stages
])
def test_bad_parallel_config_stops_main_at_start(tmp_path, override, field):
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  proc = subprocess.run(
      [sys.executable, '-m', 'kimi_vl_jax.main', '--config=configs/joint_sft.py:tiny',
       f'--workdir={tmp_path}', override], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  # Within 30 s of CPU time (about 5 s: imports and the check; compiling the step alone takes
  # longer). CPU rather than wall time, so a busy machine does not make the test flaky.
  assert after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime < 30
  assert proc.returncode != 0
  assert 'invalid parallel config' in proc.stderr and field in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))
