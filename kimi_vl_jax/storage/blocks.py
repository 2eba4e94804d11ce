"""Byte ranges of a remote object read in fixed blocks through the cache (`cache.py`).

A large remote JSONL / text file is read as blocks of `block_bytes` (default 4 MiB, env
KIMI_VL_JAX_STORAGE_BLOCK_BYTES / `config.storage.block_bytes`), each one cache entry keyed by
(URL, object version, block index): a record is a range inside one or two blocks, so a
random-access read costs at most two cached block reads, and a changed object never mixes with
its old blocks. Local files are read directly (no cache).
"""

from __future__ import annotations

import os

from kimi_vl_jax.storage import cache as cache_lib
from kimi_vl_jax.storage import paths
from kimi_vl_jax.storage import retry

DEFAULT_BLOCK_BYTES = 4 * 2**20


def default_block_bytes() -> int:
  return int(float(os.environ.get('KIMI_VL_JAX_STORAGE_BLOCK_BYTES', DEFAULT_BLOCK_BYTES)))


class BlockReader:
  """Random access to the bytes of one remote object; picklable (grain workers).

  `read(start, end)` -> (bytes, cache hits, cache misses) of the blocks it touched.
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
    data, hit = self.cache.get(key, lambda: paths.read_bytes(self.url, start, end))
    if len(data) != end - start:
      raise retry.StorageError('remote_unavailable', self.url,
                               f'block {k}: {len(data)} bytes instead of {end - start}')
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
