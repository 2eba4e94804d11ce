"""Remote byte ranges in cached blocks (moto's S3 server on localhost): every record read is a
cache hit or miss of its blocks, and a block is read from the disk cache and hashed once per
process (the in-memory LRU of verified blocks), not once per record read from it."""

import hashlib

import pytest

from kimi_vl_jax.storage import blocks, cache as cache_lib, paths

BLOCK = 4096


@pytest.fixture
def remote_lines(s3_env, monkeypatch):
  """(url, the records' byte ranges, the object's bytes): 200 lines over 5 blocks."""
  _, bucket = s3_env
  lines = [(f'{{"i": {i}, "text": "{"x" * (60 + i % 40)}"}}\n').encode() for i in range(200)]
  data = b''.join(lines)
  url = f's3://{bucket}/d/records.jsonl'
  paths.write_bytes(url, data)
  ranges, pos = [], 0
  for line in lines:
    ranges.append((pos, pos + len(line)))
    pos += len(line)
  monkeypatch.setattr(blocks, '_MEMORY', {}, raising=False)  # an empty memory
  return url, ranges, data


@pytest.fixture
def hashes(monkeypatch):
  """Counts SHA-256 computations of cache entries (hash verifications and new entries)."""
  count = [0]

  def counting(data):
    count[0] += 1
    return hashlib.sha256(data).hexdigest()
  monkeypatch.setattr(cache_lib, '_digest', counting)
  return count


def test_a_block_is_loaded_and_hashed_once_per_process(remote_lines, hashes, tmp_path):
  url, ranges, data = remote_lines
  cache = cache_lib.ReadCache(str(tmp_path / 'c'), 10**8)
  reader = blocks.BlockReader(url, cache, block_bytes=BLOCK)
  n_blocks = reader.num_blocks()
  assert n_blocks == -(-len(data) // BLOCK) >= 5
  hits = misses = 0
  for _ in range(3):                      # every record, three times
    for start, end in ranges:
      got, h, m = reader.read(start, end)
      assert got == data[start:end]
      hits, misses = hits + h, misses + m
  assert misses == n_blocks               # each block fetched once ...
  assert hits > 3 * len(ranges) - n_blocks  # ... every other block read a hit (memory or disk)
  assert cache.counters['misses'] == n_blocks and cache.counters['hits'] == 0
  assert hashes[0] == n_blocks            # one checksum per block written, none per read

  # Another process (an empty memory) with the blocks on disk: each is verified once.
  blocks._MEMORY.clear()
  hashes[0] = 0
  reader = blocks.BlockReader(url, cache, block_bytes=BLOCK)
  for start, end in ranges:
    assert reader.read(start, end)[0] == data[start:end]
  assert hashes[0] == n_blocks and cache.counters['hits'] == n_blocks
  assert cache.counters['misses'] == n_blocks   # nothing fetched again


def test_memory_of_verified_blocks_is_bounded_lru(remote_lines, hashes, tmp_path, monkeypatch):
  url, ranges, data = remote_lines
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_MEMORY_BYTES', str(2 * BLOCK))
  cache = cache_lib.ReadCache(str(tmp_path / 'c'), 10**8)
  reader = blocks.BlockReader(url, cache, block_bytes=BLOCK)
  for k in range(reader.num_blocks()):
    reader.block(k)
  memory = blocks.memory_blocks()
  assert len(memory) == 2 and memory.size <= 2 * BLOCK
  hashes[0] = 0
  last = reader.num_blocks() - 1
  reader.block(last - 1)
  reader.block(last)                       # the two newest: in memory
  assert hashes[0] == 0
  reader.block(0)                          # evicted long ago: from disk, verified again
  assert hashes[0] == 1 and cache.counters['hits'] == 1
  reader.block(last)                       # still in memory (used more recently than last - 1)
  reader.block(0)
  assert hashes[0] == 1
  reader.block(last - 1)                   # the least recently used was evicted by block 0
  assert hashes[0] == 2


def test_memory_off_reads_the_disk_cache_each_time(remote_lines, hashes, tmp_path, monkeypatch):
  url, ranges, _ = remote_lines
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_MEMORY_BYTES', '0')
  cache = cache_lib.ReadCache(str(tmp_path / 'c'), 10**8)
  reader = blocks.BlockReader(url, cache, block_bytes=BLOCK)
  for start, end in ranges[:10]:
    reader.read(start, end)
  assert len(blocks.memory_blocks()) == 0
  assert cache.counters['hits'] + cache.counters['misses'] == 10
