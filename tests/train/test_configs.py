"""Every stage config builds in both variants, and its phases agree with its LR schedule."""

import importlib.util
import os

import jax
import pytest

from kimi_vl_jax.main import LM_STAGES
from kimi_vl_jax.model.config import PRESETS
from kimi_vl_jax.optim import schedules
from kimi_vl_jax.train.init import model_config
from kimi_vl_jax.train.stage_config import resolve_phases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(stage):
  spec = importlib.util.spec_from_file_location(stage, os.path.join(ROOT, 'configs', f'{stage}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize('stage', LM_STAGES)
@pytest.mark.parametrize('variant', ['', 'tiny'])
def test_config_builds(stage, variant):
  c = _load(stage).get_config(variant)
  assert c.stage == stage
  assert c.model in PRESETS
  if variant == '':
    assert c.model == 'kimi_vl_a3b'
    assert '{' in c.init_from  # the previous stage's checkpoint must be named explicitly
    c.data_dir = '/data'
  else:
    assert c.model in ('tiny', 'demo') and c.init_from == 'scratch'
    assert all(s['path'].startswith('demo:') for s in c.data.sources)
  phases = resolve_phases(c)
  total = phases[-1]['end']
  assert all(p['data'].seq_len >= 128 for p in phases)
  assert all('{' not in s['path'] for p in phases for s in p['data'].sources)
  mc = model_config(c, phases[0]['model_overrides'])
  assert mc.text.rope_theta == c.model_overrides.get('text', {}).get('rope_theta',
                                                                     mc.text.rope_theta)
  lr = schedules.make_schedule(c.optim.schedule)
  # The schedule has decayed to its final value by the last step and not before the end.
  assert float(lr(total - 1)) > 0
  sched = c.optim.schedule
  if sched['kind'] == 'multi_phase':
    assert sum(p['steps'] for p in sched['phases']) == total
  elif 'total_steps' in sched:
    assert sched['total_steps'] == total


def test_long_context_and_sft_recipes():
  lc = _load('long_context').get_config('')
  lc.data_dir = '/data'
  ph = resolve_phases(lc)
  assert [p['data'].seq_len for p in ph] == [32768, 131072]
  assert lc.model_overrides.text.rope_theta == 800000.0
  pre = _load('joint_pretrain').get_config('')
  assert pre.model_overrides.text.rope_theta == 50000.0
  long_w = sum(s['weight'] for s in lc.data.sources if s['name'].startswith(('long', 'inter')))
  assert abs(long_w / sum(s['weight'] for s in lc.data.sources) - 0.25) < 1e-9
  sft = _load('joint_sft').get_config('')
  sft.data_dir = '/data'
  ph = resolve_phases(sft)
  assert [p['data'].seq_len for p in ph] == [32768, 131072]
  lr = schedules.make_schedule(sft.optim.schedule)
  n0 = ph[0]['steps']
  assert abs(float(lr(50)) - 2e-5) < 1e-9 and abs(float(lr(n0 - 1)) - 2e-6) < 1e-7
  assert abs(float(lr(n0 + 50)) - 1e-5) < 1e-9 and abs(float(lr(ph[1]['end'])) - 1e-6) < 1e-9


def test_bad_variant_and_missing_data_dir():
  with pytest.raises(ValueError, match='variant'):
    _load('joint_sft').get_config('huge')
  c = _load('joint_sft').get_config('')
  with pytest.raises(ValueError, match='data_dir'):
    resolve_phases(c)
