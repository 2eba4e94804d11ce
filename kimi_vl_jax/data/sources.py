"""Record sources and the record -> example step.

Source kinds (config `data.sources[i].kind`):
  chat:    conversations `{"messages": [...]}` (chat.py), images and video frames (video.py)
           relative to the dataset root.
  caption: image-caption pairs `{"image": "rel/path.png", "caption": "..."}`.
  text:    pretraining documents: JSONL `{"text": "..."}` or `.txt` (one document per line).
Formats (from the file name unless `format` is given): `jsonl`, `txt`, `array_record` (each record
the UTF-8 JSON of one line of the JSONL form). The dataset root defaults to the file's directory;
image paths that resolve outside it (`..`, absolute paths, symlinks out) are refused.

Paths may be local, `s3://` or `gs://` (kimi_vl_jax/storage). A remote JSONL / text file is read in
cached blocks (storage/blocks.py), a remote ArrayRecord file is fetched whole into the cache, and
the images of a remote data set are read from its root (which must lie in the same bucket)
through the cache. A record or image that cannot be read after the storage layer's retries is a
skip counted under its reason (missing_object / missing_image, access_denied,
remote_unavailable); each example carries `cache` = [hits, misses] of its reads.

`ExampleMaker` turns one record into an example (numpy arrays, variable size) or a skip marker
`{'skip': reason, 'source': i}`: a bad record never raises, it is counted (packing.py) and logged
here with its source name and line. A video is subsampled to `data.image.max_video_frames` and,
given the row budget, further until the example fits a row (video.py); the frames removed are
counted in the example's `video_stats`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import posixpath
from typing import Any

import numpy as np

from kimi_vl_jax.data import chat
from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data import video as video_lib
from kimi_vl_jax.storage import blocks as blocks_lib
from kimi_vl_jax.storage import cache as cache_lib
from kimi_vl_jax.storage import files as files_lib
from kimi_vl_jax.storage import paths as paths_lib
from kimi_vl_jax.storage.retry import StorageError

log = logging.getLogger(__name__)

KINDS = ('chat', 'caption', 'text')
# Modalities no source kind parses: a source whose name or path announces one would only yield
# skipped records. (Video is read: `chat` records with video parts, video.py.)
UNREADABLE_MODALITIES = ('audio',)
EMPTY_PATCHES = np.zeros((0, images_lib.PATCH_DIM), np.float32)


def check_sources(specs, field: str) -> None:
  """Raises ValueError (naming `field[i]`) unless every source spec is one the pipeline reads.

  Each spec needs a `path` and a `kind` in KINDS, and its name and path must not announce a
  modality in UNREADABLE_MODALITIES. Trainers call this at start for every phase and eval set.
  """
  for i, spec in enumerate(specs):
    spec = dict(spec)
    name = spec.get('name') or f'source{i}'
    where = f'{field}[{i}] ({name!r})'
    if spec.get('kind') not in KINDS:
      raise ValueError(f'{where}: unknown kind {spec.get("kind")!r}; use one of {KINDS}')
    if not spec.get('path'):
      raise ValueError(f'{where}: `path` is required')
    said = f'{name} {spec["path"]}'.lower()
    for modality in UNREADABLE_MODALITIES:
      if modality in said:
        raise ValueError(
            f'{where} reads {spec["path"]!r}: its name/path says {modality}, which no source '
            f'kind {KINDS} parses yet (its records would all be skipped as bad_schema); remove '
            f'it from {field} or convert it to one of those kinds')


class LineSource:
  """Random access to the non-blank lines of a text file (JSONL or plain text), by byte offsets.

  Returns `{'raw': bytes, 'line': 1-based line number}`; for a remote file also `cache`
  ([hits, misses] of the blocks read), or `error` (a storage skip reason) instead of `raw` when
  the bytes could not be read. Pickles without an open file handle, so it travels to grain
  worker processes.
  """

  def __init__(self, path: str):
    self.path = path
    self._remote = None
    if paths_lib.is_remote(path):
      if not paths_lib.isfile(path):
        raise FileNotFoundError(f'data source not found: {path!r}')
      self._remote = blocks_lib.BlockReader(path)
      chunks = (self._remote.block(k)[0] for k in range(self._remote.num_blocks()))
    elif not os.path.isfile(path):
      raise FileNotFoundError(f'data source not found: {path!r}')
    else:
      chunks = _file_chunks(path)
    starts, ends, lines = [], [], []
    pos, k, line_start, blank = 0, 0, 0, True
    for chunk in chunks:  # line boundaries across chunks (a line may span blocks)
      i = 0
      while i < len(chunk):
        j = chunk.find(b'\n', i)
        end = len(chunk) if j < 0 else j + 1
        blank = blank and not chunk[i:end].strip()
        if j >= 0:
          k += 1
          if not blank:
            starts.append(line_start)
            ends.append(pos + end)
            lines.append(k)
          line_start, blank = pos + end, True
        i = end
      pos += len(chunk)
    if line_start < pos and not blank:  # a last line without a newline
      starts.append(line_start)
      ends.append(pos)
      lines.append(k + 1)
    self._starts = np.asarray(starts, np.int64)
    self._ends = np.asarray(ends, np.int64)
    self._lines = np.asarray(lines, np.int64)
    self._fd = None

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, i: int) -> dict:
    start, end = int(self._starts[i]), int(self._ends[i])
    line = int(self._lines[i])
    if self._remote is not None:
      try:
        raw, hits, misses = self._remote.read(start, end)
      except StorageError as e:
        return {'error': e.reason, 'detail': str(e), 'line': line}
      return {'raw': raw, 'line': line, 'cache': np.asarray([hits, misses], np.int64)}
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    return {'raw': os.pread(self._fd, end - start, start), 'line': line}

  def __getstate__(self):
    d = dict(self.__dict__)
    d['_fd'] = None
    return d

  def __repr__(self) -> str:
    return f'LineSource({self.path!r}, {len(self)} records)'


def _file_chunks(path: str, size: int = 1 << 22):
  with open(path, 'rb') as f:
    while chunk := f.read(size):
      yield chunk


class ArrayRecordSource:
  """ArrayRecord file(s) whose records are the JSON of the JSONL form; `line` = record index.

  Remote files are fetched whole into the read cache and pinned there while the source lives
  (in every process it is unpickled in: a cache hit there)."""

  def __init__(self, paths: str | list[str]):
    self.paths = paths
    self._open()

  def _open(self):
    import grain
    local, self._pins = [], []
    for p in ([self.paths] if isinstance(self.paths, str) else list(self.paths)):
      if paths_lib.is_remote(p) and not paths_lib.isfile(p):
        raise FileNotFoundError(f'data source not found: {p!r}')
      path, pin = files_lib.fetch_file(p)
      local.append(path)
      self._pins.append(pin)
    self._src = grain.sources.ArrayRecordDataSource(local if len(local) > 1 else local[0])

  def __getstate__(self):
    return {'paths': self.paths}

  def __setstate__(self, state):
    self.paths = state['paths']
    self._open()

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    return {'raw': self._src[i], 'line': int(i)}

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self.paths!r})'


def write_array_record(records: list[Any], path: str) -> None:
  """Writes JSON-serialisable records (or raw bytes) to one ArrayRecord file."""
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(path, 'group_size:1')
  for r in records:
    w.write(r if isinstance(r, bytes) else json.dumps(r).encode())
  w.close()


def infer_format(path: str) -> str:
  p = path.lower()
  if p.endswith('.jsonl') or p.endswith('.json'):
    return 'jsonl'
  if p.endswith('.txt'):
    return 'txt'
  if '.array_record' in p or p.endswith('.arrayrecord'):
    return 'array_record'
  raise ValueError(f'cannot infer the format of {path!r}: set `format` to jsonl, txt or array_record')


def open_source(path: str, fmt: str | None = None):
  fmt = fmt or infer_format(path)
  paths_lib.check_bucket(path, 'data source')
  if fmt in ('jsonl', 'txt'):
    return LineSource(path)
  if fmt == 'array_record':
    return ArrayRecordSource(path)
  raise ValueError(f'unknown source format {fmt!r} for {path!r}')


def resolve_under_root(root: str, ref: str, _dir_cache: dict | None = None) -> str:
  """Absolute path of `ref` inside `root`; SkipExample('path_escape') if it resolves outside.

  Symlinks are followed (a link pointing out of the root escapes it). `_dir_cache` memoises the
  resolved directories (images share few of them; resolving costs an lstat per component).
  A remote root (`s3://bucket/prefix`) has no symlinks: `ref` must be a relative key that stays
  under the prefix after `.` / `..` are resolved (another scheme or bucket is an escape too).
  """
  if not isinstance(ref, str) or not ref or '\x00' in ref:
    raise chat.SkipExample('bad_schema', f'bad image path {ref!r}')
  if paths_lib.is_remote(root):
    return _resolve_remote(root, ref)
  cache = {} if _dir_cache is None else _dir_cache
  if root not in cache:
    cache[root] = os.path.realpath(root)
  real_root = cache[root]
  joined = os.path.join(real_root, ref)
  d, base = os.path.split(joined)
  if d not in cache:
    cache[d] = os.path.realpath(d)
  full = os.path.join(cache[d], base)
  if base in ('', '.', '..') or os.path.islink(full):
    full = os.path.realpath(full)
  if os.path.commonpath([real_root, full]) != real_root:
    raise chat.SkipExample('path_escape', f'image path {ref!r} resolves outside the root {root!r}')
  return full


def _resolve_remote(root: str, ref: str) -> str:
  root = paths_lib.normalize(root)
  if '://' in ref or ref.startswith('/') or '\\' in ref:
    raise chat.SkipExample('path_escape',
                           f'image path {ref!r} is not relative to the root {root!r}')
  prefix = root.split('://', 1)[1]
  key = posixpath.normpath(posixpath.join(prefix, ref))
  if not key.startswith(prefix + '/'):
    raise chat.SkipExample('path_escape', f'image path {ref!r} resolves outside the root {root!r}')
  return f'{root.split("://", 1)[0]}://{key}'


def _remote_image(url: str, draft_limit: int | None, io: np.ndarray | None):
  """A remote image through the read cache; BadImage with the storage reason if unreadable."""
  try:
    data, hit = cache_lib.default_cache().get(f'obj:{url}', lambda: paths_lib.read_bytes(url))
  except StorageError as e:
    raise images_lib.BadImage('missing_image' if e.reason == 'missing_object' else e.reason,
                              str(e)) from e
  if io is not None:
    io[0 if hit else 1] += 1
  return images_lib.decode_image(data, url, draft_limit)


def load_image_patches(ref: str, root: str, image_cfg: images_lib.ImageConfig,
                       rng: np.random.Generator | None = None, dir_cache: dict | None = None,
                       io: np.ndarray | None = None):
  """One image (path relative to `root`) -> (patches [p, 588], coords [p, 2], (h, w) grid).

  Raises `chat.SkipExample` for a path outside the root and `images.BadImage` for a missing or
  broken file. `rng` seeds the augmentation (None: none); `dir_cache` as in `resolve_under_root`;
  `io` ([hits, misses]) counts the cache reads of remote images.
  """
  path = resolve_under_root(root, ref, dir_cache)
  if paths_lib.is_remote(path):
    img = _remote_image(path, image_cfg.max_patches, io)
  else:
    img = images_lib.load_image(path, draft_limit=image_cfg.max_patches)
  return images_lib.preprocess(img, image_cfg, rng)


def stack_images(loaded: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
  """[(patches, coords, grid), ...] -> (patches [p, 588], coords [p, 2], grids [i, 2], tokens)."""
  if not loaded:
    return EMPTY_PATCHES, np.zeros((0, 2), np.int32), np.zeros((0, 2), np.int32), []
  return (np.concatenate([p for p, _, _ in loaded]), np.concatenate([c for _, c, _ in loaded]),
          np.asarray([hw for _, _, hw in loaded], np.int32).reshape(-1, 2),
          [images_lib.num_image_tokens(hw) for _, _, hw in loaded])


def load_images(refs: list[str], root: str, image_cfg: images_lib.ImageConfig,
                rng: np.random.Generator | None = None, dir_cache: dict | None = None,
                io: np.ndarray | None = None):
  """Loads and preprocesses the images `refs` (paths relative to the dataset root `root`) ->
  (patches [p, 588] float32, patch_coords [p, 2] int32, grids [i, 2] int32, tokens per image).

  Raises as `load_image_patches`.
  """
  return stack_images([load_image_patches(r, root, image_cfg, rng, dir_cache, io) for r in refs])


def load_media(turns, root: str, image_cfg: images_lib.ImageConfig,
               rng: np.random.Generator | None = None, dir_cache: dict | None = None,
               io: np.ndarray | None = None) -> tuple[list, list[tuple[int, int]]]:
  """Every image and video frame of parsed chat turns, in order of appearance ->
  (loaded [(patches, coords, grid)], slots [(video index or -1, frame index)]).

  All frames of one video share one augmentation draw (the same scale, flip and jitter), so a
  video stays a video; images draw from `rng` one after another.
  """
  loaded, slots = [], []
  v = 0
  for turn in turns:
    for kind, val in turn.parts:
      if kind == 'image':
        loaded.append(load_image_patches(val, root, image_cfg, rng, dir_cache, io))
        slots.append((-1, 0))
      elif kind == 'video':
        seed = None if rng is None else int(rng.integers(2 ** 63))
        for f, ref in enumerate(val.frames):
          frng = None if seed is None else np.random.default_rng(seed)
          loaded.append(load_image_patches(ref, root, image_cfg, frng, dir_cache, io))
          slots.append((v, f))
        v += 1
  return loaded, slots


class ExampleMaker:
  """Record -> example dict, or a skip marker. Picklable (it runs in grain workers).

  Example keys: input_ids int32 [n], token_mask int32 [n], sub_seg int32 [n] (all 1; the text
  chunker numbers documents inside a chunk), patches float32 [p, 588], patch_coords int32 [p, 2],
  image_grid_hws int32 [i, 2], source int; with videos also video_stats int64 [4]
  (video.VIDEO_STATS).

  budget: the row's {'seq_len', 'max_patches', 'max_images'}; videos of an example that exceeds
    it are subsampled further until it fits (video.fit_frames). None: no such fitting.
  """

  def __init__(self, *, tokenizer, kind: str, source_index: int, name: str, root: str,
               fmt: str, image_cfg: images_lib.ImageConfig,
               default_system_prompt: str | None = None, log_first: int = 20,
               budget: dict | None = None):
    if kind not in KINDS:
      raise ValueError(f'source {name!r}: unknown kind {kind!r}; use one of {KINDS}')
    self.tok = tokenizer
    self.kind = kind
    self.source_index = source_index
    self.name = name
    self.root = root
    self.fmt = fmt
    self.image_cfg = image_cfg
    self.default_system_prompt = default_system_prompt
    self.log_first = log_first
    self.budget = None if budget is None else np.asarray(
        [budget['seq_len'], budget['max_patches'], budget['max_images']], np.int64)
    self._logged = collections.Counter()
    self._dir_cache: dict[str, str] = {}

  def __getstate__(self):
    d = dict(self.__dict__)
    d['_logged'] = collections.Counter()
    d['_dir_cache'] = {}
    return d

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    io = np.array(record.get('cache', (0, 0)), np.int64)
    if 'error' in record:
      out = self._skip(record, record['error'], record.get('detail', ''))
    else:
      try:
        out = self._make(record, rng, io)
      except chat.SkipExample as e:
        out = self._skip(record, e.reason, e.detail)
      except images_lib.BadImage as e:
        out = self._skip(record, e.reason, e.detail)
    if io.any():
      out['cache'] = io
    return out

  def _skip(self, record: dict, reason: str, detail: str) -> dict:
    key = reason
    self._logged[key] += 1
    n = self._logged[key]
    if n <= self.log_first or n % 1000 == 0:
      log.warning('data: skipped %s line %s (%s): %s%s', self.name, record.get('line'), reason,
                  detail, f' [{n} so far in this process]' if n > self.log_first else '')
    return {'skip': reason, 'source': self.source_index}

  def _decode(self, raw: bytes):
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise chat.SkipExample('malformed_json', f'not UTF-8: {e}') from e
    if self.fmt == 'txt':
      return {'text': text.rstrip('\r\n')}
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise chat.SkipExample('malformed_json', f'{e.msg} at column {e.colno}') from e

  def _make(self, record: dict, rng, io: np.ndarray | None = None) -> dict:
    obj = self._decode(record['raw'])
    if self.kind == 'chat':
      turns = chat.parse_conversation(obj)
      if chat.videos(turns):
        return self._make_video_chat(turns, rng, io)
      refs = chat.image_refs(turns)
    elif self.kind == 'caption':
      if not isinstance(obj, dict) or not isinstance(obj.get('image'), str) \
          or not isinstance(obj.get('caption'), str):
        raise chat.SkipExample('bad_schema', 'caption record needs "image" and "caption" strings')
      refs = [obj['image']]
    else:
      if not isinstance(obj, dict) or not isinstance(obj.get('text'), str):
        raise chat.SkipExample('bad_schema', 'text record needs a "text" string')
      refs = []
    patches, coords, grids, tokens = load_images(refs, self.root, self.image_cfg, rng,
                                                 self._dir_cache, io)
    if self.kind == 'chat':
      ids, mask = chat.render_chat(turns, self.tok, tokens,
                                   default_system_prompt=self.default_system_prompt)
    elif self.kind == 'caption':
      ids, mask = chat.render_caption(obj['caption'], self.tok, tokens[0])
    else:
      ids, mask = chat.render_text(obj['text'], self.tok)
    return self._example(ids, mask, patches, coords, grids)

  def _example(self, ids, mask, patches, coords, grids) -> dict:
    return {
        'input_ids': ids, 'token_mask': mask, 'sub_seg': np.ones_like(ids),
        'patches': patches, 'patch_coords': coords, 'image_grid_hws': grids,
        'source': self.source_index,
    }

  def _make_video_chat(self, turns, rng, io: np.ndarray | None = None) -> dict:
    """A chat with videos: subsample to max_video_frames, load, fit the row budget, render."""
    vids = chat.videos(turns)
    limit = self.image_cfg.max_video_frames
    short = [v.select(video_lib.subsample_indices(v.timestamps, limit)) for v in vids]
    subsampled = sum(len(v) for v in vids) - sum(len(v) for v in short)
    turns = chat.replace_videos(turns, short)
    loaded, slots = load_media(turns, self.root, self.image_cfg, rng, self._dir_cache, io)
    patches, coords, grids, tokens = stack_images(loaded)
    ids, mask = chat.render_chat(turns, self.tok, tokens,
                                 default_system_prompt=self.default_system_prompt)
    over_budget = 0
    if self.budget is not None:
      used = np.asarray([len(ids), len(patches), len(grids)], np.int64)
      if (used > self.budget).any():
        costs = [np.zeros((len(v), 3), np.int64) for v in short]
        for (v, f), (p, _, hw) in zip(slots, loaded):
          if v >= 0:
            costs[v][f] = (chat.frame_tokens(self.tok, short[v].timestamps[f],
                                             images_lib.num_image_tokens(hw)), len(p), 1)
        fixed = used - sum(c.sum(axis=0) for c in costs)
        keep, fits = video_lib.fit_frames(costs, [v.timestamps for v in short], fixed,
                                          self.budget)
        if fits:  # else it stays as it is; the packer drops it as oversize and counts it
          kept = [set(k.tolist()) for k in keep]
          loaded = [x for (v, f), x in zip(slots, loaded) if v < 0 or f in kept[v]]
          new = [v.select(k) for v, k in zip(short, keep)]
          over_budget = sum(len(a) - len(b) for a, b in zip(short, new))
          turns = chat.replace_videos(turns, new)
          short = new
          patches, coords, grids, tokens = stack_images(loaded)
          ids, mask = chat.render_chat(turns, self.tok, tokens,
                                       default_system_prompt=self.default_system_prompt)
    example = self._example(ids, mask, patches, coords, grids)
    example['video_stats'] = np.asarray(
        [len(vids), sum(len(v) for v in short), subsampled, over_budget], np.int64)
    return example
