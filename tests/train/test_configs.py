"""Every stage config builds in both variants, and its phases agree with its LR schedule."""

import glob
import importlib.util
import os

import jax
import pytest

from kimi_vl_jax.data import sources
from kimi_vl_jax.main import LM_STAGES, LOOP_STAGES
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


@pytest.mark.parametrize('variant', ['', 'tiny'])
def test_vit_pretrain_config_builds(variant):
  from kimi_vl_jax.train.vit_pretrain import vit_config
  c = _load('vit_pretrain').get_config(variant)
  assert c.stage == 'vit_pretrain' and c.model in PRESETS
  if variant == '':
    assert c.init_from.startswith('siglip:') and '{' in c.init_from
    c.data_dir = '/data'
  else:
    assert c.init_from == 'scratch'
    assert all(s['path'].startswith('demo:') for s in c.data.sources)
  (phase,) = resolve_phases(c)
  vcfg = vit_config(c)
  assert vcfg.vision == model_config(c).vision
  assert c.train.grad_accum == 1 and c.train.caption_weight == 2.0
  lr = schedules.make_schedule(c.optim.schedule)
  assert c.optim.schedule['total_steps'] == phase['steps'] and float(lr(phase['steps'] - 1)) > 0


def test_vit_align_trains_only_moonvit_and_the_projector():
  for variant in ('', 'tiny'):
    c = _load('vit_align').get_config(variant)
    assert tuple(c.optim.trainable) == ('^vision_tower/', '^projector/')
  c = _load('vit_align').get_config('')
  assert 'vision_tower=orbax:' in c.init_from and 'language_model=hf:' in c.init_from


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


CONFIG_FILES = sorted(os.path.basename(p)[:-3]
                      for p in glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def _all_sources(c):
  """(field, spec) of every data source a config names: data, each phase's data, eval data."""
  out = [('data.sources', s) for s in c.data.sources]
  for i, ph in enumerate(c.get('phases') or []):
    out += [(f'phases[{i}].data.sources', s) for s in ph.get('data', {}).get('sources', [])]
  out += [('eval.data.sources', s) for s in c.eval.get('data', {}).get('sources', [])]
  return out


@pytest.mark.parametrize('stage', CONFIG_FILES)
@pytest.mark.parametrize('variant', ['', 'tiny'])
def test_every_config_names_only_data_the_pipeline_reads(stage, variant):
  c = _load(stage).get_config(variant)
  named = _all_sources(c)
  if c.stage not in LOOP_STAGES:   # rl reads prompt sets (rl.prompts, tests/rl), not a pipeline
    assert not named, named
    return
  assert named
  for field, s in named:
    assert s['kind'] in sources.KINDS, (field, s)
    said = f"{s['name']} {s['path']}".lower()
    assert not any(m in said for m in sources.UNREADABLE_MODALITIES), (field, s)
  c.data_dir = '/data'
  resolve_phases(c)  # the check a run does at start
  for field in {f for f, _ in named}:
    sources.check_sources([s for f, s in named if f == field], field)


def test_a_source_the_pipeline_cannot_read_stops_the_run_at_start():
  c = _load('long_context').get_config('')
  c.data_dir = '/data'
  c.data.sources = list(c.data.sources) + [
      {'name': 'long_audio', 'kind': 'chat', 'path': '{data_dir}/long/audio.array_record',
       'weight': 0.05}]
  with pytest.raises(ValueError, match=r"config.data.sources\[6\] \('long_audio'\).*audio"):
    resolve_phases(c)
  c = _load('joint_sft').get_config('tiny')
  c.eval.data = {'sources': [{'name': 'clips', 'kind': 'chat', 'path': 'demo:audio/test.jsonl'}]}
  with pytest.raises(ValueError, match=r'config.eval.data.sources\[0\].*audio'):
    resolve_phases(c)
  c = _load('joint_sft').get_config('tiny')
  c.phases[1]['data']['sources'] = [{'name': 'x', 'kind': 'audio', 'path': 'demo:a.jsonl'}]
  with pytest.raises(ValueError, match=r"phases\[1\].data.sources\[0\].*unknown kind 'audio'"):
    resolve_phases(c)
