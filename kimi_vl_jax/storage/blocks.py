"""Byte ranges of a remote object read in fixed blocks through the cache (`cache.py`).

A large remote JSONL / text file is read as blocks of `block_bytes` (default 4 MiB, env
KIMI_VL_JAX_STORAGE_BLOCK_BYTES / `config.storage.block_bytes`), each one cache entry keyed by
(URL, object version, block index): a record is a range inside one or two blocks, so a
random-access read costs at most two cached block reads, and a changed object never mixes with
its old blocks. Local files are read directly (no cache).

Blocks a process has read (fetched, or loaded from the cache and checked against their SHA-256)
stay in that process's memory in a bounded LRU (`memory_bytes`, default 128 MiB, env
KIMI_VL_JAX_STORAGE_MEMORY_BYTES / `config.storage.memory_bytes`; 0 = off): a block is read
from disk and hashed once per process, not once per record read from it (about 185 records of
one 8K row come from the same few blocks). A memory hit counts as a cache hit.
"""

from __future__ import annotations

import collections
import os
import threading

from kimi_vl_jax.storage import cache as cache_lib
from kimi_vl_jax.storage import paths
from kimi_vl_jax.storage import retry

DEFAULT_BLOCK_BYTES = 4 * 2**20
DEFAULT_MEMORY_BYTES = 128 * 2**20


def default_block_bytes() -> int:
  return int(float(os.environ.get('KIMI_VL_JAX_STORAGE_BLOCK_BYTES', DEFAULT_BLOCK_BYTES)))


def default_memory_bytes() -> int:
  return int(float(os.environ.get('KIMI_VL_JAX_STORAGE_MEMORY_BYTES', DEFAULT_MEMORY_BYTES)))


class VerifiedBlocks:
  """A bounded LRU of verified block bytes (thread-safe; one per process and budget)."""

  def __init__(self, max_bytes: int):
    self.max_bytes = int(max_bytes)
    self.size = 0
    self._blocks: collections.OrderedDict[str, bytes] = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key: str) -> bytes | None:
    with self._lock:
      data = self._blocks.get(key)
      if data is not None:
        self._blocks.move_to_end(key)
      return data

  def put(self, key: str, data: bytes) -> None:
    if len(data) > self.max_bytes:
      return
    with self._lock:
      old = self._blocks.pop(key, None)
      self.size -= len(old) if old is not None else 0
      self._blocks[key] = data
      self.size += len(data)
      while self.size > self.max_bytes:
        _, dropped = self._blocks.popitem(last=False)
        self.size -= len(dropped)

  def __len__(self) -> int:
    return len(self._blocks)


_MEMORY: dict[tuple, VerifiedBlocks] = {}


def memory_blocks() -> VerifiedBlocks:
  """This process's in-memory LRU of verified blocks, at the current environment's budget."""
  key = (os.getpid(), default_memory_bytes())
  if key not in _MEMORY:
    _MEMORY[key] = VerifiedBlocks(key[1])
  return _MEMORY[key]


class BlockReader:
  """Random access to the bytes of one remote object; picklable (grain workers).

  `read(start, end)` -> (bytes, cache hits, cache misses) of the blocks it touched (a block
  found in the process's memory LRU is a hit).
  """

  def __init__(self, url: str, cache: cache_lib.ReadCache | None = None,
               block_bytes: int | None = None):
    self.url = paths.normalize(url)
    meta = paths.info(self.url)
    self.size, self.version = meta['size'], meta['version']
    self.block_bytes = int(block_bytes or default_block_bytes())
    self.cache = cache or cache_lib.default_cache()

  def num_blocks(self) -> int:
    return -(-self.size // self.block_bytes)

  def block(self, k: int) -> tuple[bytes, bool]:
    """(bytes of block k, hit)."""
    start = k * self.block_bytes
    end = min(self.size, start + self.block_bytes)
    key = f'{self.url}@{self.version}#{self.block_bytes}:{k}'
    memory = memory_blocks()
    data = memory.get(key)
    if data is not None:
      return data, True
    data, hit = self.cache.get(key, lambda: paths.read_bytes(self.url, start, end))
    if len(data) != end - start:
      raise retry.StorageError('remote_unavailable', self.url,
                               f'block {k}: {len(data)} bytes instead of {end - start}')
    memory.put(key, data)
    return data, hit

  def read(self, start: int, end: int) -> tuple[bytes, int, int]:
    first, last = start // self.block_bytes, (max(start, end - 1)) // self.block_bytes
    parts, hits, misses = [], 0, 0
    for k in range(first, last + 1):
      data, hit = self.block(k)
      hits, misses = hits + hit, misses + (not hit)
      lo = start - k * self.block_bytes if k == first else 0
      hi = end - k * self.block_bytes if k == last else len(data)
      parts.append(data[lo:hi])
    return b''.join(parts), hits, misses
