"""The loop with its workdir on object storage (moto's S3 server on localhost), without
compiling the model (the stand-in step of test_loop.py): checkpoints and logs land in the
bucket, and the same command on another machine (an empty cache) resumes from there."""

import json

import jax.numpy as jnp
import pytest

from kimi_vl_jax.storage import mirror as mirror_lib
from kimi_vl_jax.storage import paths
from kimi_vl_jax.train import loop as loop_lib
from kimi_vl_jax.train.metrics import read_metrics
from tests.train.resume_config import get_config
from tests.train.test_loop import _Rows


def _fake_jit_step(factory, mc, train_cfg, batch_spec):
  def step(state, batch):
    return state.replace(step=state.step + 1), {
        'loss': jnp.asarray(state.step + 1, jnp.float32),
        'counters/skipped_steps': jnp.zeros((), jnp.int32)}
  return step


@pytest.mark.slow  # about 40 s on an idle 2-core CPU: the tiny model's state is built (jit) once
def test_remote_workdir_checkpoints_logs_and_resume(s3_env, monkeypatch, tmp_path):
  _, bucket = s3_env
  monkeypatch.setattr(loop_lib, 'jit_train_step', _fake_jit_step)
  cfg = get_config('6')  # phases a (steps 1-3) and b (4-6), checkpoints every 3 steps
  cfg.data.batch_size = 8
  workdir = f's3://{bucket}/runs/sft'
  rows = lambda d, seed: (_Rows(d, seed=seed), None)  # noqa: E731
  summary = loop_lib.Trainer(cfg, workdir, iterator_fn=rows).run()
  assert summary['final_step'] == 6 and summary['resumed_from'] is None
  assert mirror_lib.CheckpointMirror(f'{workdir}/checkpoints').remote_steps() == [3, 6]
  assert {'metrics.jsonl', 'config.txt', 'checkpoints'} <= set(paths.listdir(workdir))

  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_CACHE_DIR', str(tmp_path / 'other_machine'))
  cfg = get_config('6')
  cfg.data.batch_size = 8
  cfg.phases[1]['steps'] = 5   # phase b runs on to step 8
  trainer = loop_lib.Trainer(cfg, workdir, iterator_fn=rows)
  summary = trainer.run()
  assert summary['resumed_from'] == 6 and summary['final_step'] == 8
  assert [r['step'] for r in read_metrics(trainer.workdir)] == list(range(1, 9))
  assert mirror_lib.CheckpointMirror(f'{workdir}/checkpoints').remote_steps() == [6, 8]
  text = paths.read_text(f'{workdir}/metrics.jsonl')
  assert '"step": 8' in text and '"step": 1,' in text


class _Crash(RuntimeError):
  pass


def _crashing_rows(after: int):
  """An iterator_fn whose iterators fail when asked for the batch of step `after + 1` (a run
  killed there: nothing after it runs, no clean-up)."""
  fetched = [0]

  class Rows(_Rows):
    def __next__(self):
      fetched[0] += 1
      if fetched[0] > after:
        raise _Crash(f'killed before step {fetched[0]}')
      return super().__next__()
  return lambda d, seed: (Rows(d, seed=seed), None)


def _remote_steps(workdir):
  text = paths.read_text(f'{workdir}/metrics.jsonl') if paths.exists(
      f'{workdir}/metrics.jsonl') else ''
  return sorted({json.loads(line)['step'] for line in text.splitlines() if line.strip()})


@pytest.mark.slow  # about 50 s on an idle 2-core CPU: two runs, each builds the state (jit)
def test_logs_reach_the_bucket_at_every_save_and_on_an_interval(s3_env, monkeypatch):
  _, bucket = s3_env
  monkeypatch.setattr(loop_lib, 'jit_train_step', _fake_jit_step)

  def config(interval, upload_s):
    cfg = get_config('8')
    cfg.phases = [{'name': 'a', 'steps': 8, 'data': {'seq_len': 128}}]
    cfg.optim.schedule = {'kind': 'constant', 'peak_lr': 1e-3}
    cfg.data.batch_size = 8
    cfg.checkpoint.interval = interval
    cfg.train.log_upload_s = upload_s
    return cfg

  # Saves every 3 steps, no timed uploads: killed after step 4, the bucket's metrics hold every
  # step up to the save at step 3 (step 4's record is written one step late: not yet).
  workdir = f's3://{bucket}/runs/saves'
  trainer = loop_lib.Trainer(config(3, 1e9), workdir, iterator_fn=_crashing_rows(4))
  with pytest.raises(_Crash):
    trainer.run()
  assert trainer.remote_logs.wait()
  assert _remote_steps(workdir) == [1, 2, 3]
  assert [r['step'] for r in read_metrics(trainer.workdir)] == [1, 2, 3]
  trainer.manager.wait_until_finished()
  trainer.manager.close()

  # No save due before step 100, uploads after every step (log_upload_s=0): killed after step
  # 5, the bucket holds what was written locally, steps 1-4.
  workdir = f's3://{bucket}/runs/interval'
  trainer = loop_lib.Trainer(config(100, 0), workdir, iterator_fn=_crashing_rows(5))
  with pytest.raises(_Crash):
    trainer.run()
  assert trainer.remote_logs.wait()
  assert _remote_steps(workdir) == [1, 2, 3, 4]
  trainer.manager.wait_until_finished()
  trainer.manager.close()
