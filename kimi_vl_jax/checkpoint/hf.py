"""HF checkpoint import / export for Kimi-VL.

    from kimi_vl_jax.checkpoint import hf
    config, params = hf.load('/path/to/Kimi-VL-A3B-Instruct')
    hf.save(config, params, '/path/to/out')       # the same layout back; load(save(x)) == x

`load` reads `config.json` and `*.safetensors` (one file, or shards listed by
`model.safetensors.index.json`), streaming tensor by tensor into the scanned parameter layout
(no PyTorch involved). All key / shape logic lives in `hf_mapping.py`.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kimi_vl_jax.checkpoint import hf_mapping
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.config import KimiVLConfig

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'


class SafetensorsReader:
  """A lazy {key: np.ndarray} view over one or many safetensors files."""

  def __init__(self, directory: str):
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

  def __getitem__(self, key: str) -> np.ndarray:
    path = self._file_of[key]
    if path not in self._handles:
      self._handles[path] = safe_open(path, framework='numpy')
    return self._handles[path].get_tensor(key)

  def close(self):
    self._handles.clear()


def load(path: str, *, dtype=None, include_vision: bool = True, **config_overrides
         ) -> tuple[KimiVLConfig, dict]:
  """Reads an HF Kimi-VL directory. Returns (config, params) with params a nested dict of numpy
  arrays in the layout of docs/param_tree.md, in `dtype` (default: the config's `param_dtype`).

  `config_overrides` replace fields of the built KimiVLConfig (e.g. `dtype='bfloat16'`).
  Raises `hf_mapping.CheckpointMismatch` naming the key and both shapes when a tensor is missing,
  unexpected or mis-shaped.
  """
  config = config_lib.from_hf_json(path, **config_overrides)
  reader = SafetensorsReader(path)
  try:
    params = hf_mapping.hf_to_params(reader, config, include_vision=include_vision, dtype=dtype)
  finally:
    reader.close()
  return config, params


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
  larger than `max_shard_bytes`). Tensors keep the params' dtype unless `dtype` is given."""
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


def _to_numpy_tree(params) -> dict:
  """Unboxes flax metadata and moves arrays to host numpy (one leaf at a time)."""
  import flax.linen as nn
  import jax
  params = nn.meta.unbox(params)
  if 'params' in params and len(params) == 1:
    params = params['params']
  return jax.tree.map(np.asarray, params)
