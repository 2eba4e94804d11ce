"""Packing of mixed image-text examples into fixed-shape rows, with skip/mix accounting.

Every example is a dict of variable-length arrays (sources.ExampleMaker). Rows pack several
examples with grain's first-fit / best-fit packers, one packed feature per buffer:
`input_ids`, `token_mask`, `sub_seg` to length T; `patches [P, 588]`, `patch_coords [P, 2]` to
P patches; `image_grid_hws [I, 2]` to I images. An example fits a row only if all three budgets
fit, so a row's patches are exactly the patches of its examples' images, in order: the k-th merged
token (4 consecutive patches, merge order) fills the row's k-th `<|media_pad|>`.

`finalize_row` then derives the batch contract (docs/architecture.md): segment ids 1.. per
example (and per document inside a concat-then-split text chunk), positions restarting at 0,
`targets` = next token inside the segment (0 at a segment's last token), `loss_mask[t]` =
`token_mask[t+1]` inside the segment, `patch_image_ids` from the packed grids.

Accounting travels with the data, so it is exact with any number of grain workers and restores
with the iterator state: a bad or oversize example is dropped and its reason added to a pending
count vector, which rides on the next kept example (`stats`, a grain non-sequence meta feature);
`finalize_row` sums a row's vectors into `_stats`, and the pipeline's last stage adds them up.
When a finite stream ends with counts pending, they ride on a `stats_carrier` (an example with
no tokens, patches or images), which the packer places in a row like any example, so every skip
reaches the last stage.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np
from grain._src.python.dataset import dataset as grain_dataset

from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data import video as video_lib

log = logging.getLogger(__name__)

SKIP_REASONS = (
    'malformed_json', 'bad_schema', 'unknown_role', 'empty_assistant', 'image_only_assistant',
    'no_assistant', 'empty_text', 'path_escape', 'missing_image', 'corrupt_image',
    'truncated_image', 'too_long', 'too_many_patches', 'too_many_images',
    # Remote storage (kimi_vl_jax/storage/retry.py), after bounded retries:
    'missing_object', 'access_denied', 'remote_unavailable',
)
# Kept counts per source; an image of a video counts as an image and as a frame (video.py).
KEPT_FIELDS = ('examples', 'tokens', 'images') + video_lib.VIDEO_STATS
# Reads of remote records and images through the local cache (an example's `cache` [2] vector).
CACHE_FIELDS = ('cache_hits', 'cache_misses')
PACKED_TOKEN_KEYS = ('input_ids', 'token_mask', 'sub_seg')


class StatsLayout:
  """Index of the flat int64 stats vector: per source, KEPT_FIELDS, SKIP_REASONS, CACHE_FIELDS."""

  def __init__(self, num_sources: int):
    self.num_sources = num_sources
    self.stride = len(KEPT_FIELDS) + len(SKIP_REASONS) + len(CACHE_FIELDS)
    self.skips = slice(len(KEPT_FIELDS), len(KEPT_FIELDS) + len(SKIP_REASONS))
    self.cache_fields = slice(self.skips.stop, self.stride)
    self.size = num_sources * self.stride

  def zeros(self) -> np.ndarray:
    return np.zeros(self.size, np.int64)

  def kept(self, source: int, field: str) -> int:
    return source * self.stride + KEPT_FIELDS.index(field)

  def skip(self, source: int, reason: str) -> int:
    if reason not in SKIP_REASONS:
      raise ValueError(f'unknown skip reason {reason!r}')
    return source * self.stride + len(KEPT_FIELDS) + SKIP_REASONS.index(reason)

  def add_cache(self, vec: np.ndarray, source: int, counts) -> None:
    """Adds an example's [hits, misses] cache counts to `vec`."""
    vec[source * self.stride + self.cache_fields.start:
        (source + 1) * self.stride] += np.asarray(counts, np.int64)

  def as_table(self, vec: np.ndarray) -> np.ndarray:
    """[S, stride] view: columns KEPT_FIELDS, then SKIP_REASONS (`skips`), then CACHE_FIELDS."""
    return np.asarray(vec).reshape(self.num_sources, self.stride)


class StageIterDataset(grain.IterDataset):
  """An IterDataset whose iterator is `iterator_cls(parent iterator, *args)` (picklable)."""

  def __init__(self, parent, iterator_cls, *args):
    super().__init__(parent)
    self._iterator_cls, self._args = iterator_cls, args

  def __iter__(self):
    return self._iterator_cls(self._parent.__iter__(), *self._args)


def stats_carrier(stats: np.ndarray) -> dict:
  """An example with no tokens, patches or images that carries a stats vector (source -1)."""
  return {
      'input_ids': np.zeros(0, np.int32), 'token_mask': np.zeros(0, np.int32),
      'sub_seg': np.zeros(0, np.int32), 'patches': np.zeros((0, images_lib.PATCH_DIM), np.float32),
      'patch_coords': np.zeros((0, 2), np.int32), 'image_grid_hws': np.zeros((0, 2), np.int32),
      'source': -1, 'stats': stats,
  }


class _AccountIterator(grain_dataset.DatasetIterator):
  """Drops skip markers (and, with limits, oversize examples); attaches pending counts.

  At the end of the parent, counts still pending leave on a `stats_carrier`.
  """

  def __init__(self, parent, layout: StatsLayout, limits: dict | None, count_kept: bool):
    super().__init__(parent)
    self._layout = layout
    self._limits = limits
    self._count_kept = count_kept
    self._pending = layout.zeros()

  def _oversize(self, e: dict) -> str | None:
    lim = self._limits
    if len(e['input_ids']) > lim['seq_len']:
      return 'too_long'
    if len(e['patches']) > lim['max_patches']:
      return 'too_many_patches'
    if len(e['image_grid_hws']) > lim['max_images']:
      return 'too_many_images'
    return None

  def __next__(self):
    while True:
      try:
        e = next(self._parent)
      except StopIteration:
        if not self._pending.any():
          raise
        stats, self._pending = self._pending, self._layout.zeros()
        return stats_carrier(stats)
      if 'cache' in e:
        e = dict(e)
        self._layout.add_cache(self._pending, e['source'], e.pop('cache'))
      if 'skip' in e:
        self._pending[self._layout.skip(e['source'], e['skip'])] += 1
        continue
      video_stats = None
      if 'video_stats' in e:  # kept counts only; never packed
        e = dict(e)
        video_stats = e.pop('video_stats')
      if self._limits is not None:
        reason = self._oversize(e)
        if reason is not None:
          self._pending[self._layout.skip(e['source'], reason)] += 1
          if self._pending.sum() <= 20:
            log.warning('data: dropped an example of source %d (%s: %d tokens, %d patches, '
                        '%d images)', e['source'], reason, len(e['input_ids']), len(e['patches']),
                        len(e['image_grid_hws']))
          continue
      stats = self._pending + e['stats'] if 'stats' in e else self._pending
      if self._count_kept and len(e['input_ids']):  # a stats carrier is no example
        s = e['source']
        stats[self._layout.kept(s, 'examples')] += 1
        stats[self._layout.kept(s, 'tokens')] += len(e['input_ids'])
        stats[self._layout.kept(s, 'images')] += len(e['image_grid_hws'])
        if video_stats is not None:
          first = self._layout.kept(s, video_lib.VIDEO_STATS[0])
          stats[first:first + len(video_stats)] += video_stats
      self._pending = self._layout.zeros()
      return {**e, 'stats': stats}

  def get_state(self):
    return {'parent': self._parent.get_state(), 'pending': [int(v) for v in self._pending]}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._pending = np.asarray(state['pending'], np.int64)


def account(parent: grain.IterDataset, layout: StatsLayout, limits: dict | None = None,
            count_kept: bool = False) -> grain.IterDataset:
  """See _AccountIterator. limits: {'seq_len', 'max_patches', 'max_images'} or None."""
  return StageIterDataset(parent, _AccountIterator, layout, limits, count_kept)


class _TextChunkIterator(grain_dataset.DatasetIterator):
  """Concatenate-then-split: fills chunks of exactly `chunk_len` tokens from consecutive docs.

  State = parent state before the partly emitted document + how many of its tokens are out, so a
  restore re-reads that document and continues mid-document. A document's `stats` are added to
  the chunk holding its first token; a stats carrier alone at the end makes a chunk of no tokens.

  grain's ConcatThenSplitIterDataset does the same split but cannot carry the accounting vector
  (its meta features are duplicated into every piece of a split document), hence this one.
  """

  def __init__(self, parent, chunk_len: int):
    super().__init__(parent)
    self._len = chunk_len
    self._doc = None
    self._doc_state = None
    self._off = 0

  def __next__(self):
    ids, mask, sub, stats = [], [], [], None
    n, k = 0, 0
    while n < self._len:
      if self._doc is None:
        self._doc_state = self._parent.get_state()
        try:
          self._doc = next(self._parent)
        except StopIteration:
          self._doc = None
          if stats is None:
            raise
          break
        self._off = 0
      d = self._doc
      take = min(self._len - n, len(d['input_ids']) - self._off)
      if self._off == 0:
        stats = d['stats'].copy() if stats is None else stats + d['stats']
      k += 1
      ids.append(d['input_ids'][self._off:self._off + take])
      mask.append(d['token_mask'][self._off:self._off + take])
      sub.append(np.full(take, k, np.int32))
      n += take
      self._off += take
      if self._off == len(d['input_ids']):
        self._doc = None
    return {
        'input_ids': np.concatenate(ids), 'token_mask': np.concatenate(mask),
        'sub_seg': np.concatenate(sub),
        'patches': np.zeros((0, images_lib.PATCH_DIM), np.float32),
        'patch_coords': np.zeros((0, 2), np.int32), 'image_grid_hws': np.zeros((0, 2), np.int32),
        'source': int(d['source']), 'stats': stats if stats is not None else np.zeros_like(d['stats']),
    }

  def get_state(self):
    if self._doc is None:
      return {'parent': self._parent.get_state(), 'offset': 0}
    return {'parent': self._doc_state, 'offset': int(self._off)}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._doc = None
    self._off = 0
    if state['offset'] > 0:
      self._doc_state = state['parent']
      self._doc = next(self._parent)
      self._off = int(state['offset'])


def text_chunks(parent: grain.IterDataset, chunk_len: int) -> grain.IterDataset:
  """Concatenate-then-split of text documents into `chunk_len` chunks (see _TextChunkIterator)."""
  return StageIterDataset(parent, _TextChunkIterator, chunk_len)


def pack_rows(ds: grain.IterDataset, *, seq_len: int, max_patches: int, max_images: int,
              algorithm: str = 'first_fit', num_bins: int = 8, seed: int = 0,
              shuffle_bins: bool = True) -> grain.IterDataset:
  """grain first-fit / best-fit packing of examples into rows (before `finalize_row`)."""
  length_struct = {
      'input_ids': seq_len, 'token_mask': seq_len, 'sub_seg': seq_len,
      'patches': max_patches, 'patch_coords': max_patches, 'image_grid_hws': max_images,
  }
  kwargs = dict(length_struct=length_struct, num_packing_bins=num_bins, seed=seed,
                shuffle_bins=shuffle_bins, meta_features=('stats',))
  if algorithm == 'first_fit':
    return grain.experimental.FirstFitPackIterDataset(ds, **kwargs)
  if algorithm == 'best_fit':
    return grain.experimental.BestFitPackIterDataset(ds, **kwargs)
  raise ValueError(f"data.packing.algorithm must be 'first_fit' or 'best_fit', got {algorithm!r}")


def patch_image_ids(grids: np.ndarray, num_patches: int) -> np.ndarray:
  """[num_patches] int32: image k (1-based) for each of the h*w patches of the k-th grid of
  `grids` [I, 2] (images packed in order, (0, 0) rows = padding at the end), 0 after them."""
  counts = grids[:, 0] * grids[:, 1]
  n_img = int(np.count_nonzero(counts))
  image_ids = np.zeros(num_patches, np.int32)
  used = int(counts.sum())
  image_ids[:used] = np.repeat(np.arange(1, n_img + 1, dtype=np.int32), counts[:n_img])
  return image_ids


def finalize_row(row: dict, *, pad_id: int, stats_size: int) -> dict:
  """A grain-packed row -> the batch contract's per-row arrays (+ `_stats` [K] int64)."""
  ids = row['input_ids'].astype(np.int32)
  pseg = row['input_ids_segment_ids']
  sub = row['sub_seg']
  valid = pseg > 0
  t = len(ids)
  idx = np.arange(t)
  prev_p = np.concatenate([[0], pseg[:-1]])
  prev_s = np.concatenate([[0], sub[:-1]])
  start = valid & ((pseg != prev_p) | (sub != prev_s))
  seg = (np.cumsum(start) * valid).astype(np.int32)
  seg_start = np.maximum.accumulate(np.where(start, idx, 0))
  positions = np.where(valid, idx - seg_start, 0).astype(np.int32)
  same_next = np.zeros(t, bool)
  same_next[:-1] = valid[:-1] & (seg[1:] == seg[:-1])
  targets = np.zeros(t, np.int32)
  targets[:-1] = np.where(same_next[:-1], ids[1:], 0)
  loss_mask = np.zeros(t, np.float32)
  loss_mask[:-1] = np.where(same_next[:-1], row['token_mask'][1:], 0)
  ids = np.where(valid, ids, pad_id).astype(np.int32)

  grids = row['image_grid_hws'].astype(np.int32)
  image_ids = patch_image_ids(grids, row['patches'].shape[0])

  stats = np.zeros(stats_size, np.int64)
  for v in row['stats']:
    stats += v
  return {
      'input_ids': ids, 'targets': targets, 'loss_mask': loss_mask, 'segment_ids': seg,
      'positions': positions, 'patches': row['patches'].astype(np.float32, copy=False),
      'patch_coords': row['patch_coords'].astype(np.int32), 'patch_image_ids': image_ids,
      'image_grid_hws': grids, '_stats': stats,
  }
