"""The grain data pipeline: sources -> examples -> mixture -> packed rows -> batches.

Entry points for the trainer:

  tok = make_tokenizer(cfg.tokenizer)
  it = make_iterator(cfg.data, tok, seed=0, process_index=jax.process_index(),
                     process_count=jax.process_count())
  batch = next(it)            # numpy arrays as `data/batch.py` defines (BatchSpec.from_config)
  data_stats(it)              # flat dict: kept / skipped counts by source and reason, realised mix
  it.get_state(), it.set_state(s)   # JSON-able; grain.checkpoint.CheckpointSave(it) works

Per source (the report's on-the-fly shuffle, mix and pack, Kimi-VL section 2.5): records are sharded
per host (`process_index::process_count`), shuffled per epoch, repeated, turned into examples by
`sources.ExampleMaker` (`random_map`: image augmentation is seeded per record and epoch); text
sources are concatenated then split into `seq_len` chunks. Sources are mixed by weight (grain's
deterministic weighted interleave), oversize examples are dropped and counted, examples are packed
into rows (`packing.py`), batched, and optionally prefetched by `num_workers` processes. Every
skipped record is counted, also at the end of a finite run (`num_epochs`): see packing.py and
`_StatsIterator`. Everything is a function of (config, seed, process_index, process_count,
num_workers): changing `num_workers` changes the order (grain shards the sources per worker), as
documented by grain.

Config fields read from `data` (ConfigDict or dict; defaults in `default_config()`):
  sources: list of {name, kind: chat|caption|text, path, weight, root (default: the file's
    directory), format (jsonl|txt|array_record; default from the file name)}. `path` may be
    `demo:easy_vqa/train.jsonl` etc. (built on first use under `cache_dir`, see build_demo.py),
    or `s3://` / `gs://` (read through the storage layer's cache; data_stats then reports
    `cache_hits/<source>`, `cache_misses/<source>` and `cache_hit_rate`).
  seq_len (T), max_patches (P, per row; 0 for text-only), max_images (I, per row),
  batch_size (rows per host), num_workers (0 = in-process), worker_buffer_size,
  read_threads / read_buffer_size (grain ReadOptions of each source: threads that turn records
    into examples, and how many they run ahead),
  shuffle, num_epochs (None = forever), default_system_prompt, cache_dir,
  max_skip_rate (stop when skipped / seen exceeds it, checked once skip_check_min_examples records
    were seen), skip_check_min_examples,
  image: {max_patches (per image, before padding), max_side_patches, max_video_frames (video.py),
    mean, std,
    augment: {enabled, scale_min, scale_max, brightness, contrast, hflip_prob}},
  packing: {algorithm: first_fit|best_fit, num_bins (default batch_size), shuffle_bins}.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np
from grain._src.python.dataset import dataset as grain_dataset

from kimi_vl_jax.config_dict import as_dict
from kimi_vl_jax.data import batch as batch_lib
from kimi_vl_jax.data import build_demo
from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data import packing
from kimi_vl_jax.data import sources as sources_lib
from kimi_vl_jax.data import video as video_lib
from kimi_vl_jax.data.tokenizer import make_tokenizer  # noqa: F401  (re-exported entry point)
from kimi_vl_jax.storage import paths as storage_paths


class DataQualityError(RuntimeError):
  """Too many records were skipped: the data (or the config) is broken."""


def default_config() -> ml_collections.ConfigDict:
  """Defaults for every field `make_iterator` reads (sources empty)."""
  return ml_collections.ConfigDict({
      'sources': [],
      **batch_lib.DEFAULT_SIZES,  # seq_len, max_patches, max_images, batch_size
      'num_workers': 0,
      'worker_buffer_size': 2,
      'read_threads': 2,
      'read_buffer_size': 64,
      'shuffle': True,
      'num_epochs': None,
      'default_system_prompt': None,
      'cache_dir': None,
      'max_skip_rate': 0.05,
      'skip_check_min_examples': 200,
      'image': {
          'max_patches': 4096, 'max_side_patches': 512, 'max_video_frames': 64,
          'mean': list(images_lib.CLIP_MEAN), 'std': list(images_lib.CLIP_STD),
          'augment': {'enabled': False, 'scale_min': 0.8, 'scale_max': 1.2, 'brightness': 0.1,
                      'contrast': 0.1, 'hflip_prob': 0.0},
      },
      'packing': {'algorithm': 'first_fit', 'num_bins': None, 'shuffle_bins': True},
  })


def _merged(cfg: Any) -> dict:
  """User config over the defaults (nested dicts merged one level deep)."""
  out = default_config().to_dict()
  user = as_dict(cfg)
  unknown = set(user) - set(out)
  if unknown:
    raise ValueError(f'data config: unknown fields {sorted(unknown)}; known: {sorted(out)}')
  for k, v in user.items():
    if isinstance(out.get(k), dict) and isinstance(v, dict):
      out[k] = {**out[k], **v}
    else:
      out[k] = v
  return out


def _source_seed(seed: int, i: int) -> int:
  return int(np.random.SeedSequence([seed, i, 0x6b696d69]).generate_state(1)[0])


def _source_dataset(spec: dict, i: int, cfg: dict, tok, image_cfg, layout, *, seed: int,
                    process_index: int, process_count: int, budget: dict) -> grain.IterDataset:
  """One source -> IterDataset of examples (or skip markers, for non-text kinds)."""
  name = spec.get('name') or f'source{i}'
  kind = spec.get('kind')
  path = build_demo.resolve_path(spec['path'], cfg['cache_dir'])
  fmt = spec.get('format') or sources_lib.infer_format(path)
  root = spec.get('root') or storage_paths.dirname(path)
  src = sources_lib.open_source(path, fmt)
  if len(src) < process_count:
    raise ValueError(f'data source {name!r} ({path}) has {len(src)} records, fewer than the '
                     f'{process_count} hosts it is sharded over')
  s_seed = _source_seed(seed, i)
  ds = grain.MapDataset.source(src)[process_index::process_count]
  if cfg['shuffle']:
    ds = ds.shuffle(seed=s_seed)
  ds = ds.repeat(cfg['num_epochs'])
  maker = sources_lib.ExampleMaker(
      tokenizer=tok, kind=kind, source_index=i, name=f'{name} ({path})', root=root, fmt=fmt,
      image_cfg=image_cfg, default_system_prompt=cfg['default_system_prompt'], budget=budget)
  ds = ds.random_map(maker, seed=s_seed ^ 0x5EED)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg['read_threads']),
                                            prefetch_buffer_size=int(cfg['read_buffer_size'])))
  if kind == 'text':
    it = packing.account(it, layout)
    it = packing.text_chunks(it, cfg['seq_len'])
  return it


def make_iterator(data_cfg: Any, tokenizer, *, seed: int = 0, process_index: int = 0,
                  process_count: int = 1):
  """The pipeline's iterator (a grain DatasetIterator yielding batch dicts); see module doc."""
  cfg = _merged(data_cfg)
  specs = [as_dict(s) for s in cfg['sources']]
  if not specs:
    raise ValueError('data.sources is empty: give at least one {kind, path, weight}')
  sources_lib.check_sources(specs, 'data.sources')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  for k in ('seq_len', 'batch_size'):
    if int(cfg[k]) < 1:
      raise ValueError(f'data.{k} must be >= 1, got {cfg[k]}')
  if cfg['max_patches'] % 4:
    raise ValueError(f'data.max_patches must be a multiple of 4 (2x2 merge), got {cfg["max_patches"]}')
  weights = [float(s.get('weight', 1.0)) for s in specs]
  if any(w <= 0 for w in weights):
    raise ValueError(f'data.sources weights must be > 0, got {weights}')
  image_cfg = images_lib.ImageConfig.from_config(cfg['image'])
  layout = packing.StatsLayout(len(specs))
  limits = {'seq_len': cfg['seq_len'], 'max_patches': cfg['max_patches'],
            'max_images': cfg['max_images']}
  per_source = [
      _source_dataset(s, i, cfg, tokenizer, image_cfg, layout, seed=seed,
                      process_index=process_index, process_count=process_count, budget=limits)
      for i, s in enumerate(specs)]
  ds = per_source[0] if len(per_source) == 1 else grain.IterDataset.mix(per_source, weights)
  ds = packing.account(ds, layout, limits=limits, count_kept=True)
  pk = cfg['packing']
  ds = packing.pack_rows(ds, seq_len=cfg['seq_len'], max_patches=cfg['max_patches'],
                         max_images=cfg['max_images'], algorithm=pk['algorithm'],
                         num_bins=int(pk['num_bins'] or cfg['batch_size']),
                         seed=_source_seed(seed, 10_000), shuffle_bins=bool(pk['shuffle_bins']))
  pad_id = tokenizer.pad_id
  ds = ds.map(_Finalize(pad_id, layout.size))
  # grain batches into shared memory in worker processes, which cannot hold zero-size arrays
  # (P = 0 or I = 0 in text-only configs): stack those batches with plain numpy instead.
  zero_size = cfg['max_patches'] == 0 or cfg['max_images'] == 0
  # The last partial batch is kept so its counts reach `_StatsIterator`, which drops it.
  ds = ds.batch(int(cfg['batch_size']), drop_remainder=False,
                batch_fn=_stack_batch if zero_size else None)
  if int(cfg['num_workers']) > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(cfg['num_workers']),
        per_worker_buffer_size=int(cfg['worker_buffer_size'])))
  names = [s.get('name') or f'source{i}' for i, s in enumerate(specs)]
  ds = packing.StageIterDataset(ds, _StatsIterator, layout, names, weights,
                                int(cfg['batch_size']), float(cfg['max_skip_rate']),
                                int(cfg['skip_check_min_examples']))
  return ds.__iter__()


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app (tests, notebooks) nobody
  parsed them, so accept the defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _stack_batch(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _Finalize:
  """Picklable map: packed row -> contract row (packing.finalize_row)."""

  def __init__(self, pad_id: int, stats_size: int):
    self.pad_id, self.stats_size = pad_id, stats_size

  def __call__(self, row):
    return packing.finalize_row(row, pad_id=self.pad_id, stats_size=self.stats_size)


class _StatsIterator(grain_dataset.DatasetIterator):
  """Strips `_stats` from batches, keeps running totals (part of the state), checks skip rate.

  A batch of fewer than `batch_size` rows (the end of a finite stream, per worker) or without
  tokens (only a stats carrier, packing.py) is not yielded: its skips are counted, its examples
  are not (`examples` counts what the trainer receives).
  """

  def __init__(self, parent, layout, names, weights, batch_size, max_skip_rate, min_seen):
    super().__init__(parent)
    self._layout, self._names, self._weights = layout, names, weights
    self._batch_size = batch_size
    self._max_skip_rate, self._min_seen = max_skip_rate, min_seen
    self._totals = layout.zeros()
    self._skips_only = np.zeros((layout.num_sources, layout.stride), np.int64)
    self._skips_only[:, len(packing.KEPT_FIELDS):] = 1  # skips and cache counts
    self._skips_only = self._skips_only.reshape(-1)

  def __next__(self):
    while True:
      batch = dict(next(self._parent))
      stats = np.asarray(batch.pop('_stats')).sum(axis=0)
      full = len(batch['input_ids']) == self._batch_size and batch['segment_ids'].any()
      self._totals += stats if full else stats * self._skips_only
      self._check_skip_rate()
      if full:
        return batch

  def _check_skip_rate(self):
    table = self._layout.as_table(self._totals)
    kept = int(table[:, 0].sum())
    skipped = int(table[:, self._layout.skips].sum())
    seen = kept + skipped
    if seen >= self._min_seen and skipped > self._max_skip_rate * seen:
      raise DataQualityError(
          f'data pipeline: {skipped} of {seen} records skipped ({skipped / seen:.1%}), above '
          f'data.max_skip_rate={self._max_skip_rate:.1%}. Skips by source and reason: '
          f'{self.skip_counts()}. The log has each skipped record with its source and line.')

  def skip_counts(self) -> dict[str, dict[str, int]]:
    table = self._layout.as_table(self._totals)
    out = {}
    for s, name in enumerate(self._names):
      row = {r: int(table[s, len(packing.KEPT_FIELDS) + k])
             for k, r in enumerate(packing.SKIP_REASONS)}
      out[name] = {r: v for r, v in row.items() if v}
    return out

  def stats(self) -> dict[str, float]:
    table = self._layout.as_table(self._totals)
    kept = {f: table[:, k] for k, f in enumerate(packing.KEPT_FIELDS)}
    kept_ex, kept_tok, kept_img = kept['examples'], kept['tokens'], kept['images']
    skipped = table[:, self._layout.skips]
    cache = table[:, self._layout.cache_fields]
    out: dict[str, float] = {}
    tw = sum(self._weights)
    for s, name in enumerate(self._names):
      out[f'examples/{name}'] = int(kept_ex[s])
      out[f'tokens/{name}'] = int(kept_tok[s])
      out[f'images/{name}'] = int(kept_img[s])
      if kept['videos'][s]:
        for f in video_lib.VIDEO_STATS:
          out[f'{f}/{name}'] = int(kept[f][s])
      out[f'skipped/{name}'] = int(skipped[s].sum())
      out[f'mix_target/{name}'] = self._weights[s] / tw
      out[f'mix_examples/{name}'] = float(kept_ex[s] / max(1, kept_ex.sum()))
      out[f'mix_tokens/{name}'] = float(kept_tok[s] / max(1, kept_tok.sum()))
      for k, r in enumerate(packing.SKIP_REASONS):
        if skipped[s, k]:
          out[f'skipped/{name}/{r}'] = int(skipped[s, k])
      if cache[s].any():  # remote sources: reads served by the local cache / fetched
        out[f'cache_hits/{name}'] = int(cache[s, 0])
        out[f'cache_misses/{name}'] = int(cache[s, 1])
    seen = int(kept_ex.sum() + skipped.sum())
    out['skip_rate'] = float(skipped.sum() / max(1, seen))
    if cache.any():
      out['cache_hit_rate'] = float(cache[:, 0].sum() / max(1, cache.sum()))
    return out

  def get_state(self):
    return {'parent': self._parent.get_state(), 'totals': [int(v) for v in self._totals]}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._totals = np.asarray(state['totals'], np.int64)


def data_stats(iterator) -> dict[str, float]:
  """Counters for logging: kept examples / tokens / images and skips per source (and reason),
  target vs realised mix (by examples and by tokens), overall skip rate; for a source with
  videos also videos / frames kept and frames removed by `image.max_video_frames`
  (`frames_subsampled`) and to fit the row budget (`frames_over_budget`), video.py."""
  if not isinstance(iterator, _StatsIterator):
    raise TypeError(f'data_stats needs the iterator returned by make_iterator, got {type(iterator)}')
  return iterator.stats()


def skip_counts(iterator) -> dict[str, dict[str, int]]:
  """{source name: {reason: count}} of the records skipped so far."""
  if not isinstance(iterator, _StatsIterator):
    raise TypeError(f'skip_counts needs the iterator returned by make_iterator, got {type(iterator)}')
  return iterator.skip_counts()
