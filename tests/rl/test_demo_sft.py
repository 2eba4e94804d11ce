"""`init_from='demo_sft'`: the tiny joint-SFT checkpoint is trained once, and a run of it that
SIGTERM stopped (its summary has `preempted_at`) is trained on, never taken as finished."""

import json
import os

import pytest

from kimi_vl_jax.data import build_demo
from kimi_vl_jax.rl import trainer as trainer_lib
from kimi_vl_jax.train import loop


class _FakeTrainer:
  calls = []
  result = {'final_step': 1000}

  def __init__(self, cfg, workdir):
    self.workdir = workdir

  def run(self):
    os.makedirs(self.workdir, exist_ok=True)       # as the loop's run does
    _FakeTrainer.calls.append(self.workdir)
    return dict(_FakeTrainer.result)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setattr(build_demo, 'default_cache_dir', lambda: str(tmp_path))
  monkeypatch.setattr(loop, 'Trainer', _FakeTrainer)
  _FakeTrainer.calls = []
  return tmp_path


def test_trained_once_then_reused(cache):
  wd = trainer_lib.demo_sft_checkpoint()
  assert wd == os.path.join(str(cache), 'joint_sft_tiny') and _FakeTrainer.calls == [wd]
  assert trainer_lib.demo_sft_checkpoint() == wd and len(_FakeTrainer.calls) == 1


def test_a_preempted_run_is_resumed_not_used(cache):
  wd = os.path.join(str(cache), 'joint_sft_tiny')
  os.makedirs(wd)
  with open(os.path.join(wd, 'summary.json'), 'w') as f:
    json.dump({'preempted_at': 11, 'final_step': 11}, f)
  assert trainer_lib.demo_sft_checkpoint() == wd
  assert _FakeTrainer.calls == [wd]                   # trained on from step 11
  with open(os.path.join(wd, 'summary.json')) as f:
    assert 'preempted_at' not in json.load(f)


def test_stopped_again_is_an_error_and_leaves_no_done_marker(cache):
  _FakeTrainer.result = {'preempted_at': 5}
  try:
    with pytest.raises(RuntimeError, match='stopped'):
      trainer_lib.demo_sft_checkpoint()
  finally:
    _FakeTrainer.result = {'final_step': 1000}
  assert not os.path.exists(os.path.join(str(cache), 'joint_sft_tiny', 'summary.json'))


def test_long_cot_demo_continues_the_sft_checkpoint_at_its_rope_base(cache, monkeypatch):
  seen = []

  class _Recording(_FakeTrainer):
    def __init__(self, cfg, workdir):
      super().__init__(cfg, workdir)
      seen.append(cfg)

  monkeypatch.setattr(loop, 'Trainer', _Recording)
  wd = trainer_lib.demo_long_cot_checkpoint()
  sft_wd = os.path.join(str(cache), 'joint_sft_tiny')
  assert wd == os.path.join(str(cache), 'long_cot_sft_tiny')
  assert _FakeTrainer.calls == [sft_wd, wd]       # the SFT checkpoint first, then long-CoT
  sft, cot = seen
  assert sft.stage == 'joint_sft' and cot.stage == 'long_cot_sft'
  assert cot.init_from == f'orbax:{sft_wd}'
  assert cot.model == sft.model == 'demo'
  assert cot.model_overrides.to_dict() == sft.model_overrides.to_dict()
  assert any('cot_train' in s['path'] for s in cot.data.sources)
  assert trainer_lib.demo_long_cot_checkpoint() == wd and len(_FakeTrainer.calls) == 2
