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
the KV-cache sampler (`kimi_vl_jax/sampling`, stopping at `<|im_end|>`), and counts an exact match
of the decoded text (whitespace-stripped, case-insensitive). `make_greedy_decoder` is the same
greedy decoding by full-sequence forwards (no cache), kept as the reference the sampler is tested
and benchmarked against. Records with a `kind` string (the demo
data marks easy-vqa questions 'yes/no', 'shape' or 'color') are also scored per kind, as
`answer_accuracy/<kind>`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kimi_vl_jax.config_dict import as_dict
from kimi_vl_jax.data import chat, images as images_lib, packing, sources
from kimi_vl_jax.data.batch import BatchSpec
from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.parallel import context as context_lib
from kimi_vl_jax.parallel.kernels import build_kernels
from kimi_vl_jax.sampling import Prompt, Sampler, SamplingParams
from kimi_vl_jax.storage import jsonl
from kimi_vl_jax.storage import paths as storage_paths
from kimi_vl_jax.train import losses
from kimi_vl_jax.train.stage_config import resolve_sources


def load_answer_examples(path: str, tok, data_cfg, limit: int) -> list[dict]:
  """Prompt arrays + reference answer per record of a chat JSONL file (images relative to the
  file's directory, which they must not leave; no augmentation)."""
  image_cfg = images_lib.ImageConfig.from_config(data_cfg.get('image'))
  image_cfg = image_cfg.__class__(**{**image_cfg.__dict__, 'augment': False})
  root = storage_paths.dirname(path)  # local or s3:// / gs:// (images read from there too)
  system = data_cfg.get('default_system_prompt', None)

  def parse(record: dict, line: int) -> dict:
    turns = chat.parse_conversation(record)
    if turns[-1].role != 'assistant':
      raise ValueError('the last turn of an answer record must be the assistant')
    answer = ''.join(v for kind, v in turns[-1].parts if kind == 'text')
    prompt_turns = turns[:-1]
    patches, coords, grids, ntok = sources.load_images(chat.image_refs(prompt_turns), root,
                                                       image_cfg)
    ids, _ = chat.render_chat(prompt_turns, tok, ntok, default_system_prompt=system,
                              add_generation_prompt=True)
    return {'ids': ids, 'answer': answer, 'kind': record.get('kind'),
            'patches': patches if ntok else None, 'coords': coords if ntok else None,
            'grids': grids}
  return jsonl.read(path, parse, limit=limit, errors=(chat.SkipExample, images_lib.BadImage),
                    what='eval answer file')


def prompt_batch(examples: list[dict], spec: BatchSpec) -> dict[str, np.ndarray]:
  """The examples (`load_answer_examples`) as a prompt batch of `spec` (`targets=False`, one
  row per example): left-aligned prompts, one segment each, the rest padding."""
  if spec.targets or spec.rows != len(examples):
    raise ValueError(f'prompt_batch needs a prompt BatchSpec of {len(examples)} rows, got {spec}')
  seq_len, max_patches, max_images = spec.seq_len, spec.max_patches, spec.max_images
  rows = spec.zeros()
  for b, ex in enumerate(examples):
    n = len(ex['ids'])
    if n >= seq_len:
      raise ValueError(f'eval prompt of {n} tokens does not fit eval seq_len {seq_len}')
    rows['input_ids'][b, :n] = ex['ids']
    rows['segment_ids'][b, :n] = 1
    rows['positions'][b, :n] = np.arange(n)
    if ex['patches'] is not None:
      k = ex['patches'].shape[0]
      if k > max_patches or len(ex['grids']) > max_images:
        raise ValueError(f'eval example has {k} patches / {len(ex["grids"])} images; the limits '
                         f'are data.max_patches={max_patches}, data.max_images={max_images}')
      rows['patches'][b, :k], rows['patch_coords'][b, :k] = ex['patches'], ex['coords']
      rows['image_grid_hws'][b, :len(ex['grids'])] = ex['grids']
      rows['patch_image_ids'][b] = packing.patch_image_ids(rows['image_grid_hws'][b], max_patches)
  return rows


def prompt_spec(examples: list[dict], max_new_tokens: int, patch_dim: int, rows: int
                ) -> BatchSpec:
  """The prompt `BatchSpec` of `rows` rows that holds every prompt plus its answer: seq_len (a
  multiple of 16), max_patches and max_images of the largest example."""
  longest = max(len(e['ids']) for e in examples)
  return BatchSpec(rows, int(math.ceil((longest + max_new_tokens) / 16) * 16),
                   max([0] + [e['patches'].shape[0] for e in examples
                              if e['patches'] is not None]),
                   max([1] + [len(e['grids']) for e in examples]), patch_dim, targets=False)


def greedy_answers(decode, params, examples: list[dict], tok, *, spec: BatchSpec,
                   blank_images: bool = False) -> list[str]:
  """The decoded answer text (up to `<|im_end|>`) of each example (`load_answer_examples`),
  `spec.rows` prompts per `decode` call (`make_greedy_decoder`, jitted; the last batch is
  padded)."""
  end_id = tok.special['<|im_end|>']
  texts = []
  for i in range(0, len(examples), spec.rows):
    chunk = examples[i:i + spec.rows]
    rows, _ = spec.split(prompt_batch(chunk + [chunk[-1]] * (spec.rows - len(chunk)), spec),
                         blank_images=blank_images)
    out = np.asarray(decode(params, {k: jnp.asarray(v) for k, v in rows.items()}))
    for gen in out[:len(chunk)]:
      gen = list(gen)
      texts.append(tok.decode(gen[:gen.index(end_id)] if end_id in gen else gen))
  return texts


def answer_prompts(examples: list[dict], *, blank_images: bool = False) -> list[Prompt]:
  """The examples (`load_answer_examples`) as the sampler's HF-style prompts (each image's
  patches row-major, `pixel_values [L, 3, 14, 14]`); `blank_images` zeroes every patch as
  `BatchSpec.split` does."""
  out = []
  for ex in examples:
    if ex['patches'] is None:
      out.append(Prompt(ex['ids']))
      continue
    pixel_values, start = [], 0
    for h, w in ex['grids']:
      n = int(h) * int(w)
      row_major = np.empty_like(ex['patches'][start:start + n])
      row_major[images_lib.merge_order_permutation(int(h), int(w))] = ex['patches'][start:start + n]
      pixel_values.append(row_major)
      start += n
    pv = np.concatenate(pixel_values).reshape(-1, 3, images_lib.PATCH, images_lib.PATCH)
    out.append(Prompt(ex['ids'], np.zeros_like(pv) if blank_images else pv, ex['grids']))
  return out


def sampler_answers(sampler: Sampler, examples: list[dict], tok, *, max_new_tokens: int,
                    blank_images: bool = False) -> list[str]:
  """The greedy answer text (up to `<|im_end|>`) of each example, decoded with the KV-cache
  sampler (the same tokens as `greedy_answers` with `make_greedy_decoder`)."""
  params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                          stop_token_ids=(tok.special['<|im_end|>'],))
  return sampler.generate(answer_prompts(examples, blank_images=blank_images), params).texts


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
  """jit-able `(params, rows) -> generated ids [B, max_new_tokens]` by full-sequence forwards.

  rows: a prompt batch of left-aligned prompts, one segment per row (`prompt_batch`); each row's
  prompt length is its count of non-zero `segment_ids`.
  """

  def decode(params, rows):
    B, T = rows['input_ids'].shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    lens0 = jnp.sum(rows['segment_ids'] > 0, axis=1).astype(jnp.int32)

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
    _, _, out = jax.lax.fori_loop(0, max_new_tokens, body, (rows['input_ids'], lens0, out))
    return out

  return decode


class Evaluator:
  """Held-out loss and answer accuracy for one phase (see the module docstring)."""

  def __init__(self, cfg, mc, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images):
    ev = cfg.eval
    self.every = int(ev.get('every', 0) or 0)
    self.mesh, self.rules, self.blank, self.mc = mesh, rules, blank_images, mc
    self.model = KimiVL(mc, kernels=build_kernels(mc, mesh, rules))
    self.n_batches = int(ev.get('batches', 0) or 0)
    self.iterator_fn = iterator_fn
    self.eval_data = ml_collections.ConfigDict(as_dict(data_cfg))
    overrides = as_dict(ev.get('data'))
    if 'sources' in overrides:
      overrides['sources'] = resolve_sources(overrides['sources'], cfg.get('data_dir'))
    self.eval_data.update(overrides)
    self.batch_spec = BatchSpec.from_config(self.eval_data, mc)
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
      self.prompt_spec = prompt_spec(self.examples, self.max_new, mc.vision.patch_dim,
                                     self.answer_batch)
      self._sampler = None      # built on first use, from the params it is given
      self.prompt_bucket = int(math.ceil(max(len(e['ids']) for e in self.examples) / 16) * 16)

  @classmethod
  def maybe_create(cls, cfg, mc, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images):
    ev = cfg.get('eval')
    if not ev or (not ev.get('batches') and not ev.get('answer_file')):
      return None
    return cls(cfg, mc, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images)

  def due(self, step: int, phase_end: bool) -> bool:
    return phase_end or (self.every > 0 and step % self.every == 0)

  def heldout(self, params) -> dict[str, float]:
    it, _ = self.iterator_fn(self.eval_data, seed=self.seed)
    ce = tok = cor = 0.0
    for _ in range(self.n_batches):
      dev, _ = self.batch_spec.split(next(it), blank_images=self.blank)
      s = jax.device_get(self._loss(params, {k: jnp.asarray(v) for k, v in dev.items()}))
      ce, tok, cor = ce + float(s['ce_sum']), tok + float(s['tokens']), cor + float(s['correct'])
    return {'loss': ce / max(tok, 1.0), 'token_accuracy': cor / max(tok, 1.0)}

  def answers(self, params) -> dict[str, float]:
    if self._sampler is None:
      # The sampler does not split sequences over a context axis: it keeps the rest of the
      # run's layout (batch, experts, parameter sharding) and leaves act_len unsplit.
      rules = self.rules
      if context_lib.context_size(self.mesh, rules) > 1:
        rules = tuple((k, v) for k, v in rules if k != 'act_len')
      self._sampler = Sampler(self.mc, params, mesh=self.mesh, rules=rules,
                              max_len=self.prompt_spec.seq_len,
                              prompt_buckets=(self.prompt_bucket,),
                              batch_buckets=(self.answer_batch,), tokenizer=self.tok)
    else:
      self._sampler.load_params(params)   # new weights, same shapes: nothing recompiles
    texts = sampler_answers(self._sampler, self.examples, self.tok, max_new_tokens=self.max_new,
                            blank_images=self.blank)
    return score_answers(self.examples, texts)

  def run(self, params) -> dict[str, float]:
    res = {}
    if self.n_batches:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        res.update(self.heldout(params))
    if self.examples:   # the sampler places its params and enters its mesh and rules itself
      res.update(self.answers(params))
    return res
