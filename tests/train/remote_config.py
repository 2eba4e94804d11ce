"""The kill-and-resume run of tests/train/test_resume.py, reduced to one phase, with its data
read from a URL (`arg` = 'STEPS,DATA_ROOT'; DATA_ROOT local, s3:// or gs://)."""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str):
  steps, root = arg.split(',', 1)
  steps = int(steps)
  spec = importlib.util.spec_from_file_location('resume_config',
                                                os.path.join(_HERE, 'resume_config.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(str(steps))
  c.data.sources = [
      {'name': 'vqa', 'kind': 'chat', 'path': f'{root}/chat.jsonl', 'weight': 0.7},
      {'name': 'captions', 'kind': 'caption', 'path': f'{root}/captions.jsonl', 'weight': 0.3}]
  c.phases = [{'name': 'a', 'steps': steps, 'data': {'seq_len': 128}}]
  c.optim.schedule = {'kind': 'multi_phase', 'phases': [
      {'steps': steps, 'warmup_steps': 2, 'peak_lr': 3e-3, 'end_lr': 3e-4}]}
  c.checkpoint.interval = 2
  c.checkpoint.keep = 2
  return c
