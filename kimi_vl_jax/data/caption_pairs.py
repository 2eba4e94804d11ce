"""Image-caption batches for MoonViT pre-training (Kimi-VL report section 2.3).

Records are JSONL lines `{"image": "<path relative to the file>", "caption": "..."}` (the demo's
`demo:easy_vqa/captions_train.jsonl`). Each image is preprocessed at its native resolution
(`data/images.py`) under the per-image patch budget of the step the batch is for
(`data/resolution_schedule.py`, progressive resolution), and image-caption pairs are packed into
fixed-shape rows, next-fit in record order: a pair joins the current row while its patches, its
image slot and its caption tokens all fit, else the next row starts. A pair that fits no empty
row (more patches than a row holds) is skipped and counted, a caption longer than a row is cut
to the row's length (`truncated_captions`); a pair that does not fit the batch's last row waits for the next
batch (nothing is dropped at a batch boundary).

A batch (numpy, B rows; host-side `_stats` aside):

| key | dtype, shape | meaning |
|---|---|---|
| `patches`, `patch_coords`, `patch_image_ids`, `image_grid_hws` | as in docs/architecture.md | MoonViT's packed input: image k of a row has id k (1..), padding 0 |
| `image_valid` | float32 [B, I] | 1 for image slots holding an image (the SigLIP loss's `valid`) |
| `text_tokens` | int32 [B, I, L] | each image's caption for the text tower, truncated / padded to L with `text_pad_id` |
| `caption_tokens` | int32 [B, T] | the row's captions for the caption decoder, `[BOS] caption [EOS]` each, packed in image order |
| `caption_image_ids` | int32 [B, T] | the image (of the same row) each caption token describes; 0 = padding |
| `caption_positions` | int32 [B, T] | position inside the caption, from 0 |
| `caption_targets`, `caption_loss_mask` | int32 / float32 [B, T] | the next token of the same caption; 0 / mask 0 at a caption's last token and padding |

So the k-th image slot of row b, its MoonViT patches (`patch_image_ids == k`), its text-tower
tokens `text_tokens[b, k-1]` and its decoder caption (`caption_image_ids == k`) are one pair
(`model/caption_decoder.py` masks cross-attention with exactly these ids).

The iterator's state (`get_state` / `set_state`) is the epoch, the next record and the step, so a
restored iterator yields the same batches.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data.resolution_schedule import ResolutionSchedule


@dataclasses.dataclass(frozen=True)
class CaptionBatchConfig:
  """Shapes of a caption batch: `batch_size` rows of `max_patches` patches (a multiple of 4),
  `max_images` image slots, `caption_len` decoder tokens; `text_len` text-tower tokens per
  image. `image` holds the other preprocessing settings (its `max_patches` is replaced by the
  resolution schedule's value)."""
  batch_size: int
  max_patches: int
  max_images: int
  caption_len: int
  text_len: int
  image: images_lib.ImageConfig = images_lib.ImageConfig()

  def __post_init__(self):
    for name in ('batch_size', 'max_patches', 'max_images', 'caption_len', 'text_len'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1; got {getattr(self, name)}')
    if self.max_patches % 4:
      raise ValueError(f'max_patches must be a multiple of 4 (2x2 merge windows); got '
                       f'{self.max_patches}')


@dataclasses.dataclass
class _Pair:
  patches: np.ndarray        # [n, 588]
  coords: np.ndarray         # [n, 2]
  grid: tuple[int, int]
  caption: np.ndarray        # decoder tokens [BOS] ... [EOS]
  text: np.ndarray           # text-tower tokens (unpadded, truncated)


def read_records(path: str) -> list[dict]:
  """The JSONL records of `path` (each with a non-empty `image` and `caption` string)."""
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      r = json.loads(line)
      if not (isinstance(r, dict) and isinstance(r.get('image'), str)
              and isinstance(r.get('caption'), str) and r['caption'].strip()):
        raise ValueError(f'{path}:{n}: a caption record needs "image" and a non-empty '
                         f'"caption" string; got {line.strip()[:200]!r}')
      out.append(r)
  if not out:
    raise ValueError(f'{path}: no records')
  return out


def _empty_batch(cfg: CaptionBatchConfig, text_pad_id: int) -> dict[str, np.ndarray]:
  b, p, i, t = cfg.batch_size, cfg.max_patches, cfg.max_images, cfg.caption_len
  return {
      'patches': np.zeros((b, p, images_lib.PATCH_DIM), np.float32),
      'patch_coords': np.zeros((b, p, 2), np.int32),
      'patch_image_ids': np.zeros((b, p), np.int32),
      'image_grid_hws': np.zeros((b, i, 2), np.int32),
      'image_valid': np.zeros((b, i), np.float32),
      'text_tokens': np.full((b, i, cfg.text_len), text_pad_id, np.int32),
      'caption_tokens': np.zeros((b, t), np.int32),
      'caption_image_ids': np.zeros((b, t), np.int32),
      'caption_positions': np.zeros((b, t), np.int32),
      'caption_targets': np.zeros((b, t), np.int32),
      'caption_loss_mask': np.zeros((b, t), np.float32),
  }


class CaptionPairIterator:
  """Batches of packed image-caption pairs (module docstring), forever (epochs reshuffled).

  Args:
    path: the JSONL file (images resolve relative to its directory).
    tokenizer: the caption decoder's tokenizer (`encode`, `special['[BOS]' / '[EOS]']`).
    cfg: `CaptionBatchConfig`.
    schedule: `ResolutionSchedule` (or what `ResolutionSchedule.from_config` takes).
    text_tokenizer: the text tower's tokenizer (default `tokenizer`); `text_pad_id` its padding
      id (default its `[PAD]`, else 0).
    seed: the record order of epoch e is a permutation seeded by (seed, e).
    start_step: the training step of the first batch.
    process_index, process_count: this host reads records i with i % count == index.
  """

  def __init__(self, path: str, tokenizer, cfg: CaptionBatchConfig, schedule: Any, *,
               text_tokenizer=None, text_pad_id: int | None = None, seed: int = 0,
               start_step: int = 0, process_index: int = 0, process_count: int = 1):
    self.root = os.path.dirname(os.path.abspath(path))
    records = read_records(path)
    self.records = records[process_index::process_count]
    if not self.records:
      raise ValueError(f'{path}: no records for process {process_index} of {process_count}')
    self.tok = tokenizer
    self.text_tok = text_tokenizer or tokenizer
    special = getattr(self.text_tok, 'special', {}) or {}
    self.text_pad_id = int(special.get('[PAD]', 0) if text_pad_id is None else text_pad_id)
    self.bos, self.eos = tokenizer.special['[BOS]'], tokenizer.special['[EOS]']
    self.cfg = cfg
    self.schedule = ResolutionSchedule.from_config(schedule)
    self.seed = seed
    self.epoch, self.index, self.step = 0, 0, int(start_step)
    self._order = self._permutation(0)

  # -- state --------------------------------------------------------------------------------
  def get_state(self) -> dict[str, int]:
    return {'epoch': self.epoch, 'index': self.index, 'step': self.step}

  def set_state(self, state: dict[str, int]) -> None:
    self.epoch, self.index, self.step = (int(state['epoch']), int(state['index']),
                                         int(state['step']))
    self._order = self._permutation(self.epoch)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

  # -- examples -----------------------------------------------------------------------------
  def _peek(self) -> dict:
    if self.index >= len(self._order):
      self.epoch, self.index = self.epoch + 1, 0
      self._order = self._permutation(self.epoch)
    return self.records[self._order[self.index]]

  def _make_pair(self, record: dict, image_cfg: images_lib.ImageConfig) -> _Pair:
    img = images_lib.load_image(os.path.join(self.root, record['image']))
    patches, coords, grid = images_lib.preprocess(img, image_cfg)
    caption = [self.bos] + self.tok.encode(record['caption']) + [self.eos]
    # A caption longer than a whole row is cut (its end, [EOS] included, is not trained on).
    caption = np.asarray(caption[:self.cfg.caption_len], np.int32)
    text = np.asarray(self.text_tok.encode(record['caption'])[:self.cfg.text_len], np.int32)
    return _Pair(patches, coords, tuple(grid), caption, text)

  def _fits_empty_row(self, pair: _Pair) -> str | None:
    if len(pair.patches) > self.cfg.max_patches:
      return 'too_many_patches'
    return None

  # -- batches ------------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    cfg = self.cfg
    budget = self.schedule(self.step)
    image_cfg = dataclasses.replace(cfg.image, max_patches=budget)
    batch = _empty_batch(cfg, self.text_pad_id)
    stats: dict[str, int] = collections.Counter()
    row, used_p, used_i, used_t = 0, 0, 0, 0
    skipped_in_a_row = 0
    pending = None                    # the pair that did not fit the previous row, not re-read
    while row < cfg.batch_size:
      if skipped_in_a_row > len(self.records):
        raise ValueError(f'every caption record was skipped ({dict(stats)}) at max '
                         f'{budget} patches per image; check the data and the batch shapes')
      record = self._peek()
      if pending is not None:
        pair, reason, pending = pending, None, None
      else:
        try:
          pair = self._make_pair(record, image_cfg)
          reason = self._fits_empty_row(pair)
        except images_lib.BadImage as e:
          reason = e.reason
      if reason:
        stats[f'skipped_{reason}'] += 1
        skipped_in_a_row += 1
        self.index += 1
        continue
      skipped_in_a_row = 0
      n, k = len(pair.patches), len(pair.caption)
      if (used_p + n > cfg.max_patches or used_i + 1 > cfg.max_images
          or used_t + k > cfg.caption_len):
        row, used_p, used_i, used_t = row + 1, 0, 0, 0
        pending = pair                # it waits for the next row (or the next batch)
        continue
      image_id = used_i + 1
      batch['patches'][row, used_p:used_p + n] = pair.patches
      batch['patch_coords'][row, used_p:used_p + n] = pair.coords
      batch['patch_image_ids'][row, used_p:used_p + n] = image_id
      batch['image_grid_hws'][row, used_i] = pair.grid
      batch['image_valid'][row, used_i] = 1.0
      batch['text_tokens'][row, used_i, :len(pair.text)] = pair.text
      span = slice(used_t, used_t + k)
      batch['caption_tokens'][row, span] = pair.caption
      batch['caption_image_ids'][row, span] = image_id
      batch['caption_positions'][row, span] = np.arange(k)
      batch['caption_targets'][row, used_t:used_t + k - 1] = pair.caption[1:]
      batch['caption_loss_mask'][row, used_t:used_t + k - 1] = 1.0
      used_p, used_i, used_t = used_p + n, used_i + 1, used_t + k
      if k == cfg.caption_len and pair.caption[-1] != self.eos:
        stats['truncated_captions'] += 1
      stats['images'] += 1
      stats['image_patches'] += n
      self.index += 1
    stats['max_patches_per_image'] = budget
    stats['step'] = self.step
    batch['_stats'] = dict(stats)
    self.step += 1
    return batch


def batch_keys() -> Sequence[str]:
  """The device keys of a caption batch (everything but the host-only `_stats`)."""
  return tuple(_empty_batch(CaptionBatchConfig(1, 4, 1, 1, 1), 0))
