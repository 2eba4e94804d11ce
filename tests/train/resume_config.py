"""A very small joint-SFT run for the kill-and-resume test (tiny model, short rows)."""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = ''):
  spec = importlib.util.spec_from_file_location(
      'joint_sft_config', os.path.join(_HERE, '..', '..', 'configs', 'joint_sft.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config('tiny')
  c.model = 'tiny'
  steps = int(arg or 14)
  c.data.seq_len = 128
  c.data.batch_size = 4
  c.data.max_patches = 64
  c.data.max_images = 4
  c.data.image = {'max_patches': 16}
  c.phases = [{'name': 'a', 'steps': steps // 2, 'data': {'seq_len': 128}},
              {'name': 'b', 'steps': steps - steps // 2, 'data': {'seq_len': 128}}]
  c.optim.schedule = {'kind': 'multi_phase', 'phases': [
      {'steps': steps // 2, 'warmup_steps': 2, 'peak_lr': 3e-3, 'end_lr': 3e-4},
      {'steps': steps - steps // 2, 'warmup_steps': 1, 'peak_lr': 1e-3, 'end_lr': 1e-4}]}
  c.checkpoint.interval = 3
  c.checkpoint.keep = 2
  c.eval.answer_file = ''
  c.eval.batches = 0
  c.train.tensorboard = False
  return c
