"""MoonViT pre-training as a stage of the loop (train/vit_pretrain.py) and the alignment stage
after it: config checks, the loss wiring (ring SigLIP on a mesh), held-out image packing, the
`siglip:DIR` and `SUBTREE=orbax:RUN` initialisations; a short tiny run of both stages (slow)."""

import dataclasses
import functools
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.checkpoint import siglip
from kimi_vl_jax.model import siglip_loss
from kimi_vl_jax.model.vit_pretrain import VitPretrain, dummy_batch
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import siglip_ring
from kimi_vl_jax.train import checkpointing, coca_loss, init as init_lib
from kimi_vl_jax.train import vit_pretrain as vp
from kimi_vl_jax.train.loop import LMStage, stage_for
from kimi_vl_jax.train.metrics import read_metrics
from kimi_vl_jax.train.stage_config import resolve_phases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIGLIP_FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'siglip_tiny')


def _load(stage):
  spec = importlib.util.spec_from_file_location(stage, os.path.join(ROOT, 'configs', f'{stage}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _tiny():
  return _load('vit_pretrain').get_config('tiny')


def test_easy_vqa_prompts_are_the_24_bundled_captions():
  from kimi_vl_jax.data import build_demo, caption_pairs
  prompts = _load('vit_pretrain').easy_vqa_class_prompts()
  assert len(prompts) == len(set(prompts)) == 24
  for split in ('train', 'test'):
    path = build_demo.resolve_path(f'demo:easy_vqa/captions_{split}.jsonl')
    assert {r['caption'] for r in caption_pairs.read_records(path)} == set(prompts)


def test_stage_is_picked_from_the_config_and_checks_it():
  c = _tiny()
  stage = stage_for(c)
  assert isinstance(stage, vp.VitPretrainStage)
  assert isinstance(stage_for(_load('vit_align').get_config('tiny')), LMStage)
  stage.validate(resolve_phases(c))
  c.train.grad_accum = 2
  with pytest.raises(ValueError, match='grad_accum=2.*negatives do not cross micro-batches'):
    vp.VitPretrainStage(c).validate(resolve_phases(c))
  c = _tiny()
  c.train.z_loss_weight = 1e-4
  with pytest.raises(ValueError, match='z_loss_weight'):
    vp.VitPretrainStage(c).validate(resolve_phases(c))
  c = _tiny()
  c.phases = [{'name': 'a', 'steps': 2}, {'name': 'b', 'steps': 2}]
  with pytest.raises(ValueError, match='one phase'):
    vp.VitPretrainStage(c).validate(resolve_phases(c))
  c = _tiny()
  c.data.resolution = '0:9,10:400'
  with pytest.raises(ValueError, match='400 patches per image'):
    vp.VitPretrainStage(c).validate(resolve_phases(c))
  c = _tiny()
  c.data.sources = list(c.data.sources) + [
      {'name': 'qa', 'kind': 'chat', 'path': 'demo:easy_vqa/train.jsonl', 'weight': 1.0}]
  with pytest.raises(ValueError, match='exactly one data source of kind "caption"'):
    vp.VitPretrainStage(c).validate(resolve_phases(c))


def test_full_config_model_is_so400m_shaped():
  c = _load('vit_pretrain').get_config('')
  vcfg = vp.vit_config(c)
  assert (vcfg.vision.hidden_size, vcfg.vision.num_layers, vcfg.vision.intermediate_size) == (
      1152, 27, 4304)
  assert vcfg.text_tower.hidden_size == 1152 and vcfg.text_tower.num_layers == 27
  assert vcfg.caption.vocab_size == vcfg.text_tower.vocab_size == 32000
  assert c.init_from.startswith('siglip:') and c.train.caption_weight == 2.0
  c.data_dir = '/data'
  (phase,) = resolve_phases(c)
  assert phase['steps'] * phase['data'].batch_size * 64 * 8192 == pytest.approx(2e12, rel=1e-5)


@pytest.fixture(scope='module')
def tiny_model():
  c = _tiny()
  vcfg = vp.vit_config(c)
  # A small model with the stage's structure (the demo preset's MoonViT is larger).
  vcfg = dataclasses.replace(vcfg, model=vcfg.model.replace(vision=dataclasses.replace(
      vcfg.vision, num_layers=1)))
  model = VitPretrain(vcfg)
  params = jax.jit(lambda r: nn.meta.unbox(model.init(r, dummy_batch(vcfg))['params']))(
      jax.random.PRNGKey(0))
  return vcfg, model, params


def _caption_batch(rows=2):
  from kimi_vl_jax.data import build_demo, caption_pairs
  from kimi_vl_jax.data.tokenizer import SentencePieceTokenizer
  cfg = caption_pairs.CaptionBatchConfig(rows, 36, 2, 16, 8)
  it = caption_pairs.CaptionPairIterator(
      build_demo.resolve_path('demo:easy_vqa/captions_test.jsonl'), SentencePieceTokenizer(),
      cfg, 9, text_pad_id=1012)
  return {k: jnp.asarray(v) for k, v in next(it).items() if k != '_stats'}


@pytest.mark.slow   # compiles the model's init and loss: ~40-70 s on a loaded 2-core CPU
def test_loss_is_siglip_plus_twice_caption_and_metrics_are_means(tiny_model):
  vcfg, model, params = tiny_model
  batch = _caption_batch()

  @jax.jit
  def both(p, b):
    objective, aux = vp.vit_loss(model, p, b)
    out = model.apply({'params': p}, b)
    zi = siglip_loss.l2_normalize(out['zimg'].reshape(-1, out['zimg'].shape[-1]))
    zt = siglip_loss.l2_normalize(out['ztxt'].reshape(-1, out['ztxt'].shape[-1]))
    ls = siglip_loss.siglip_loss(zi, zt, out['log_temperature'], out['bias'],
                                 b['image_valid'].reshape(-1))
    lc = coca_loss.caption_loss(out['caption_logits'], b['caption_targets'],
                                b['caption_loss_mask'])['caption_loss']
    return objective, aux, ls, lc

  objective, aux, ls, lc = jax.device_get(both(params, batch))
  n = aux['tokens']
  assert n == float(batch['caption_loss_mask'].sum())
  np.testing.assert_allclose(objective / n, ls + 2 * lc, rtol=1e-5)
  np.testing.assert_allclose(aux['loss_sum'] / n, ls + 2 * lc, rtol=1e-5)
  np.testing.assert_allclose(aux['metric_sums']['siglip_loss'] / n, ls, rtol=1e-5)
  np.testing.assert_allclose(aux['ce_sum'] / n, lc, rtol=1e-5)
  np.testing.assert_allclose(aux['metric_sums']['temperature'] / n, 10.0, rtol=1e-5)
  assert aux['metric_sums']['pairs'] / n == float(batch['image_valid'].sum())


def test_sharded_pairs_take_the_ring():
  mesh8 = mesh_lib.make_mesh(mesh_lib.default_config())          # 8 CPU devices, data axis
  fn = vp.siglip_fn_for(mesh8, 'dp', 64)
  assert isinstance(fn, functools.partial) and fn.func is siglip_ring.siglip_loss_ring
  assert fn.keywords['axes'] == ('data',)
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  assert vp.siglip_fn_for(one, 'dp', 64) is siglip_loss.siglip_loss


def test_held_out_images_are_packed_in_order():
  rng = np.random.default_rng(0)
  sizes = [(2, 2), (2, 3), (4, 4), (2, 2), (1, 2), (3, 3), (2, 2)]
  imgs = [(rng.normal(size=(h * w, 588)).astype(np.float32),
           np.zeros((h * w, 2), np.int32), (h, w)) for h, w in sizes]
  batches, slots = vp.pack_images(imgs, rows=2, max_patches=20, max_images=3)
  assert len(slots) == len(imgs) and len(set(slots)) == len(imgs)
  for (patches, _, grid), (bi, r, s) in zip(imgs, slots):
    b = batches[bi]
    sel = b['patch_image_ids'][r] == s + 1
    np.testing.assert_array_equal(b['patches'][r][sel], patches)
    assert tuple(b['image_grid_hws'][r, s]) == grid
  with pytest.raises(ValueError, match='more than a row'):
    vp.pack_images(imgs, rows=2, max_patches=12, max_images=3)


def test_parse_init_from():
  assert init_lib.parse_init_from('scratch') == ('scratch', [])
  assert init_lib.parse_init_from('scratch,vision_tower=orbax:/r/a') == (
      'scratch', [('vision_tower', 'orbax:/r/a')])
  assert init_lib.parse_init_from('params:/p,language_model=hf:/m,vision_tower=orbax:/v')[1] == [
      ('language_model', 'hf:/m'), ('vision_tower', 'orbax:/v')]
  for bad in ('scratch,vision_tower', 'scratch,vision_tower=params:/x',
              'scratch,a=orbax:/x,a=orbax:/y'):
    with pytest.raises(ValueError, match='init_from'):
      init_lib.parse_init_from(bad)
  with pytest.raises(ValueError, match='template'):
    init_lib.parse_init_from('scratch,vision_tower=orbax:{vit_pretrain_run}')


def _fixture_config():
  """The tiny stage config with the SigLIP fixture's tower shapes."""
  c = _tiny()
  c.model = 'tiny'
  c.model_overrides.vision = {'hidden_size': 32, 'num_layers': 2, 'num_heads': 4,
                              'intermediate_size': 64}
  c.text_tower = {'preset': 'tiny', 'vocab_size': 100, 'hidden_size': 24,
                  'intermediate_size': 40, 'num_layers': 2, 'num_heads': 4,
                  'max_position_embeddings': 16, 'projection_size': 32}
  return c


def _zeros(abstract):
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)


def test_init_from_siglip_fills_every_siglip_tensor_and_leaves_the_decoder_alone():
  """`StateFactory._siglip`, what `init_from='siglip:DIR'` applies to the seed's params."""
  c = _fixture_config()
  stage = vp.VitPretrainStage(c)
  vcfg = stage.model_config()
  factory = stage.state_factory(vcfg, mesh_lib.make_mesh(c.parallel))
  got = jax.device_get(factory._siglip(SIGLIP_FIXTURE, _zeros(factory.abstract.params)))
  want = siglip.load(SIGLIP_FIXTURE, vision_config=vcfg.vision).params
  assert sorted(want) == ['image_pooling', 'siglip_loss', 'text_tower', 'vision_tower']
  for name, sub in want.items():
    jax.tree.map(np.testing.assert_array_equal, got[name], sub)
  assert not any(np.any(x) for x in jax.tree.leaves(got['caption_decoder']))
  factory._check_same_shapes(got, 'siglip')
  c.model_overrides.vision = {**c.model_overrides.vision, 'intermediate_size': 48}
  stage = vp.VitPretrainStage(c)
  factory = stage.state_factory(stage.model_config(), mesh_lib.make_mesh(c.parallel))
  with pytest.raises(siglip.CheckpointMismatch, match='fc1'):
    factory._siglip(SIGLIP_FIXTURE, _zeros(factory.abstract.params))


class _Positions:
  """An iterator state stand-in for a checkpoint written outside the loop."""

  def get_state(self):
    return {'i': 0}

  def set_state(self, state):
    pass


def test_a_subtree_comes_from_another_stages_checkpoint(tmp_path):
  """`StateFactory._subtree`, what vit_align's 'scratch,vision_tower=orbax:RUN' applies:
  MoonViT read from a ViT pre-training checkpoint whose tree has no language model."""
  c = _fixture_config()
  vit_params = siglip.load(SIGLIP_FIXTURE, vision_config=vp.vit_config(c).vision).params
  manager = checkpointing.make_manager(str(tmp_path / 'vit' / 'checkpoints'), interval=1,
                                       keep=1, async_save=False)
  checkpointing.save(manager, 7, {'params': vit_params, 'step': np.int32(7)}, _Positions(),
                     {'phase': 0}, force=True)
  manager.wait_until_finished()
  manager.close()
  a = _load('vit_align').get_config('tiny')
  a.model = 'tiny'
  a.model_overrides.vision = dict(c.model_overrides.vision)
  factory = init_lib.StateFactory(a, init_lib.model_config(a), mesh_lib.make_mesh(a.parallel))
  got = factory._subtree('vision_tower', f'orbax:{tmp_path / "vit"}')
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), vit_params['vision_tower'])
  with pytest.raises(ValueError, match="'text_tower' is not a top-level subtree"):
    factory._subtree('text_tower', f'orbax:{tmp_path / "vit"}')


def test_siglip_tokenizer(tmp_path):
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['a red circle', 'a blue square', 'two green triangles'] * 20),
      model_prefix=str(tmp_path / 'spiece'), vocab_size=20, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  tok = vp.SiglipTokenizer(str(tmp_path / 'spiece.model'))
  assert tok.special == {'[BOS]': 0, '[EOS]': 1, '[PAD]': 1}
  ids = tok.encode('A Red Circle')
  assert ids[-1] == 1 and tok.decode(ids[:-1]) == 'a red circle'
  with pytest.raises(ValueError, match='not a SigLIP SentencePiece model'):
    vp.SiglipTokenizer(os.path.join(ROOT, 'kimi_vl_jax', 'data', 'assets', 'tiny_spm.model'))


# ---------------------------------------------------------------------------------------------
# Both stages, a few steps each, through `main.run` on the 8 test devices (the ring SigLIP loss).

@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  from kimi_vl_jax.main import run
  root = tmp_path_factory.mktemp('chain')
  c = _tiny()
  c.phases = [{'name': 'vit_pretrain', 'steps': 4}]
  c.optim.schedule = {'kind': 'constant', 'peak_lr': 3e-3}
  c.data.resolution = '0:9,2:36'
  c.checkpoint.interval = 2
  c.eval.examples = 96
  c.eval.galleries = 2
  vit = run(c, str(root / 'vit'))
  again = run(c, str(root / 'vit'))            # same command: resumes, nothing left to do
  a = _load('vit_align').get_config('tiny')
  a.phases = [{'name': 'align', 'steps': 2}]
  a.optim.schedule = {'kind': 'constant', 'peak_lr': 2e-3}
  a.eval.batches = 1
  a.init_from = f'scratch,vision_tower=orbax:{root / "vit"}'
  align = run(a, str(root / 'align'))
  return root, c, vit, again, a, align


@pytest.mark.slow   # two stages compiled on 8 devices: a few minutes on a loaded 2-core CPU
def test_vit_pretrain_runs_evaluates_and_resumes(chain):
  root, c, vit, again, _, _ = chain
  assert vit['final_step'] == 4 and vit['counters']['skipped_steps'] == 0
  ev = vit['eval']
  assert set(ev) == {'zero_shot_accuracy', 'zero_shot_top5', 'i2t_recall@1', 'i2t_recall@5',
                     't2i_recall@1', 't2i_recall@5'}
  assert all(0.0 <= v <= 1.0 for v in ev.values())
  rec = read_metrics(str(root / 'vit'))
  assert [r['step'] for r in rec] == [1, 2, 3, 4]
  for r in rec:
    np.testing.assert_allclose(r['loss'], r['siglip_loss'] + 2 * r['caption_loss'], rtol=1e-5)
  assert [r['data/max_patches_per_image'] for r in rec] == [9, 9, 36, 36]
  assert rec[-1]['loss'] < rec[0]['loss']
  assert again['resumed_from'] == 4 and again['final_step'] == 4
  assert sorted(os.listdir(root / 'vit' / 'checkpoints'))[-1] == '4'


@pytest.mark.slow
def test_vit_align_starts_from_the_vit_and_keeps_the_llm_frozen(chain):
  root, c, _, _, a, align = chain
  assert align['final_step'] == 2 and 'loss' in align['eval']
  mesh = mesh_lib.make_mesh(a.parallel)
  mc = init_lib.model_config(a)
  factory = init_lib.StateFactory(a, mc, mesh)
  trained = jax.device_get(checkpointing.restore_params(str(root / 'align'),
                                                        factory.abstract.params))
  vit_params = jax.device_get(checkpointing.restore_params(
      str(root / 'vit'), {'vision_tower': factory.abstract.params['vision_tower']}))
  a.init_from = 'scratch'
  scratch = jax.device_get(init_lib.StateFactory(a, mc, mesh).create().params)
  jax.tree.map(np.testing.assert_array_equal, trained['language_model'],
               scratch['language_model'])                      # frozen, bit for bit
  moved = lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max())
  assert max(jax.tree.leaves(jax.tree.map(moved, trained['projector'],
                                          scratch['projector']))) > 0
  # MoonViT started from the ViT run (not the seed) and trained on.
  diff_vit = max(jax.tree.leaves(jax.tree.map(moved, trained['vision_tower'],
                                              vit_params['vision_tower'])))
  diff_seed = max(jax.tree.leaves(jax.tree.map(moved, trained['vision_tower'],
                                               scratch['vision_tower'])))
  assert 0 < diff_vit < diff_seed
