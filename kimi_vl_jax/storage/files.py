"""Remote files and directories as local ones, for readers that need a local path (SentencePiece,
tiktoken, ArrayRecord, memory-mapped safetensors) and writers that produce a directory.

  fetch_file(path)            -> (local path, pin): a whole object through the read cache
  fetch_tree(url, kind)       -> a local copy of a directory (staging area, outside the cache
                                 budget: HF checkpoints are larger than a sensible cache)
  publish_tree(local, url)    uploads a local directory (files first, then `marker` if given)

Local paths pass through unchanged.
"""

from __future__ import annotations

import hashlib
import os

from kimi_vl_jax.storage import cache as cache_lib
from kimi_vl_jax.storage import paths


def staging_dir(url: str, kind: str) -> str:
  """A local directory that belongs to one remote URL:
  `<cache dir>/staging/<kind>/<hash>-<name>`."""
  url = paths.normalize(url)
  h = hashlib.sha256(url.encode()).hexdigest()[:16]
  return os.path.join(cache_lib.default_dir(), 'staging', kind, f'{h}-{paths.basename(url)}')


def fetch_file(path: str, cache: cache_lib.ReadCache | None = None):
  """(local path, pin or None). A remote object is fetched into the read cache (keyed by its
  URL and version) and pinned there until `pin.close()`."""
  if not paths.is_remote(path):
    return path, None
  url = paths.normalize(path)
  version = paths.info(url)['version']
  cache = cache or cache_lib.default_cache()
  local, pin, _ = cache.get_file(f'file:{url}@{version}', lambda tmp: paths.download(url, tmp))
  return local, pin


def fetch_tree(url: str, kind: str, local: str | None = None) -> str:
  """Downloads every file under `url` that the local copy lacks or holds at another size;
  returns the local directory. Files removed remotely are removed locally."""
  if not paths.is_remote(url):
    return url
  local = local or staging_dir(url, kind)
  os.makedirs(local, exist_ok=True)
  remote_files = paths.walk_files(url)
  if not remote_files:
    raise FileNotFoundError(f'{url!r}: no files there')
  for rel in remote_files:
    src = paths.join(url, rel)
    dst = os.path.join(local, *rel.split('/'))
    if not (os.path.isfile(dst) and os.path.getsize(dst) == paths.info(src)['size']):
      paths.download(src, dst)
  keep = {os.path.join(*r.split('/')) for r in remote_files}
  for rel in paths.walk_files(local):
    if rel not in keep:
      os.remove(os.path.join(local, rel))
  return local


def publish_tree(local: str, url: str, marker: str | None = None) -> None:
  """Uploads the local directory under `url`; the top-level file `marker` (its local copy if
  there is one, e.g. orbax's own commit file, else a small text) is uploaded last, so a reader
  that waits for it never sees a partial upload."""
  for rel in paths.walk_files(local):
    if rel != marker:
      paths.upload(os.path.join(local, rel), paths.join(url, *rel.split(os.sep)))
  if marker:
    if os.path.isfile(os.path.join(local, marker)):
      paths.upload(os.path.join(local, marker), paths.join(url, marker))
    else:
      paths.write_text(paths.join(url, marker), 'complete\n')
