"""The recipe chain (`kimi_vl_jax/recipe.py`): building the tiny and full chains' configs, the
start-up refusals, and a short form of the tiny chain (a step or two per stage) run through the
command line, then interrupted in one stage and rerun."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from kimi_vl_jax import recipe
from kimi_vl_jax.rl.trainer import resolve_templates
from kimi_vl_jax.train.stage_config import resolve_phases
from tests import session_once
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = [s.name for s in recipe.STAGES]
FULL_START = ['vit_pretrain:init_from=siglip:/ckpt/siglip',
              'vit_align:init_from=scratch,language_model=hf:/ckpt/moonlight,'
              'vision_tower=orbax:{prev}']
LM = NAMES[NAMES.index('vit_align'):]   # the stages that train the Kimi-VL model


def _rope(cfg):
  mc = recipe._model_configs(cfg)
  return mc[0].text.rope_theta, mc[1].text.rope_theta


def test_tiny_chain_configs_continue_each_other():
  configs = recipe.build('/tmp/recipe', tiny=True)
  assert sorted(configs) == list(range(len(NAMES)))
  assert NAMES[:2] == ['vit_pretrain', 'vit_align']
  assert configs[0].init_from == 'scratch'
  assert configs[1].init_from == 'scratch,vision_tower=orbax:/tmp/recipe/vit_pretrain'
  for i in range(2, len(NAMES)):
    assert configs[i].init_from == f'orbax:/tmp/recipe/{NAMES[i - 1]}'
  assert {c.model for c in configs.values()} == {'demo'}
  # RoPE base 50000 until long context raises it to 800000; later stages keep it.
  assert [_rope(configs[NAMES.index(n)])[0] for n in LM] == [5e4] * 3 + [8e5] * 4
  recipe.check_continuity(configs, list(configs), '/tmp/recipe')
  # MoonViT pre-training's tower is the one alignment reads (the subtree shapes checked).
  vit = recipe.param_shapes(recipe._model_configs(configs[0])[1])
  align = recipe.param_shapes(recipe._model_configs(configs[1])[0])
  tower = {k: v for k, v in align.items() if k.startswith("['vision_tower']")}
  assert tower and all(vit[k] == v for k, v in tower.items())


def test_full_chain_configs_build():
  with pytest.raises(ValueError, match='vit_pretrain: init_from=.*template.*--override'):
    recipe.build('gs://bucket/recipe', tiny=False)
  with pytest.raises(ValueError, match='vit_align: init_from=.*moonlight_dir.*template'):
    recipe.build('gs://bucket/recipe', tiny=False, overrides=FULL_START[:1])
  configs = recipe.build('gs://bucket/recipe', False,
                         FULL_START + ['*:data_dir=/data', '*:tokenizer.path=/tok/kimi.tiktoken',
                                       'vit_pretrain:tokenizer.path=/ckpt/siglip/spiece.model'])
  assert configs[0].init_from == 'siglip:/ckpt/siglip'
  assert configs[1].init_from == ('scratch,language_model=hf:/ckpt/moonlight,'
                                  'vision_tower=orbax:gs://bucket/recipe/vit_pretrain')
  for i in range(2, len(NAMES)):
    assert configs[i].init_from == f'orbax:gs://bucket/recipe/{NAMES[i - 1]}'
  assert {c.model for c in configs.values()} == {'kimi_vl_a3b'}
  assert [_rope(configs[NAMES.index(n)]) for n in LM] == [(5e4, 5e4)] * 3 + [(8e5, 8e5)] * 4
  assert configs[0].tokenizer.path == '/ckpt/siglip/spiece.model'
  for c in configs.values():
    if c.stage != 'vit_pretrain':
      assert c.tokenizer.path == '/tok/kimi.tiktoken'
    if c.stage == 'rl':
      assert resolve_templates(c).rl.prompts == '/data/rl/prompts.jsonl'
    else:
      assert all('{' not in s['path'] for p in resolve_phases(c) for s in p['data'].sources)
  # every stage loads its predecessor's params
  recipe.check_continuity(configs, list(configs), 'gs://bucket/recipe')
  # The RL trainer writes a local workdir: a remote chain refuses it at start.
  with pytest.raises(ValueError, match='rl stage writes a local workdir'):
    recipe.run_chain('gs://bucket/recipe', False, FULL_START + ['*:data_dir=/data'])


def test_selection_and_overrides():
  assert recipe.select() == list(range(len(NAMES)))
  assert recipe.select('rl,joint_sft') == [NAMES.index('joint_sft'), NAMES.index('rl')]
  assert recipe.select(from_stage='long_cot_sft') == [NAMES.index('long_cot_sft'),
                                                     NAMES.index('rl')]
  with pytest.raises(ValueError, match="unknown stage 'sft'"):
    recipe.select('sft')
  with pytest.raises(ValueError, match='one of them'):
    recipe.select('rl', 'rl')
  sel = [NAMES.index('joint_sft')]
  c = recipe.build('/w', True, ['joint_sft:phases.1.steps=3', 'joint_sft:optim.weight_decay=0',
                                'joint_sft:data_dir=123', '*:seed=5'], sel)
  sft, prev = c[sel[0]], c[sel[0] - 1]
  assert sft.phases[1]['steps'] == 3 and sft.optim.weight_decay == 0.0
  assert isinstance(sft.optim.weight_decay, float) and sft.data_dir == '123'
  assert sft.seed == prev.seed == 5   # the predecessor is built too (to see if it finished)
  for bad, msg in [('joint_sft:phases.2.steps=1', 'no item 2'),
                   ('joint_sft:optim.nonsense=1', "unknown field 'optim.nonsense'"),
                   ('sft:seed=1', "unknown stage 'sft'"), ('joint_sft.seed=1', 'STAGE:FIELD')]:
    with pytest.raises(ValueError, match=msg):
      recipe.build('/w', True, [bad], sel)


def test_refusals_at_start(tmp_path):
  missing = recipe.Stage('vit_missing', 'no_such_stage.py', recipe.final_loss)
  with pytest.raises(FileNotFoundError, match="'vit_missing': config file .*no_such_stage.py"):
    recipe.run_chain(str(tmp_path), True, stages=(missing,) + recipe.STAGES)
  assert not os.listdir(tmp_path)
  # A model whose parameters are not those of the previous stage.
  with pytest.raises(ValueError, match='joint_cooldown cannot start from joint_pretrain'):
    recipe.run_chain(str(tmp_path), True, ['joint_cooldown:model=tiny'])
  # Alignment reads only MoonViT from ViT pre-training: a tower of another width is refused...
  with pytest.raises(ValueError, match="vit_align cannot start from vit_pretrain.*vision_tower"):
    recipe.run_chain(str(tmp_path), True, ['vit_pretrain:model=tiny'])
  # ... and a `*` override must name a field some stage has.
  with pytest.raises(ValueError, match="no stage has the field 'data.nonsense'"):
    recipe.run_chain(str(tmp_path), True, ['*:data.nonsense=1'])
  # A predecessor outside the selection that has not finished.
  with pytest.raises(ValueError, match='starts from long_context, which has not finished'):
    recipe.run_chain(str(tmp_path), True, stages_flag='joint_sft')
  assert not os.listdir(tmp_path)


def test_finished_reads_the_summary():
  c = recipe.build('/w', True, ['long_context:phases.1.steps=7'],
                   [NAMES.index('long_context')])[NAMES.index('long_context')]
  assert recipe.expected_end(c) == ('final_step', 47)
  assert recipe.finished(c, {'final_step': 47})
  assert not recipe.finished(c, {'final_step': 46})
  assert not recipe.finished(c, {'final_step': 47, 'preempted_at': 47})
  assert not recipe.finished(c, None)
  rl = recipe.build('/w', True, ['rl:rl.iterations=3'])[NAMES.index('rl')]
  assert recipe.finished(rl, {'iterations': 3}) and not recipe.finished(rl, {'iterations': 2})


# -- the short form of the tiny chain ---------------------------------------------------------------

# One or two steps per stage on the `tiny` preset (the chain's check still needs every stage to
# train the same model), short rows, one phase where the config has two, one compile per RL shape.
SHORT = [
    '*:model=tiny', '*:eval.batches=0', '*:train.tensorboard=False', '*:data.seq_len=128',
    '*:data.batch_size=4',
    'vit_pretrain:phases.0.steps=2', "vit_pretrain:data.resolution='0:9,1:36'",
    'vit_pretrain:eval.examples=48', 'vit_pretrain:eval.galleries=1',
    # Learning rate 0: alignment's MoonViT must stay ViT pre-training's exactly.
    'vit_align:phases.0.steps=1', 'vit_align:optim.schedule.peak_lr=0',
    'vit_align:optim.schedule.end_lr=0',
    'joint_pretrain:phases.0.steps=2',
    'joint_cooldown:phases.0.steps=1',
    "long_context:phases=[{'name': 'ctx', 'steps': 1}]",
    "joint_sft:phases=[{'name': 'sft', 'steps': 1}]",
    'joint_sft:eval.answer_examples=8', 'joint_sft:eval.answer_batch=8',
    # Learning rate and router-bias rate 0: long-CoT SFT's params must stay joint SFT's exactly.
    'long_cot_sft:phases.0.steps=2', 'long_cot_sft:checkpoint.interval=1',
    'long_cot_sft:optim.schedule.peak_lr=0', 'long_cot_sft:optim.schedule.end_lr=0',
    'long_cot_sft:train.router_bias_rate=0',
    'rl:rl.iterations=1', 'rl:rl.prompts_per_iteration=8', 'rl:rl.groups_per_step=8',
    'rl:rl.heldout_examples=8', 'rl:rl.heldout_samples=2',
    'rl:rl.length_buckets=(192,)', 'rl:rl.batch_buckets=(64,)',
]


def _run(workdir):
  # The rerun finds the interrupted stage's programs in the compilation cache.
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             JAX_COMPILATION_CACHE_DIR=str(workdir.parent / 'jax_cache'),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  cmd = [sys.executable, '-m', 'kimi_vl_jax.recipe', '--tiny', f'--workdir={workdir}']
  cmd += [f'--override={o}' for o in SHORT]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  return out.stdout


def _summary(workdir, name):
  with open(os.path.join(workdir, name, 'summary.json')) as f:
    return json.load(f)


def _final_params(workdir, name):
  from kimi_vl_jax.train import checkpointing
  cfg = recipe.build(str(workdir), True, SHORT)[NAMES.index(name)]
  mc = recipe._model_configs(cfg)[1]
  shapes = recipe.param_shapes(mc)
  import flax.linen as nn
  from kimi_vl_jax.model import kimi_vl, vit_pretrain
  init = (vit_pretrain.init_params if isinstance(mc, vit_pretrain.VitPretrainConfig)
          else kimi_vl.init_params)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                          nn.meta.unbox(jax.eval_shape(lambda r: init(mc, r),
                                                       jax.random.PRNGKey(0))))
  params = checkpointing.restore_params(os.path.join(workdir, name), abstract)
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert {k: v.shape for k, v in flat.items()} == shapes
  return flat


def _make_chain(workdir):
  """The short tiny chain, then long-CoT SFT 'killed' after its step-1 checkpoint (its newest
  checkpoint and summary removed) and the same command again."""
  workdir.mkdir()
  first = _run(workdir)
  summaries = {n: _summary(workdir, n) for n in NAMES}
  with open(workdir / 'recipe_table.md') as f:
    table = f.read()
  sft = _final_params(workdir, 'joint_sft')
  towers = [{k: v for k, v in _final_params(workdir, n).items()
             if k.startswith("['vision_tower']")} for n in ('vit_pretrain', 'vit_align')]
  ckpts = workdir / 'long_cot_sft' / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == ['1', '2']
  shutil.rmtree(ckpts / '2')
  os.remove(workdir / 'long_cot_sft' / 'summary.json')
  second = _run(workdir)
  return dict(workdir=workdir, first=first, second=second, summaries=summaries, table=table,
              sft=sft, towers=towers)


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """`_make_chain` once per test session (`tests/session_once.py`)."""
  return session_once.once(tmp_path_factory, 'recipe_chain', _make_chain)


@pytest.mark.slow
def test_each_stage_starts_from_the_previous_one(chain):
  s = chain['summaries']
  assert s['vit_pretrain']['init_from'] == 'scratch'
  assert s['vit_align']['init_from'] == f"scratch,vision_tower=orbax:{chain['workdir']}/vit_pretrain"
  for prev, name in zip(NAMES[1:], NAMES[2:]):
    assert s[name]['init_from'] == f"orbax:{chain['workdir'] / prev}", name
    assert s[name]['resumed_from'] is None
  for name in NAMES[:-1]:
    assert s[name]['final_step'] == recipe.expected_end(
        recipe.build(str(chain['workdir']), True, SHORT)[NAMES.index(name)])[1]
  assert s['rl']['iterations'] == 1
  # Alignment trained at learning rate 0: its MoonViT is ViT pre-training's, so it read it.
  vit, align = chain['towers']
  assert vit and vit.keys() == align.keys()
  for k in vit:
    np.testing.assert_array_equal(align[k], vit[k], err_msg=k)
  # Long-CoT SFT trained at learning rate 0: its params are joint SFT's, so it read them.
  cot = _final_params(chain['workdir'], 'long_cot_sft')
  assert cot.keys() == chain['sft'].keys()
  for k in cot:
    np.testing.assert_array_equal(cot[k], chain['sft'][k], err_msg=k)


@pytest.mark.slow
def test_key_figures_and_table(chain):
  out, s = chain['first'], chain['summaries']
  for st in recipe.STAGES:
    assert f'[recipe] {st.name}: {st.figure(s[st.name])}' in out
  assert 'answer accuracy' in recipe.answer_accuracy(s['joint_sft'])
  assert 'held-out mean reward' in recipe.heldout_change(s['rl'])
  rows = [line for line in chain['table'].splitlines()[2:]]
  assert [r.split(' | ')[0].strip('| ') for r in rows] == NAMES
  assert all(' | ran | ' in r for r in rows)
  assert chain['table'].strip() in out
  with open(chain['workdir'] / 'recipe.json') as f:
    assert set(json.load(f)) == set(NAMES)


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_resumes_the_unfinished_one(chain):
  out, workdir = chain['second'], chain['workdir']
  for name in NAMES:
    if name != 'long_cot_sft':
      assert f'[recipe] {name}: finished earlier in {workdir / name}, skipped' in out
  resumed = _summary(workdir, 'long_cot_sft')
  assert resumed['resumed_from'] == 1 and resumed['final_step'] == 2
  assert 'resuming from' in out and '| long_cot_sft | resumed |' in out
  assert out.count('| finished earlier |') == len(NAMES) - 1
  cot = _final_params(workdir, 'long_cot_sft')
  for k in cot:
    np.testing.assert_array_equal(cot[k], chain['sft'][k], err_msg=k)
