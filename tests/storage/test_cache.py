"""The read-through cache: hits and misses, checksum verification (a corrupt entry is fetched
again), a bounded size with LRU eviction that spares pinned files, several processes at once."""

import multiprocessing
import os

import numpy as np

from kimi_vl_jax.storage.cache import ReadCache


def _fetcher(calls):
  def fetch_of(key):
    def fetch():
      calls.append(key)
      return (key * 100).encode()
    return fetch
  return fetch_of


def test_hit_after_miss_and_corrupt_entry_is_refetched(tmp_path):
  cache, calls = ReadCache(str(tmp_path), 10**6), []
  fetch = _fetcher(calls)
  assert cache.get('a', fetch('a')) == (b'a' * 100, False)
  assert cache.get('a', fetch('a')) == (b'a' * 100, True)
  assert calls == ['a']
  data_path, _ = cache._paths('a')
  with open(data_path, 'r+b') as f:   # flip one byte on disk
    f.seek(10)
    f.write(b'X')
  assert cache.get('a', fetch('a')) == (b'a' * 100, False)
  assert calls == ['a', 'a']
  assert cache.counters['corrupt'] == 1
  assert cache.counters['hits'] == 1 and cache.counters['misses'] == 2


def test_size_is_bounded_and_eviction_is_lru(tmp_path):
  cache = ReadCache(str(tmp_path), 1000)
  fetch = _fetcher([])
  for k in 'abcdefgh':                 # 100 bytes each
    cache.get(k, fetch(k))
    cache.get('a', fetch('a'))         # 'a' stays the most recently used
  cache.evict()
  assert cache.usage() <= 1000
  for k in 'abcdefghijklmnop':
    cache.get(k, fetch(k))
    cache.get('a', fetch('a'))
  assert cache.usage() <= 1000 + 100 * 1000 // 16 // 100 * 100  # checked every max/16 bytes
  cache.evict()
  assert cache.usage() <= 1000 and cache.counters['evictions'] > 0
  assert cache.get('a', fetch('a'))[1]            # the recently used entry survived
  assert not cache.get('b', fetch('b'))[1]        # an old one was evicted


def test_pinned_file_is_not_evicted(tmp_path):
  cache = ReadCache(str(tmp_path), 500)

  def write(tmp):
    with open(tmp, 'wb') as f:
      f.write(b'p' * 400)
  path, pin, hit = cache.get_file('big', write)
  assert not hit and open(path, 'rb').read() == b'p' * 400
  fetch = _fetcher([])
  for k in 'abcd':
    cache.get(k, fetch(k))
  cache.evict()
  assert os.path.exists(path)          # pinned: kept although it is the oldest
  pin.close()
  for k in 'efg':
    cache.get(k, fetch(k))
  cache.evict()
  assert not os.path.exists(path)


def _hammer(args):
  directory, seed = args
  cache = ReadCache(directory, 3000)
  rng = np.random.default_rng(seed)
  bad = 0
  for k in rng.integers(0, 40, 300):
    key = f'k{k}'
    data, _ = cache.get(key, lambda: (key * 50).encode())
    bad += data != (key * 50).encode()
  return bad, dict(cache.counters)


def test_several_processes_share_one_directory(tmp_path):
  with multiprocessing.get_context('spawn').Pool(3) as pool:
    results = pool.map(_hammer, [(str(tmp_path), s) for s in range(3)])
  assert sum(b for b, _ in results) == 0
  assert all(c['hits'] > 0 and c['misses'] > 0 for _, c in results)
  cache = ReadCache(str(tmp_path), 3000)
  cache.evict()
  assert cache.usage() <= 3000
  leftovers = [n for d, _, fs in os.walk(tmp_path) for n in fs if '.tmp-' in n]
  assert not leftovers
