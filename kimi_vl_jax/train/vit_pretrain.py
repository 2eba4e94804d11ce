"""MoonViT pre-training as a stage of the one training loop (Kimi-VL report, arXiv 2504.07491,
sec. 2.3; docs/recipe.md "ViT training").

`VitPretrainStage` is what `train/loop.py` plugs in for `config.stage == 'vit_pretrain'` instead
of the language-model stage: the model (`model/vit_pretrain.py`: MoonViT + pooling head, the
SigLIP text tower, the caption decoder, the loss scalars), its batches (`data/caption_pairs.py`
with the progressive-resolution schedule `data.resolution`), its loss and its evaluator.
Everything else (optimizer groups and frozen regexes, sharded state, orbax checkpoints with the
iterator position, resume, SIGTERM, `metrics.jsonl`, eval schedule, `summary.json`) is the
loop's, as for every other stage.

The loss of one step, `L = siglip_weight * L_siglip + caption_weight * L_caption` (1 and 2,
`train/coca_loss.py`): every image slot of the global batch is one image-caption pair; image
and text embeddings are L2-normalised, empty slots are masked out (`image_valid`), and when the
batch is split over more than one device the SigLIP term is the ring form
(`parallel/siglip_ring.py`), so no device holds the global [B, B] logits.

Gradient accumulation is refused (`train.grad_accum` must be 1): SigLIP's negatives of an image
are the other texts of its batch, so k micro-batches would be k independent contrastive batches
of 1/k the size with averaged gradients, a different (weaker) objective than one batch of the
configured size. Grow the batch with devices instead (the ring keeps the loss's memory per
device at O((B/n)^2)).

Config fields of this stage (besides the loop's; `configs/vit_pretrain.py`):
  model, model_overrides   the Kimi-VL preset whose `vision` is MoonViT's shape (the tower the
                           later stages load), with its numerics (dtype, remat, attention_impl)
  text_tower               {'preset': 'so400m' | 'tiny', <SiglipTextConfig fields>}; the
                           projection defaults to MoonViT's width
  caption_decoder          {'preset': 'so400m' | 'tiny', <CaptionDecoderConfig fields>}
  tokenizer                the caption decoder's tokenizer (needs [BOS] / [EOS])
  text_tokenizer           the text tower's (None: the same); {'kind': 'siglip', 'path':
                           spiece.model} for an HF SigLIP checkpoint's SentencePiece model
  data                     batch_size (rows per host), max_patches (per row), max_images (per
                           row), caption_len (decoder tokens per row), text_len (text-tower
                           tokens per image), resolution (the per-image patch budget schedule,
                           e.g. '0:16,300:36'), image (other preprocessing), one `caption` source
  train.siglip_weight, train.caption_weight   the loss weights (1, 2)
  eval                     every, caption_file (image-caption JSONL of held-out images),
                           class_prompts (the zero-shot classes: one prompt each; every held-out
                           caption must be one of them), examples, galleries, batch_size
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kimi_vl_jax.config_dict import as_dict
from kimi_vl_jax.data import caption_pairs
from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data.resolution_schedule import ResolutionSchedule
from kimi_vl_jax.evaluation import retrieval, zero_shot
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model import siglip_loss
from kimi_vl_jax.model.caption_decoder import get_caption_preset
from kimi_vl_jax.model.vit_pretrain import VitPretrain, VitPretrainConfig, init_params
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel import siglip_ring
from kimi_vl_jax.parallel.kernels import build_kernels
from kimi_vl_jax.train import coca_loss
from kimi_vl_jax.train.init import StateFactory, model_config
from kimi_vl_jax.train.train_step import StepOptions, make_train_step

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Model config.

def vit_config(cfg, phase_overrides=None) -> VitPretrainConfig:
  """The stage's `VitPretrainConfig`: `cfg.model` (+ overrides) for MoonViT and the numerics,
  `cfg.text_tower` and `cfg.caption_decoder` (preset + fields) for the other two parts."""
  mc = model_config(cfg, phase_overrides)
  width = mc.vision.hidden_size
  tt = as_dict(cfg.get('text_tower')) or {'preset': 'tiny'}
  preset = tt.pop('preset', 'tiny')
  if preset not in config_lib.SIGLIP_TEXT_PRESETS:
    raise ValueError(f'config.text_tower.preset={preset!r}; choose one of '
                     f'{sorted(config_lib.SIGLIP_TEXT_PRESETS)}')
  tt.setdefault('projection_size', width)
  try:
    text = config_lib.SIGLIP_TEXT_PRESETS[preset]().__class__(
        **{**config_lib.SIGLIP_TEXT_PRESETS[preset]().__dict__, **tt})
  except TypeError as e:
    raise ValueError(f'config.text_tower: {e}') from None
  cd = as_dict(cfg.get('caption_decoder')) or {'preset': 'tiny'}
  cd_preset = cd.pop('preset', 'tiny')
  cd.setdefault('vision_dim', width)
  try:
    caption = get_caption_preset(cd_preset, **cd)
  except TypeError as e:
    raise ValueError(f'config.caption_decoder: {e}') from None
  return VitPretrainConfig(mc, text, caption)


# --------------------------------------------------------------------------------------------
# Loss.

def vit_loss(model: VitPretrain, params, batch: dict[str, Array], *,
             siglip_fn: Callable = siglip_loss.siglip_loss, siglip_weight: float = 1.0,
             caption_weight: float = 2.0, **unused) -> tuple[Array, dict]:
  """`make_train_step`'s loss interface for this stage: `(objective, aux)` with the objective
  `L x caption tokens` and aux's sums weighted by the caption tokens, so that the step's
  division by `aux['tokens']` gives L, the caption cross-entropy (`ce_loss`), its token accuracy
  and `metric_sums` (siglip_loss, caption_loss, temperature, bias) as means."""
  del unused   # z-loss / balance loss / chunking: LM options (the stage refuses them)
  out = model.apply({'params': params}, batch)
  b, i, d = out['zimg'].shape
  zimg = siglip_loss.l2_normalize(out['zimg'].reshape(b * i, d))
  ztxt = siglip_loss.l2_normalize(out['ztxt'].reshape(b * i, d))
  total, m = coca_loss.vit_pretrain_loss(
      zimg, ztxt, out['log_temperature'], out['bias'], out['caption_logits'],
      batch['caption_targets'], batch['caption_loss_mask'],
      valid=batch['image_valid'].reshape(b * i), siglip_weight=siglip_weight,
      caption_weight=caption_weight, siglip_fn=siglip_fn)
  tokens = jnp.maximum(m['caption_tokens'], 1.0)
  aux = {'loss_sum': total * tokens, 'tokens': tokens, 'ce_sum': m['caption_loss'] * tokens,
         'z_sum': jnp.zeros(()), 'correct': m['caption_accuracy'] * tokens,
         'balance_loss': jnp.zeros(()),
         'metric_sums': {k: m[k] * tokens for k in ('siglip_loss', 'caption_loss', 'temperature',
                                                     'bias')}}
  aux['metric_sums']['pairs'] = jnp.sum(batch['image_valid']) * tokens
  return total * tokens, aux


def siglip_fn_for(mesh, rules, global_pairs: int) -> Callable:
  """The plain SigLIP loss on one device, its ring over the batch axes when the pairs are split
  over more than one device."""
  axes = siglip_ring.batch_axes(mesh, rules, global_pairs)
  if math.prod(mesh.shape[a] for a in axes) <= 1:
    return siglip_loss.siglip_loss
  return functools.partial(siglip_ring.siglip_loss_ring, mesh=mesh, axes=axes)


# --------------------------------------------------------------------------------------------
# Batches.

class CaptionBatchSpec:
  """The caption batch contract (`data/caption_pairs.py`) in the loop's `BatchSpec` role:
  `keys` and `split(host_batch) -> (device arrays, host extras)` after a shape check."""

  def __init__(self, data_cfg, patch_dim: int):
    d = as_dict(data_cfg)
    self.cfg = caption_pairs.CaptionBatchConfig(
        batch_size=int(d['batch_size']), max_patches=int(d['max_patches']),
        max_images=int(d['max_images']), caption_len=int(d['caption_len']),
        text_len=int(d['text_len']))
    self.patch_dim = patch_dim
    self.keys = tuple(caption_pairs.batch_keys())

  def shapes(self) -> dict[str, tuple[int, ...]]:
    c = self.cfg
    b, p, i, t, l = c.batch_size, c.max_patches, c.max_images, c.caption_len, c.text_len
    return {'patches': (b, p, self.patch_dim), 'patch_coords': (b, p, 2),
            'patch_image_ids': (b, p), 'image_grid_hws': (b, i, 2), 'image_valid': (b, i),
            'text_tokens': (b, i, l), 'caption_tokens': (b, t), 'caption_image_ids': (b, t),
            'caption_positions': (b, t), 'caption_targets': (b, t), 'caption_loss_mask': (b, t)}

  def split(self, batch, *, blank_images: bool = False):
    want = self.shapes()
    for k in self.keys:
      if k not in batch or tuple(np.shape(batch[k])) != want[k]:
        raise ValueError(f'caption batch[{k!r}]: expected shape {want[k]}, got '
                         f'{None if k not in batch else tuple(np.shape(batch[k]))}')
    dev = {k: np.asarray(batch[k]) for k in self.keys}
    if blank_images:
      dev['patches'] = np.zeros_like(dev['patches'])
    return dev, {k: v for k, v in batch.items() if k not in self.keys}


class _CaptionIterator:
  """`CaptionPairIterator` with `stats()` (the last batch's counts, for `metrics.jsonl`)."""

  def __init__(self, it: caption_pairs.CaptionPairIterator):
    self.it, self.last = it, {}

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    self.last = batch.get('_stats', {})
    return batch

  def stats(self) -> dict:
    return dict(self.last)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


class SiglipTokenizer:
  """The SentencePiece model of an HF SigLIP checkpoint (`spiece.model`) for the text tower and
  the caption decoder: `encode` lower-cases (SigLIP's tokenizer does) and appends `</s>`;
  SigLIP's vocabulary has no BOS, so the decoder's `[BOS]` is the `<pad>` piece, and `[EOS]` /
  `[PAD]` are `</s>` (SigLIP pads texts with it)."""

  def __init__(self, path: str):
    import sentencepiece as spm
    from kimi_vl_jax.storage import files as storage_files
    self._sp = spm.SentencePieceProcessor(model_file=storage_files.fetch_file(path)[0])
    self.vocab_size = int(self._sp.get_piece_size())
    pad, eos = self._sp.piece_to_id('<pad>'), self._sp.piece_to_id('</s>')
    if self._sp.id_to_piece(eos) != '</s>' or self._sp.id_to_piece(pad) != '<pad>':
      raise ValueError(f'{path}: not a SigLIP SentencePiece model (no <pad> / </s> pieces)')
    self.special = {'[BOS]': pad, '[EOS]': eos, '[PAD]': eos}

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text.lower())) + [self.special['[EOS]']]

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def make_tokenizers(cfg) -> tuple[Any, Any]:
  """(caption decoder tokenizer, text tower tokenizer) of the config."""
  from kimi_vl_jax.data import tokenizer as tok_lib

  def make(tc):
    path = as_dict(tc).get('path') if tc is not None and not isinstance(tc, str) else None
    if isinstance(path, str) and '{' in path:
      raise ValueError(f'tokenizer path {path!r} is a template: set --config.tokenizer.path '
                       '(e.g. SIGLIP_DIR/spiece.model)')
    if tc is not None and str(as_dict(tc).get('kind', '')).lower() == 'siglip':
      return SiglipTokenizer(as_dict(tc)['path'])
    return tok_lib.make_tokenizer(tc)

  tok = make(cfg.get('tokenizer'))
  text_cfg = cfg.get('text_tokenizer')
  return tok, (make(text_cfg) if text_cfg is not None else tok)


def caption_source(data_cfg) -> str:
  """The path of the data config's one `caption` source (demo paths resolved)."""
  from kimi_vl_jax.data import build_demo
  srcs = [dict(s) for s in as_dict(data_cfg).get('sources') or []]
  if len(srcs) != 1 or srcs[0].get('kind') != 'caption':
    raise ValueError('MoonViT pre-training reads exactly one data source of kind "caption" '
                     f'(image-caption JSONL); got {[(s.get("name"), s.get("kind")) for s in srcs]}')
  return build_demo.resolve_path(srcs[0]['path'], as_dict(data_cfg).get('cache_dir'))


def text_tower_tokens(tok, texts, text_len: int, pad_id: int) -> np.ndarray:
  """[N, text_len] text-tower tokens, as `caption_pairs` makes them (truncated, then padded)."""
  out = np.full((len(texts), text_len), pad_id, np.int32)
  for n, t in enumerate(texts):
    ids = tok.encode(t)[:text_len]
    out[n, :len(ids)] = ids
  return out


def text_pad_id(tok) -> int:
  return int((getattr(tok, 'special', {}) or {}).get('[PAD]', 0))


# --------------------------------------------------------------------------------------------
# Evaluation: zero-shot classification and retrieval on held-out images.

class VitEvaluator:
  """Zero-shot accuracy of held-out images against the class prompts (`evaluation/zero_shot.py`)
  and image <-> text recall@1/@5 (`evaluation/retrieval.py`).

  With `eval.class_prompts`, every held-out image's caption must be one of them; its index is
  the label. Retrieval: such a held-out set's captions repeat (easy-vqa: 24 distinct captions
  over 880 images), so a text has many equally correct images; the recalls are measured on
  *galleries* of one image per class (gallery g = the g-th held-out image of every class, whose
  C captions are all different; classes without held-out images are left out), averaged over
  `eval.galleries` galleries (at most as many as the rarest class has images). Without class prompts there is no zero-shot accuracy and the recalls
  are those of the whole held-out set, each image with its own caption."""

  def __init__(self, cfg, vcfg: VitPretrainConfig, mesh, rules, data_cfg, tokenizer,
               text_tokenizer):
    ev = as_dict(cfg.eval)
    self.every = int(ev.get('every', 0) or 0)
    self.mesh, self.rules = mesh, rules
    from kimi_vl_jax.data import build_demo
    caption_file = str(ev['caption_file'])
    if '{data_dir}' in caption_file:
      if not cfg.get('data_dir'):
        raise ValueError(f'eval.caption_file {caption_file!r}: set --config.data_dir')
      caption_file = caption_file.replace('{data_dir}', str(cfg.data_dir).rstrip('/'))
    path = build_demo.resolve_path(caption_file, as_dict(data_cfg).get('cache_dir'))
    records = caption_pairs.read_records(path)[:int(ev.get('examples', 0) or 0) or None]
    self.zero_shot = bool(ev.get('class_prompts'))
    # Without class prompts every caption is its own "class" (plain pair retrieval).
    self.classes = ([str(p) for p in ev['class_prompts']] if self.zero_shot
                    else [r['caption'] for r in records])
    index = {c: k for k, c in enumerate(self.classes)}
    unknown = sorted({r['caption'] for r in records} - index.keys())
    if unknown:
      raise ValueError(f'eval.caption_file {path}: captions {unknown[:5]} are not among '
                       'eval.class_prompts')
    self.labels = (np.array([index[r['caption']] for r in records], np.int64) if self.zero_shot
                   else np.arange(len(records)))
    d = as_dict(data_cfg)
    budget = ResolutionSchedule.from_config(d['resolution']).stages[-1][1]
    image_cfg = images_lib.ImageConfig.from_config(
        {**as_dict(d.get('image')), 'max_patches': budget, 'augment': False})
    import os
    root = os.path.dirname(path)
    images = [images_lib.preprocess(images_lib.load_image(os.path.join(root, r['image'])),
                                    image_cfg) for r in records]
    rows = int(ev.get('batch_size', 0) or d['batch_size'])
    self.batches, self.slots = pack_images(images, rows, int(d['max_patches']),
                                           int(d['max_images']))
    self.class_tokens = text_tower_tokens(text_tokenizer, self.classes, int(d['text_len']),
                                          text_pad_id(text_tokenizer))
    counts = np.bincount(self.labels, minlength=len(self.classes))
    # Galleries hold the classes that have held-out images (all of them on easy-vqa's test set).
    self.present = np.flatnonzero(counts)
    self.galleries = (int(min(counts[self.present].min(), int(ev.get('galleries', 10))))
                      if self.zero_shot else 1)
    self.by_class = [np.flatnonzero(self.labels == c) for c in range(len(self.classes))]
    model = VitPretrain(vcfg, kernels=build_kernels(vcfg.model, mesh, rules))
    self._images = jax.jit(lambda p, b: model.apply(
        {'params': p}, b['patches'], b['patch_coords'], b['patch_image_ids'],
        b['image_grid_hws'], method=VitPretrain.embed_images))
    self._texts = jax.jit(lambda p, t: model.apply({'params': p}, t,
                                                   method=VitPretrain.embed_texts))
    logging.info('vit eval: %d images, %d classes (%d with images), %d galleries',
                 len(records), len(self.classes), len(self.present), self.galleries)

  def due(self, step: int, phase_end: bool) -> bool:
    return phase_end or (self.every > 0 and step % self.every == 0)

  def embeddings(self, params) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings [N, D], class-prompt embeddings [C, D]), host numpy."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      per_batch = [np.asarray(self._images(params, b)) for b in self.batches]
      ztxt = np.asarray(self._texts(params, self.class_tokens))
    zimg = np.stack([per_batch[bi][r, s] for bi, r, s in self.slots])
    return zimg, ztxt

  def run(self, params) -> dict[str, float]:
    zimg, ztxt = self.embeddings(params)
    zs = self.zero_shot and zero_shot.zero_shot_accuracy(zimg, zero_shot.class_embeddings(ztxt[:, None]),
                                      self.labels, ks=(1, 5))
    out = {}
    if self.zero_shot:
      out = {'zero_shot_accuracy': zs['top1'], 'zero_shot_top5': zs['top5']}
    if self.galleries:
      recalls = []
      for g in range(self.galleries):
        idx = np.array([self.by_class[c][g] for c in self.present])
        recalls.append(retrieval.image_text_retrieval(zimg[idx], ztxt[self.present],
                                                      np.arange(len(self.present))))
      out.update({k: float(np.mean([r[k] for r in recalls])) for k in recalls[0]})
    return out


def pack_images(images, rows: int, max_patches: int, max_images: int):
  """Preprocessed images (patches, coords, grid) packed in order into MoonViT batches of
  `rows` rows -> (batches, slots): slot n = (batch, row, image slot) of image n."""
  batches, slots = [], []
  cur = None
  row = used_p = used_i = 0

  def new_batch():
    return {'patches': np.zeros((rows, max_patches, images_lib.PATCH_DIM), np.float32),
            'patch_coords': np.zeros((rows, max_patches, 2), np.int32),
            'patch_image_ids': np.zeros((rows, max_patches), np.int32),
            'image_grid_hws': np.zeros((rows, max_images, 2), np.int32)}

  for n, (patches, coords, grid) in enumerate(images):
    k = len(patches)
    if k > max_patches:
      raise ValueError(f'held-out image {n} has {k} patches, more than a row ({max_patches})')
    if cur is None:
      cur, row, used_p, used_i = new_batch(), 0, 0, 0
    if used_p + k > max_patches or used_i + 1 > max_images:
      row, used_p, used_i = row + 1, 0, 0
      if row == rows:
        batches.append(cur)
        cur, row = new_batch(), 0
    cur['patches'][row, used_p:used_p + k] = patches
    cur['patch_coords'][row, used_p:used_p + k] = coords
    cur['patch_image_ids'][row, used_p:used_p + k] = used_i + 1
    cur['image_grid_hws'][row, used_i] = grid
    slots.append((len(batches), row, used_i))
    used_p, used_i = used_p + k, used_i + 1
  if cur is not None:
    batches.append(cur)
  return batches, slots


# --------------------------------------------------------------------------------------------
# The stage.

class VitPretrainStage:
  """What MoonViT pre-training plugs into `train.loop.Trainer` (the methods of `loop.LMStage`)."""

  def __init__(self, cfg):
    self.cfg = cfg
    self._tokenizers = None

  def tokenizers(self):
    if self._tokenizers is None:
      self._tokenizers = make_tokenizers(self.cfg)
    return self._tokenizers

  def model_config(self, phase_overrides=None) -> VitPretrainConfig:
    return vit_config(self.cfg, phase_overrides)

  def validate(self, phases: list[dict]) -> None:
    """The stage's config errors, at start (module docstring)."""
    cfg = self.cfg
    ga = int(cfg.train.get('grad_accum', 1))
    if ga != 1:
      raise ValueError(
          f'config.train.grad_accum={ga}: MoonViT pre-training does not accumulate gradients. '
          'SigLIP negatives do not cross micro-batches, so it would train k contrastive batches '
          'of 1/k the size, not the configured one; grow data.batch_size or the devices instead')
    for field in ('z_loss_weight', 'balance_loss_weight'):
      if float(cfg.train.get(field, 0.0) or 0.0):
        raise ValueError(f'config.train.{field} is a language-model loss option; set it to 0 '
                         'for MoonViT pre-training')
    if len(phases) != 1:
      raise ValueError('MoonViT pre-training runs one phase; its progressive resolution is '
                       'data.resolution (a step schedule of the per-image patch budget)')
    vcfg = self.model_config(phases[0]['model_overrides'])
    data = phases[0]['data']
    caption_source(data)
    for k in ('caption_len', 'text_len', 'resolution'):
      if data.get(k) is None:
        raise ValueError(f'config.data.{k} is required for MoonViT pre-training')
    sched = ResolutionSchedule.from_config(data['resolution'])
    if sched.stages[-1][0] >= phases[0]['end']:
      raise ValueError(f'data.resolution changes at step {sched.stages[-1][0]}, but the run ends '
                       f'at step {phases[0]["end"]}')
    if max(p for _, p in sched.stages) > int(data['max_patches']):
      raise ValueError(f'data.resolution allows {max(p for _, p in sched.stages)} patches per '
                       f'image but a row holds data.max_patches={data["max_patches"]}')
    if int(data['text_len']) > vcfg.text_tower.max_position_embeddings:
      raise ValueError(f'data.text_len={data["text_len"]} exceeds the text tower\'s '
                       f'{vcfg.text_tower.max_position_embeddings} positions')
    tok, text_tok = self.tokenizers()
    for name, t, want in (('tokenizer', tok, vcfg.caption.vocab_size),
                          ('text_tokenizer', text_tok, vcfg.text_tower.vocab_size)):
      if getattr(t, 'vocab_size', 0) > want:
        raise ValueError(f'config.{name} has {t.vocab_size} tokens but the model\'s table has '
                         f'{want}')
    mesh_lib.validate({'parallel': cfg.parallel, 'data': {'batch_size': data['batch_size']}},
                      model_config=vcfg)

  def state_factory(self, vcfg: VitPretrainConfig, mesh) -> StateFactory:
    return StateFactory(self.cfg, vcfg, mesh, init_fn=lambda r: init_params(vcfg, r))

  def iterator_fn(self) -> Callable:
    def make(data_cfg, *, seed: int):
      tok, text_tok = self.tokenizers()
      d = as_dict(data_cfg)
      bcfg = CaptionBatchSpec(d, images_lib.PATCH_DIM).cfg
      import dataclasses
      bcfg = dataclasses.replace(bcfg, image=images_lib.ImageConfig.from_config(d.get('image')))
      it = caption_pairs.CaptionPairIterator(
          caption_source(d), tok, bcfg, d['resolution'], text_tokenizer=text_tok,
          text_pad_id=text_pad_id(text_tok), seed=seed, process_index=jax.process_index(),
          process_count=jax.process_count())
      return _CaptionIterator(it), tok
    return make

  def batch_spec(self, data_cfg, vcfg: VitPretrainConfig) -> CaptionBatchSpec:
    return CaptionBatchSpec(data_cfg, vcfg.vision.patch_dim)

  def jit_step(self, factory, vcfg: VitPretrainConfig, spec: CaptionBatchSpec) -> Callable:
    """The loop's step for this stage: `make_train_step` with `vit_loss` (the ring SigLIP loss
    when the pairs are split over devices), jitted with the state's and the batch's shardings."""
    train = self.cfg.train
    mesh, rules = factory.mesh, factory.rules
    model = VitPretrain(vcfg, kernels=build_kernels(vcfg.model, mesh, rules))
    pairs = spec.cfg.batch_size * jax.process_count() * spec.cfg.max_images
    loss_fn = functools.partial(
        vit_loss, siglip_fn=siglip_fn_for(mesh, rules, pairs),
        siglip_weight=float(train.get('siglip_weight', coca_loss.SIGLIP_WEIGHT)),
        caption_weight=float(train.get('caption_weight', coca_loss.CAPTION_WEIGHT)))
    step_fn = make_train_step(model, factory.tx, StepOptions(), trainable=factory.trainable,
                              lr_fn=factory.lr_fn, loss_fn=loss_fn)
    bsh = rules_lib.batch_sharding(mesh, rules)
    return jax.jit(step_fn, in_shardings=(factory.shardings, {k: bsh for k in spec.keys}),
                   out_shardings=(factory.shardings, None), donate_argnums=0)

  def evaluator(self, vcfg, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images):
    ev = self.cfg.get('eval')
    if not ev or not ev.get('caption_file'):
      return None
    return VitEvaluator(self.cfg, vcfg, mesh, rules, data_cfg, *self.tokenizers())

  def counts_fn(self, vcfg: VitPretrainConfig) -> Callable:
    """(patches, FLOPs) of a host batch: 6 x the matmul weights each patch / text-tower token /
    caption token passes through (embedding lookups free, the decoder's tied head counted),
    plus MoonViT's attention within each image."""
    v, t, c = vcfg.vision, vcfg.text_tower, vcfg.caption
    vit = v.patch_dim * v.hidden_size + v.num_layers * (
        4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    txt = t.num_layers * (4 * t.hidden_size ** 2 + 2 * t.hidden_size * t.intermediate_size)
    dec = (c.vision_dim * c.hidden_size + c.num_layers * (
        6 * c.hidden_size ** 2 + 2 * c.hidden_size * c.vision_dim
        + 2 * c.hidden_size * c.mlp_dim) + c.hidden_size * c.vocab_size)

    def counts(batch) -> tuple[float, float]:
      pid = np.asarray(batch['patch_image_ids'])
      patches = float((pid > 0).sum())
      hws = np.asarray(batch['image_grid_hws']).reshape(-1, 2).prod(-1)
      attn = 3 * 4 * v.hidden_size * v.num_layers * float((hws.astype(np.float64) ** 2).sum())
      texts = float(np.asarray(batch['image_valid']).sum()) * np.shape(batch['text_tokens'])[-1]
      caps = float((np.asarray(batch['caption_image_ids']) > 0).sum())
      return patches, 6.0 * (vit * patches + txt * texts + dec * caps) + attn

    return counts
