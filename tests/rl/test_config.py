"""configs/rl.py: both variants read into an RLConfig; mistakes stop the run at start."""

import importlib.util
import os

import pytest

from kimi_vl_jax.rl.config import FIELDS, RLConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(arg):
  spec = importlib.util.spec_from_file_location('rl_config', os.path.join(ROOT, 'configs', 'rl.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('arg', ['', 'tiny'])
def test_variants_spell_out_every_field_and_read(arg):
  c = _config(arg)
  assert c.stage == 'rl' and set(c.rl.keys()) == set(FIELDS)   # every field overridable by flag
  rl = RLConfig.from_config(c.rl)
  assert rl.k == 8 and rl.temperature == 0.8


@pytest.mark.parametrize('field,value,match', [
    ('k', 1, 'k must be >= 2'), ('verifier', 'regex', 'verifier'), ('baseline', 'median', 'baseline'),
    ('groups_per_step', 3, 'grad_accum'), ('temperature', 0.0, 'temperature'),
])
def test_mistakes_are_refused(field, value, match):
  c = _config('tiny')
  c.rl[field] = value
  if field == 'groups_per_step':
    c.rl.grad_accum = 2
  with pytest.raises(ValueError, match=match):
    RLConfig.from_config(c.rl)


def test_unknown_field_is_refused():
  c = _config('tiny')
  with c.rl.unlocked() if hasattr(c.rl, 'unlocked') else c.unlocked():
    c.rl.tua = 0.1
  with pytest.raises(ValueError, match='unknown rl config fields'):
    RLConfig.from_config(c.rl)
