"""A read-through local cache for remote objects: bounded size, LRU eviction, checksummed.

    cache = ReadCache()                             # directory / size from config.storage or env
    data, hit = cache.get(key, fetch)               # bytes; fetch() runs only on a miss
    path, hit = cache.get_file(url)                 # a whole object as a local file (pinned)

Layout: `<dir>/<h[:2]>/<h>.bin` (the bytes) and `<h>.sum` (their SHA-256 and length), `h` the
SHA-256 of the key. Both are written to a temporary name and renamed into place, the checksum
first, so a reader never sees a half-written entry. Every read verifies the checksum; an entry
that does not match (a disk error, a crash between the two renames, another process's
different bytes for the same key) is deleted and fetched again (`corrupt` in the counters).

LRU: a hit sets the entry's mtime; when this process has added more than 1/16 of the budget
since its last check, it takes `<dir>/.evict.lock` (flock; a process that finds it taken skips)
and deletes the least recently used entries until the directory is under 90% of `max_bytes`.
Entries handed out by `get_file` are pinned by a shared flock on their file while their `Pin`
lives and are never evicted then. Several threads and processes may share one directory:
duplicate fetches of a key write the same bytes, renames are atomic, eviction is serialised.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 * 2**30
LOW_WATERMARK = 0.9


def default_dir() -> str:
  env = os.environ.get('KIMI_VL_JAX_STORAGE_CACHE_DIR')
  if env:
    return env
  base = os.environ.get('KIMI_VL_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                              'kimi_vl_jax')
  return os.path.join(base, 'remote')


def default_max_bytes() -> int:
  return int(float(os.environ.get('KIMI_VL_JAX_STORAGE_CACHE_MAX_BYTES', DEFAULT_MAX_BYTES)))


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _file_digest(path: str) -> tuple[str, int]:
  h, n = hashlib.sha256(), 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
      n += len(chunk)
  return h.hexdigest(), n


class Pin:
  """Holds a shared flock on a cache file so eviction leaves it alone; `close()` releases."""

  def __init__(self, path: str):
    self.path = path
    self._fd = None
    self._fd = os.open(path, os.O_RDONLY)
    fcntl.flock(self._fd, fcntl.LOCK_SH)

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    self.close()


class ReadCache:
  """See the module docstring. Picklable (counters restart at zero in another process)."""

  def __init__(self, directory: str | None = None, max_bytes: int | None = None):
    self.directory = os.path.abspath(directory or default_dir())
    self.max_bytes = int(max_bytes if max_bytes is not None else default_max_bytes())
    if self.max_bytes < 1:
      raise ValueError(f'storage cache: max_bytes must be >= 1, got {self.max_bytes}')
    os.makedirs(self.directory, exist_ok=True)
    self._init_local()

  def _init_local(self):
    self._lock = threading.Lock()
    self.counters = collections.Counter()
    self._added_since_check = self.max_bytes  # check the budget on the first insert

  def __getstate__(self):
    return {'directory': self.directory, 'max_bytes': self.max_bytes}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_local()

  def _paths(self, key: str) -> tuple[str, str]:
    h = hashlib.sha256(key.encode('utf-8')).hexdigest()
    d = os.path.join(self.directory, h[:2])
    return os.path.join(d, h + '.bin'), os.path.join(d, h + '.sum')

  def _count(self, name: str, n: int = 1):
    with self._lock:
      self.counters[name] += n

  # ------------------------------------------------------------------------------------ reads

  def _read_verified(self, key: str) -> bytes | None:
    data_path, sum_path = self._paths(key)
    try:
      with open(data_path, 'rb') as f:
        data = f.read()
      with open(sum_path) as f:
        want = f.read().split()
    except FileNotFoundError:
      return None
    if len(want) != 2 or want[0] != _digest(data) or int(want[1]) != len(data):
      self._drop_corrupt(key, data_path, sum_path)
      return None
    _touch(data_path)
    return data

  def _drop_corrupt(self, key, data_path, sum_path):
    log.warning('storage cache: entry of %s fails its checksum; fetching it again', key)
    self._count('corrupt')
    for p in (data_path, sum_path):
      try:
        os.remove(p)
      except FileNotFoundError:
        pass

  def get(self, key: str, fetch: Callable[[], bytes]) -> tuple[bytes, bool]:
    """(bytes of `key`, whether they came from the cache). On a miss `fetch()` supplies them
    (its exceptions propagate; nothing is cached then)."""
    data = self._read_verified(key)
    if data is not None:
      self._count('hits')
      return data, True
    self._count('misses')
    data = fetch()
    self._count('bytes_fetched', len(data))
    self._put_bytes(key, data)
    return data, False

  def get_file(self, key: str, fetch_to: Callable[[str], None]) -> tuple[str, Pin, bool]:
    """(local path, pin, hit) of a whole object; on a miss `fetch_to(tmp_path)` writes it.
    The file is verified against its checksum once per call; keep `pin` open while using it."""
    data_path, sum_path = self._paths(key)
    for _ in range(2):
      try:
        pin = Pin(data_path)
      except FileNotFoundError:
        break
      try:
        with open(sum_path) as f:
          want = f.read().split()
      except FileNotFoundError:
        want = []
      if len(want) == 2 and (want[0], int(want[1])) == _file_digest(data_path):
        _touch(data_path)
        self._count('hits')
        return data_path, pin, True
      pin.close()
      self._drop_corrupt(key, data_path, sum_path)
    self._count('misses')
    os.makedirs(os.path.dirname(data_path), exist_ok=True)
    tmp = self._tmp(data_path)
    try:
      fetch_to(tmp)
      digest, size = _file_digest(tmp)
      self._write_atomic(sum_path, f'{digest} {size}\n'.encode())
      os.replace(tmp, data_path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    self._count('bytes_fetched', size)
    pin = Pin(data_path)
    self._added(size)
    return data_path, pin, False

  # ----------------------------------------------------------------------------------- writes

  @staticmethod
  def _tmp(path: str) -> str:
    return f'{path}.tmp-{os.getpid()}-{threading.get_ident()}'

  def _write_atomic(self, path: str, data: bytes):
    tmp = self._tmp(path)
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)

  def _put_bytes(self, key: str, data: bytes):
    data_path, sum_path = self._paths(key)
    try:
      os.makedirs(os.path.dirname(data_path), exist_ok=True)
      self._write_atomic(sum_path, f'{_digest(data)} {len(data)}\n'.encode())
      self._write_atomic(data_path, data)
    except OSError as e:  # a full or read-only cache disk costs speed, not data
      log.warning('storage cache: could not store %s (%s)', key, e)
      return
    self._added(len(data))

  def _added(self, n: int):
    with self._lock:
      self._added_since_check += n
      due = self._added_since_check >= self.max_bytes // 16
      if due:
        self._added_since_check = 0
    if due:
      self.evict()

  # --------------------------------------------------------------------------------- eviction

  def usage(self) -> int:
    """Bytes of cached objects in the directory (all processes)."""
    return sum(size for _, size, _ in self._entries())

  def _entries(self):
    out = []
    for sub in os.listdir(self.directory):
      d = os.path.join(self.directory, sub)
      if len(sub) != 2 or not os.path.isdir(d):
        continue
      for name in os.listdir(d):
        if name.endswith('.bin'):
          p = os.path.join(d, name)
          try:
            st = os.stat(p)
          except FileNotFoundError:
            continue
          out.append((p, st.st_size, st.st_mtime_ns))
    return out

  def evict(self) -> int:
    """Deletes least recently used, unpinned entries until usage <= 90% of max_bytes (when it
    is above max_bytes). Returns how many entries were deleted."""
    lock_path = os.path.join(self.directory, '.evict.lock')
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        return 0  # another process is evicting
      entries = self._entries()
      total = sum(s for _, s, _ in entries)
      if total <= self.max_bytes:
        return 0
      target = int(self.max_bytes * LOW_WATERMARK)
      removed = 0
      for path, size, _ in sorted(entries, key=lambda e: e[2]):
        if total <= target:
          break
        if _remove_unless_pinned(path):
          total -= size
          removed += 1
      self._count('evictions', removed)
      return removed
    finally:
      os.close(fd)


def _touch(path: str):
  try:
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
  except OSError:
    pass


def _remove_unless_pinned(path: str) -> bool:
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return False  # pinned by a reader
    for p in (path, path[:-len('.bin')] + '.sum'):
      try:
        os.remove(p)
      except FileNotFoundError:
        pass
    return True
  finally:
    os.close(fd)


_DEFAULT: dict[tuple, ReadCache] = {}


def default_cache() -> ReadCache:
  """The process's cache for the directory and budget of the current environment."""
  key = (os.getpid(), default_dir(), default_max_bytes())
  if key not in _DEFAULT:
    _DEFAULT[key] = ReadCache(key[1], key[2])
  return _DEFAULT[key]
