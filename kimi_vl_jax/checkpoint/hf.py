"""HF checkpoint import / export for Kimi-VL.

    from kimi_vl_jax.checkpoint import hf
    config, params = hf.load('/path/to/Kimi-VL-A3B-Instruct')
    hf.save(config, params, '/path/to/out')       # the same layout back; load(save(x)) == x
    # Straight into sharded jax.Arrays: each process reads only its devices' slices.
    config, params = hf.load(path, shardings=param_shardings)

`load` reads `config.json` and `*.safetensors` (one file, or shards listed by
`model.safetensors.index.json`) by slice, parameter by parameter, into the scanned parameter layout
(no PyTorch involved). All key / shape logic lives in `hf_mapping.py`.

Both take local paths or `s3://` / `gs://` URLs (kimi_vl_jax/storage): a remote checkpoint is
downloaded once into a local staging directory (safetensors are memory-mapped), and `save`
writes locally, then uploads the files with `config.json` last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kimi_vl_jax.checkpoint import hf_mapping
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.storage import files as storage_files
from kimi_vl_jax.storage import paths as storage_paths

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'


@dataclasses.dataclass
class ReadStats:
  """What a load read from the checkpoint files (bytes in the files' dtype)."""
  bytes_read: int = 0
  reads: int = 0
  bytes_by_param: dict[str, int] = dataclasses.field(default_factory=dict)
  largest_block_bytes: int = 0   # the largest parameter block held on the host at once


class SafetensorsReader:
  """Slice access (`hf_mapping.TensorSource`) to one or many safetensors files (memory-mapped:
  only the requested ranges are copied out). Counts what it reads into `stats`."""

  def __init__(self, directory: str, stats: ReadStats | None = None):
    self.stats = stats if stats is not None else ReadStats()
    self.param = ''  # the parameter being read, for `stats.bytes_by_param`
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
      self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
      for path in sorted(set(self._file_of.values())):
        if not os.path.exists(path):
          raise FileNotFoundError(f'{INDEX_FILE} lists {os.path.basename(path)}, which is missing')
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
      if not files:
        raise FileNotFoundError(f'no *.safetensors files in {directory}')
      self._file_of = {}
      for name in files:
        path = os.path.join(directory, name)
        with safe_open(path, framework='numpy') as f:
          for key in f.keys():
            if key in self._file_of:
              raise ValueError(f'tensor {key} appears in both {self._file_of[key]} and {path}')
            self._file_of[key] = path
    self._handles: dict[str, object] = {}

  def keys(self):
    return self._file_of.keys()

  def _handle(self, key: str):
    path = self._file_of[key]
    if path not in self._handles:
      self._handles[path] = safe_open(path, framework='numpy')
    return self._handles[path]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(key).get_shape())

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    value = self._handle(key).get_slice(key)[index]
    self.stats.bytes_read += value.nbytes
    self.stats.reads += 1
    by_param = self.stats.bytes_by_param
    by_param[self.param] = by_param.get(self.param, 0) + value.nbytes
    return value

  def close(self):
    self._handles.clear()


def load(path: str, *, dtype=None, include_vision: bool = True, shardings=None,
         stats: ReadStats | None = None, **config_overrides) -> tuple[KimiVLConfig, dict]:
  """Reads an HF Kimi-VL directory. Returns (config, params) with params a nested dict in the
  layout of docs/param_tree.md, in `dtype` (default: the config's `param_dtype`).

  Without `shardings` the leaves are host numpy arrays. With `shardings` (a tree of the params'
  structure whose leaves are `jax.sharding.Sharding`s, or ShapeDtypeStructs carrying one, whose
  shapes are then checked first) they are `jax.Array`s placed accordingly: every process reads
  from the files only the blocks its own devices hold, each distinct block once, and holds one
  block on the host at a time (the cast to `dtype` happens per block). `stats` (a ReadStats)
  receives what was read.

  `config_overrides` replace fields of the built KimiVLConfig (e.g. `dtype='bfloat16'`).
  Raises `hf_mapping.CheckpointMismatch` naming the key and both shapes when a tensor is missing,
  unexpected or mis-shaped.
  """
  path = storage_files.fetch_tree(path, 'hf') if storage_paths.is_remote(path) else path
  config = config_lib.from_hf_json(path, **config_overrides)
  reader = SafetensorsReader(path, stats)
  try:
    leaves = hf_mapping.plan(reader, config, include_vision, dtype)
    placed = _shardings_by_path(shardings, leaves) if shardings is not None else {}
    out = {}
    for p, leaf in leaves.items():
      reader.param = '/'.join(p)
      if p in placed:
        out[p] = _sharded_leaf(leaf, placed[p], reader)
      else:
        out[p] = _block(leaf, (slice(None),) * len(leaf.shape), reader)
  finally:
    reader.close()
  return config, hf_mapping.unflatten(out)


def _block(leaf: hf_mapping.Leaf, index: tuple[slice, ...], reader: SafetensorsReader
           ) -> np.ndarray:
  value = hf_mapping.read_block(leaf, index, reader)
  reader.stats.largest_block_bytes = max(reader.stats.largest_block_bytes, value.nbytes)
  return value


def _shardings_by_path(shardings, leaves) -> dict[tuple[str, ...], Any]:
  """{param path: Sharding}; leaves of `shardings` may be ShapeDtypeStructs, whose shapes must
  then equal the checkpoint's (checked before anything is read)."""
  flat = hf_mapping.flatten(_params_dict(shardings))
  if flat.keys() != leaves.keys():
    raise ValueError('load(shardings=...): the sharding tree does not match the checkpoint\'s '
                     f'parameters: missing {sorted(leaves.keys() - flat.keys())[:5]}, unexpected '
                     f'{sorted(flat.keys() - leaves.keys())[:5]} (check include_vision)')
  bad = [f'{"/".join(p)}: checkpoint {leaves[p].shape} vs target {tuple(x.shape)}'
         for p, x in flat.items() if hasattr(x, 'shape') and tuple(x.shape) != leaves[p].shape]
  if bad:
    raise ValueError('load(shardings=...): the checkpoint\'s shapes differ from the target\'s '
                     '(the model config differs from the checkpoint\'s config.json): '
                     + '; '.join(bad[:5]))
  return {p: getattr(x, 'sharding', x) for p, x in flat.items()}


def _sharded_leaf(leaf: hf_mapping.Leaf, sharding, reader: SafetensorsReader):
  """One parameter as a jax.Array with `sharding`: each distinct block of this process's devices
  is read once, copied to the devices that hold it, and dropped before the next is read."""
  import jax
  blocks: dict[tuple, tuple[tuple[slice, ...], list]] = {}
  for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
    norm = tuple(s.indices(n)[:2] for s, n in zip(index, leaf.shape))
    blocks.setdefault(norm, (index, []))[1].append(device)
  arrays = []
  for index, devices in blocks.values():
    value = _block(leaf, index, reader)
    placed = [jax.device_put(value, d) for d in devices]
    jax.block_until_ready(placed)   # the host copy is free once the transfers are done
    arrays += placed
    del value
  return jax.make_array_from_single_device_arrays(leaf.shape, sharding, arrays)


def _shards(tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int):
  shard, size = {}, 0
  for key, value in tensors:
    if shard and size + value.nbytes > max_shard_bytes:
      yield shard
      shard, size = {}, 0
    shard[key] = value
    size += value.nbytes
  if shard:
    yield shard


def save(config: KimiVLConfig, params, path: str, *, dtype=None, include_vision: bool = True,
         max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `config.json` and safetensors in the HF Kimi-VL layout (sharded with an index when
  larger than `max_shard_bytes`). Tensors keep the params' dtype unless `dtype` is given.
  A remote `path` is written through a temporary local directory."""
  if storage_paths.is_remote(path):
    storage_paths.check_bucket(path, 'hf.save')
    with tempfile.TemporaryDirectory(prefix='hf-save-') as tmp:
      save(config, params, tmp, dtype=dtype, include_vision=include_vision,
           max_shard_bytes=max_shard_bytes)
      storage_paths.remove(path)
      storage_paths.upload_tree(tmp, path, skip=('config.json',))
      storage_paths.upload(os.path.join(tmp, 'config.json'),
                           storage_paths.join(path, 'config.json'))
    return
  os.makedirs(path, exist_ok=True)
  params = _to_numpy_tree(params)

  def tensors():
    for key, value in hf_mapping.params_to_hf(params, config, include_vision):
      yield key, value.astype(dtype) if dtype is not None else value

  written, weight_map = [], {}
  for i, shard in enumerate(_shards(tensors(), max_shard_bytes)):
    name = f'model-{i + 1:05d}.safetensors'
    save_file(shard, os.path.join(path, name), metadata={'format': 'pt'})
    written.append(name)
    weight_map.update({k: name for k in shard})
  if len(written) == 1:
    os.replace(os.path.join(path, written[0]), os.path.join(path, SINGLE_FILE))
  else:
    total = sum(os.path.getsize(os.path.join(path, n)) for n in written)
    for i, name in enumerate(written):
      final = f'model-{i + 1:05d}-of-{len(written):05d}.safetensors'
      os.replace(os.path.join(path, name), os.path.join(path, final))
      weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    with open(os.path.join(path, INDEX_FILE), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config_lib.to_hf_dict(config), f, indent=2)


def _params_dict(tree) -> dict:
  """The bare params dict of a tree that may be flax-boxed or wrapped as {'params': ...}."""
  import flax.linen as nn
  tree = nn.meta.unbox(tree)
  return tree['params'] if 'params' in tree and len(tree) == 1 else tree


def _to_numpy_tree(params) -> dict:
  """Unboxes flax metadata and moves arrays to host numpy (one leaf at a time)."""
  import jax
  return jax.tree.map(np.asarray, _params_dict(params))
