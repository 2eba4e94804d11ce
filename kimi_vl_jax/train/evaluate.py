"""Periodic evaluation: held-out loss and, for question-answering data, answer accuracy by greedy
decoding of the short answer.

Config (`config.eval`):
  every            evaluate every N steps (0: only at the end of each phase)
  batches          held-out batches for the loss (0: no held-out loss)
  data             overrides of the phase's data config for the held-out split (e.g. `sources`)
  answer_file      JSONL chat records whose last turn is the assistant's reference answer
                   (empty: no answer accuracy); `demo:easy_vqa/test.jsonl` names bundled data
  answer_examples  how many records to score (the first N)
  answer_batch     rows decoded together
  max_new_tokens   decoding budget per answer (stops at `<|im_end|>`)

Answer accuracy renders each conversation without its last turn plus the generation prompt
(`<|im_assistant|>assistant<|im_middle|>`), exactly as training renders it, decodes greedily with
the full-sequence forward (no KV cache: answers are a few tokens), and counts an exact match of
the decoded text (whitespace-stripped, case-insensitive). Records with a `kind` string (the demo
data marks easy-vqa questions 'yes/no', 'shape' or 'color') are also scored per kind, as
`answer_accuracy/<kind>`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.train import losses


def _as_dict(x) -> dict:
  if x is None:
    return {}
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else dict(x)


def load_answer_examples(path: str, tok, data_cfg, limit: int) -> list[dict]:
  """Prompt arrays + reference answer per record of a chat JSONL file."""
  from kimi_vl_jax.data import chat, images as images_lib
  image_cfg = images_lib.ImageConfig.from_config(data_cfg.get('image'))
  image_cfg = image_cfg.__class__(**{**image_cfg.__dict__, 'augment': False})
  root = os.path.dirname(os.path.abspath(path))
  system = data_cfg.get('default_system_prompt', None)
  out = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      turns = chat.parse_conversation(record)
      if turns[-1].role != 'assistant':
        raise ValueError(f'{path}: the last turn of an answer record must be the assistant')
      answer = ''.join(v for kind, v in turns[-1].parts if kind == 'text')
      prompt_turns = turns[:-1]
      patches, coords, grids, ntok = [], [], [], []
      for ref in chat.image_refs(prompt_turns):
        img = images_lib.load_image(os.path.join(root, ref))
        p, c, hw = images_lib.preprocess(img, image_cfg)
        patches.append(p)
        coords.append(c)
        grids.append(hw)
        ntok.append(images_lib.num_image_tokens(hw))
      ids, _ = chat.render_chat(prompt_turns, tok, ntok, default_system_prompt=system,
                                add_generation_prompt=True)
      out.append({'ids': ids, 'answer': answer, 'kind': record.get('kind'),
                  'patches': np.concatenate(patches) if patches else None,
                  'coords': np.concatenate(coords) if coords else None,
                  'grids': np.asarray(grids, np.int32).reshape(-1, 2)})
      if len(out) >= limit:
        break
  return out


def _rows(examples: list[dict], seq_len: int, max_patches: int, max_images: int,
          patch_dim: int) -> dict[str, np.ndarray]:
  """Left-aligned prompt rows, padded to fixed shapes."""
  B = len(examples)
  ids = np.zeros((B, seq_len), np.int32)
  lens = np.zeros((B,), np.int32)
  patches = np.zeros((B, max_patches, patch_dim), np.float32)
  coords = np.zeros((B, max_patches, 2), np.int32)
  pids = np.zeros((B, max_patches), np.int32)
  grids = np.zeros((B, max_images, 2), np.int32)
  for b, ex in enumerate(examples):
    n = len(ex['ids'])
    if n >= seq_len:
      raise ValueError(f'eval prompt of {n} tokens does not fit eval seq_len {seq_len}')
    ids[b, :n], lens[b] = ex['ids'], n
    if ex['patches'] is not None:
      k = ex['patches'].shape[0]
      if k > max_patches or len(ex['grids']) > max_images:
        raise ValueError(f'eval example has {k} patches / {len(ex["grids"])} images; the limits '
                         f'are data.max_patches={max_patches}, data.max_images={max_images}')
      patches[b, :k], coords[b, :k] = ex['patches'], ex['coords']
      sizes = ex['grids'].prod(-1)
      pids[b, :k] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
      grids[b, :len(sizes)] = ex['grids']
  return {'input_ids': ids, 'lens': lens, 'patches': patches, 'patch_coords': coords,
          'patch_image_ids': pids, 'image_grid_hws': grids}


def prompt_shapes(examples: list[dict], max_new_tokens: int) -> dict[str, int]:
  """Row shapes that hold every prompt plus its answer: seq_len (a multiple of 16), max_patches,
  max_images."""
  longest = max(len(e['ids']) for e in examples)
  return {'seq_len': int(math.ceil((longest + max_new_tokens) / 16) * 16),
          'max_patches': max([0] + [e['patches'].shape[0] for e in examples
                                    if e['patches'] is not None]),
          'max_images': max([1] + [len(e['grids']) for e in examples])}


def greedy_answers(decode, params, examples: list[dict], tok, *, shapes: dict[str, int],
                   patch_dim: int, batch: int, blank_images: bool = False) -> list[str]:
  """The decoded answer text (up to `<|im_end|>`) of each example (`load_answer_examples`),
  `batch` prompts per `decode` call (`make_greedy_decoder`, jitted; the last batch is padded)."""
  end_id = tok.special['<|im_end|>']
  texts = []
  for i in range(0, len(examples), batch):
    chunk = examples[i:i + batch]
    rows = _rows(chunk + [chunk[-1]] * (batch - len(chunk)), shapes['seq_len'],
                 shapes['max_patches'], shapes['max_images'], patch_dim)
    if blank_images:
      rows['patches'] = np.zeros_like(rows['patches'])
    out = np.asarray(decode(params, {k: jnp.asarray(v) for k, v in rows.items()}))
    for gen in out[:len(chunk)]:
      gen = list(gen)
      texts.append(tok.decode(gen[:gen.index(end_id)] if end_id in gen else gen))
  return texts


def score_answers(examples: list[dict], texts: list[str]) -> dict[str, float]:
  """Exact-match accuracy (stripped, case-insensitive), overall and per example `kind`."""
  hits, by_kind = [], {}
  for ex, text in zip(examples, texts, strict=True):
    hit = int(text.strip().lower() == ex['answer'].strip().lower())
    hits.append(hit)
    if isinstance(ex.get('kind'), str):
      by_kind.setdefault(ex['kind'], []).append(hit)
  res = {'answer_accuracy': sum(hits) / len(hits), 'answer_examples': len(hits)}
  res.update({f'answer_accuracy/{k}': sum(v) / len(v) for k, v in sorted(by_kind.items())})
  return res


def make_greedy_decoder(model: KimiVL, max_new_tokens: int):
  """jit-able `(params, rows) -> generated ids [B, max_new_tokens]` by full-sequence forwards."""

  def decode(params, rows):
    B, T = rows['input_ids'].shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def body(i, carry):
      ids, lens, out = carry
      seg = (pos < lens[:, None]).astype(jnp.int32)
      logits = model.apply({'params': params}, ids, positions=pos, segment_ids=seg,
                           patches=rows['patches'], patch_coords=rows['patch_coords'],
                           patch_image_ids=rows['patch_image_ids'],
                           image_grid_hws=rows['image_grid_hws'])
      last = jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]   # [B, V]
      nxt = jnp.argmax(last, -1).astype(jnp.int32)
      ids = ids.at[jnp.arange(B), jnp.minimum(lens, T - 1)].set(nxt)
      return ids, jnp.minimum(lens + 1, T), out.at[:, i].set(nxt)

    out = jnp.zeros((B, max_new_tokens), jnp.int32)
    _, _, out = jax.lax.fori_loop(0, max_new_tokens, body,
                                  (rows['input_ids'], rows['lens'], out))
    return out

  return decode


class Evaluator:
  """Held-out loss and answer accuracy for one phase (see the module docstring)."""

  def __init__(self, cfg, mc, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images):
    ev = cfg.eval
    self.every = int(ev.get('every', 0) or 0)
    self.mesh, self.rules, self.blank = mesh, rules, blank_images
    self.model = KimiVL(mc)
    self.n_batches = int(ev.get('batches', 0) or 0)
    self.iterator_fn = iterator_fn
    self.eval_data = ml_collections.ConfigDict(_as_dict(data_cfg))
    from kimi_vl_jax.train.loop import _resolve_source
    overrides = _as_dict(ev.get('data'))
    if 'sources' in overrides:
      overrides['sources'] = [_resolve_source(dict(s), cfg.get('data_dir'))
                              for s in overrides['sources']]
    self.eval_data.update(overrides)
    self.seed = int(cfg.seed) + 7
    self.tok = tokenizer

    def loss_sums(params, batch):
      _, aux = losses.lm_loss(self.model, params, batch)
      return {'ce_sum': aux['ce_sum'], 'tokens': aux['tokens'], 'correct': aux['correct']}

    self._loss = jax.jit(loss_sums)
    self.examples = []
    answer_file = ev.get('answer_file', '') or ''
    if answer_file:
      from kimi_vl_jax.data import build_demo
      path = build_demo.resolve_path(answer_file, data_cfg.get('cache_dir'))
      self.examples = load_answer_examples(path, tokenizer, data_cfg,
                                           int(ev.get('answer_examples', 500)))
      self.max_new = int(ev.get('max_new_tokens', 8))
      self.answer_batch = int(ev.get('answer_batch', 64))
      self.shapes = prompt_shapes(self.examples, self.max_new)
      self._decode = jax.jit(make_greedy_decoder(self.model, self.max_new))
      self.patch_dim = mc.vision.patch_dim

  @classmethod
  def maybe_create(cls, cfg, mc, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images):
    ev = cfg.get('eval')
    if not ev or (not ev.get('batches') and not ev.get('answer_file')):
      return None
    return cls(cfg, mc, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images)

  def due(self, step: int, phase_end: bool) -> bool:
    return phase_end or (self.every > 0 and step % self.every == 0)

  def heldout(self, params) -> dict[str, float]:
    from kimi_vl_jax.train.loop import host_batch
    it, _ = self.iterator_fn(self.eval_data, seed=self.seed)
    ce = tok = cor = 0.0
    for _ in range(self.n_batches):
      dev, _ = host_batch(next(it), self.blank)
      s = jax.device_get(self._loss(params, {k: jnp.asarray(v) for k, v in dev.items()}))
      ce, tok, cor = ce + float(s['ce_sum']), tok + float(s['tokens']), cor + float(s['correct'])
    return {'loss': ce / max(tok, 1.0), 'token_accuracy': cor / max(tok, 1.0)}

  def answers(self, params) -> dict[str, float]:
    texts = greedy_answers(self._decode, params, self.examples, self.tok, shapes=self.shapes,
                           patch_dim=self.patch_dim, batch=self.answer_batch,
                           blank_images=self.blank)
    return score_answers(self.examples, texts)

  def run(self, params) -> dict[str, float]:
    res = {}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      if self.n_batches:
        res.update(self.heldout(params))
      if self.examples:
        res.update(self.answers(params))
    return res
