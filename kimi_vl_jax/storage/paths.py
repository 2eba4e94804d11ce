"""One file API over local paths, `s3://bucket/key` (AWS S3 and S3-compatible servers) and
`gs://bucket/key` (Google Cloud Storage), through fsspec (s3fs, gcsfs).

Every module that reads or writes a path the user gives (data sources and their images, the
tokenizer, HF checkpoints, eval files, train checkpoints) goes through here, so a path may be
local or remote anywhere. Local paths take the plain `os` route (no fsspec involved).

Endpoints and credentials come from the usual environment variables, which the clients read:
  S3:  AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for S3-compatible servers, AWS_ACCESS_KEY_ID,
       AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE
  GCS: GOOGLE_APPLICATION_CREDENTIALS; STORAGE_EMULATOR_HOST for an emulator (anonymous access)
or from `config.storage` (`configure`), which sets those variables for this process and the
data-loading processes it starts. Every remote call is retried with backoff (`retry.py`) and
raises `retry.StorageError` (reason missing_object / access_denied / remote_unavailable).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import threading
from typing import Any

from kimi_vl_jax.storage import retry

SCHEMES = ('s3', 'gs')
_ALIASES = {'gcs': 'gs', 's3a': 's3'}

# config.storage field -> environment variable it sets (None: left as the environment has it).
CONFIG_ENV = {
    's3_endpoint_url': 'AWS_ENDPOINT_URL',
    's3_region': 'AWS_REGION',
    'gcs_emulator_host': 'STORAGE_EMULATOR_HOST',
    'cache_dir': 'KIMI_VL_JAX_STORAGE_CACHE_DIR',
    'cache_max_bytes': 'KIMI_VL_JAX_STORAGE_CACHE_MAX_BYTES',
    'block_bytes': 'KIMI_VL_JAX_STORAGE_BLOCK_BYTES',
    'memory_bytes': 'KIMI_VL_JAX_STORAGE_MEMORY_BYTES',
    'retries': 'KIMI_VL_JAX_STORAGE_RETRIES',
    'backoff_s': 'KIMI_VL_JAX_STORAGE_BACKOFF_S',
    'max_backoff_s': 'KIMI_VL_JAX_STORAGE_MAX_BACKOFF_S',
    'timeout_s': 'KIMI_VL_JAX_STORAGE_TIMEOUT_S',
}


def default_config() -> dict:
  """`config.storage`: every field None = the environment's value or the built-in default."""
  return {k: None for k in CONFIG_ENV}


def configure(cfg: Any) -> None:
  """Applies `config.storage` (ConfigDict / dict) by setting the environment variables of
  CONFIG_ENV, so grain worker processes inherit them; fields left None change nothing."""
  if cfg is None:
    return
  d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  unknown = set(d) - set(CONFIG_ENV)
  if unknown:
    raise ValueError(f'config.storage: unknown fields {sorted(unknown)}; known: '
                     f'{sorted(CONFIG_ENV)}')
  for k, v in d.items():
    if v is not None and v != '':
      os.environ[CONFIG_ENV[k]] = str(v)
  _FS.clear()


def scheme(path: str) -> str | None:
  """'s3' / 'gs' for a remote URL, None for a local path."""
  if not isinstance(path, str) or '://' not in path:
    return None
  s = path.split('://', 1)[0].lower()
  s = _ALIASES.get(s, s)
  if s == 'file':
    return None
  if s not in SCHEMES:
    raise ValueError(f'{path!r}: unsupported URL scheme {s!r}; use a local path, s3:// or gs://')
  return s


def is_remote(path: str) -> bool:
  return scheme(path) is not None


def _strip_file(path: str) -> str:
  return path[len('file://'):] if path.startswith('file://') else path


def normalize(path: str) -> str:
  """Remote: `scheme://bucket/key` with the canonical scheme, no trailing slash; local: absolute."""
  s = scheme(path)
  if s is None:
    return os.path.abspath(os.path.expanduser(_strip_file(path)))
  rest = path.split('://', 1)[1].strip('/')
  if not rest:
    raise ValueError(f'{path!r}: no bucket')
  return f'{s}://{posixpath.normpath(rest)}' if '/' in rest else f'{s}://{rest}'


def bucket(url: str) -> str:
  return url.split('://', 1)[1].split('/', 1)[0]


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def dirname(path: str) -> str:
  if is_remote(path):
    url = normalize(path)
    head = posixpath.dirname(url)
    return head if len(head) > len(f'{scheme(url)}://') else url
  return os.path.dirname(os.path.abspath(_strip_file(path)))


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip('/')) if is_remote(path) else os.path.basename(path)


# --------------------------------------------------------------------------------- filesystems

_FS: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def timeout_s() -> float:
  return float(os.environ.get('KIMI_VL_JAX_STORAGE_TIMEOUT_S', 20))


def filesystem(s: str):
  """The fsspec filesystem of scheme `s` ('s3' | 'gs'), one per process and environment.

  Clients get bounded connect / read timeouts and no retries of their own: `retry.call` owns
  retrying, so the total time a call may take is bounded and known.
  """
  env = tuple(os.environ.get(k, '') for k in (
      'AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3', 'AWS_ACCESS_KEY_ID', 'AWS_REGION',
      'STORAGE_EMULATOR_HOST', 'KIMI_VL_JAX_STORAGE_TIMEOUT_S'))
  key = (os.getpid(), s, env)
  with _FS_LOCK:
    fs = _FS.get(key)
    if fs is None:
      fs = _FS[key] = _make_filesystem(s)
    return fs


def _make_filesystem(s: str):
  t = timeout_s()
  if s == 's3':
    import s3fs
    kw: dict[str, Any] = {
        'config_kwargs': {'connect_timeout': t, 'read_timeout': t,
                          'retries': {'max_attempts': 1, 'mode': 'standard'}},
        'skip_instance_cache': True,
    }
    endpoint = os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
    if endpoint:
      kw['endpoint_url'] = endpoint
    region = os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION')
    if region:
      kw['client_kwargs'] = {'region_name': region}
    fs = s3fs.S3FileSystem(**kw)
    fs.retries = 1
    return fs
  # gcsfs.core's client speaks the JSON API only; the package's default class
  # (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT) also calls a gRPC control API, which emulators lack.
  from gcsfs.core import GCSFileSystem
  kw = {'skip_instance_cache': True, 'timeout': t}
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  if emulator:
    # An emulator takes no credentials; without `anon` google-auth would look for some.
    kw.update(token='anon', endpoint_url=emulator if '://' in emulator else f'http://{emulator}')
  return GCSFileSystem(**kw)


def _fs_key(url: str):
  """(filesystem, the key the filesystem names the object by)."""
  url = normalize(url)
  return filesystem(scheme(url)), url.split('://', 1)[1]


def _call(url: str, what: str, fn):
  return retry.call(fn, url, what)


# ---------------------------------------------------------------------------------- operations

def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(_strip_file(path))
  fs, key = _fs_key(path)
  return _call(path, 'exists', lambda: fs.exists(key))


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(_strip_file(path))
  fs, key = _fs_key(path)
  return _call(path, 'isfile', lambda: fs.isfile(key))


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(_strip_file(path))
  fs, key = _fs_key(path)
  return _call(path, 'isdir', lambda: fs.isdir(key))


def info(path: str) -> dict:
  """{'size': bytes, 'version': an ETag / generation string ('' if none)} of a file."""
  if not is_remote(path):
    st = os.stat(_strip_file(path))
    return {'size': st.st_size, 'version': f'{st.st_mtime_ns}'}
  fs, key = _fs_key(path)
  fs.invalidate_cache(key)
  d = _call(path, 'stat', lambda: fs.info(key))
  if d.get('type') == 'directory':
    raise retry.StorageError('missing_object', path, 'is a directory, not a file')
  version = d.get('ETag') or d.get('etag') or d.get('generation') or d.get('md5Hash') or ''
  return {'size': int(d.get('size') or 0), 'version': str(version).strip('"')}


def listdir(path: str) -> list[str]:
  """Names (not paths) of the entries directly under a directory / prefix; [] if none."""
  if not is_remote(path):
    p = _strip_file(path)
    return sorted(os.listdir(p)) if os.path.isdir(p) else []
  fs, key = _fs_key(path)

  def ls():
    fs.invalidate_cache(key)
    try:
      return fs.ls(key, detail=False)
    except FileNotFoundError:
      return []
  return sorted({posixpath.basename(e.rstrip('/')) for e in _call(path, 'list', ls)})


def read_bytes(path: str, start: int | None = None, end: int | None = None) -> bytes:
  """The object's bytes [start, end) (all when both are None)."""
  if not is_remote(path):
    with open(_strip_file(path), 'rb') as f:
      if start:
        f.seek(start)
      return f.read() if end is None else f.read(end - (start or 0))
  fs, key = _fs_key(path)
  data = _call(path, 'read', lambda: fs.cat_file(key, start=start, end=end))
  if start is not None and end is not None and len(data) != end - start:
    raise retry.StorageError('remote_unavailable', path,
                             f'asked for bytes [{start}, {end}), got {len(data)}')
  return data


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file (remote objects appear whole or not at all)."""
  if not is_remote(path):
    p = _strip_file(path)
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    tmp = f'{p}.tmp-{os.getpid()}-{threading.get_ident()}'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, p)
    return
  fs, key = _fs_key(path)
  _call(path, 'write', lambda: fs.pipe_file(key, data))


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def makedirs(path: str) -> None:
  """Local: os.makedirs; remote: nothing (object stores have no directories)."""
  if not is_remote(path):
    os.makedirs(_strip_file(path), exist_ok=True)


def remove(path: str) -> None:
  """Deletes a file or a whole directory / prefix; a missing one is not an error."""
  if not is_remote(path):
    p = _strip_file(path)
    if os.path.isdir(p):
      shutil.rmtree(p, ignore_errors=True)
    elif os.path.exists(p):
      os.remove(p)
    return
  fs, key = _fs_key(path)

  def rm():
    try:
      fs.rm(key, recursive=True)
    except FileNotFoundError:
      pass
  _call(path, 'delete', rm)


def walk_files(path: str) -> list[str]:
  """Paths relative to `path` of every file under it (recursively), sorted."""
  if not is_remote(path):
    root = _strip_file(path)
    out = []
    for d, _, files in os.walk(root):
      out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return sorted(out)
  fs, key = _fs_key(path)

  def find():
    fs.invalidate_cache()
    return fs.find(key)
  found = _call(path, 'list', find)
  return sorted(posixpath.relpath(f, key) for f in found)


def download(url: str, local: str) -> None:
  """Copies one remote file to a local path (atomically: a temporary file renamed)."""
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  tmp = f'{local}.tmp-{os.getpid()}-{threading.get_ident()}'
  fs, key = _fs_key(url)
  try:
    _call(url, 'download', lambda: fs.get_file(key, tmp))
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def upload(local: str, url: str) -> None:
  fs, key = _fs_key(url)
  _call(url, 'upload', lambda: fs.put_file(local, key))


def download_tree(url: str, local: str) -> None:
  """Every file under `url` to the same relative paths under `local`."""
  for rel in walk_files(url):
    download(join(url, rel), os.path.join(local, *rel.split('/')))


def upload_tree(local: str, url: str, skip: tuple[str, ...] = ()) -> None:
  """Every file under the local directory to the same relative keys under `url`, except those
  whose name or top-level directory is in `skip`."""
  for rel in walk_files(local):
    parts = rel.split(os.sep)
    if parts[0] in skip or parts[-1] in skip:
      continue
    upload(os.path.join(local, rel), join(url, *rel.split(os.sep)))


def check_bucket(url: str, what: str) -> None:
  """Raises ValueError naming `what` when the bucket of a remote URL does not exist or cannot
  be listed (a config error, reported at start rather than as skipped records later)."""
  if not is_remote(url):
    return
  url = normalize(url)
  root = f'{scheme(url)}://{bucket(url)}'
  fs, key = _fs_key(root)
  try:
    ok = _call(root, 'bucket check', lambda: fs.exists(key))
  except retry.StorageError as e:
    raise ValueError(f'{what}: cannot reach the bucket of {url!r} ({e.reason}: {e.detail}); '
                     'check the credentials and the endpoint (AWS_ENDPOINT_URL / '
                     'STORAGE_EMULATOR_HOST or config.storage)') from e
  if not ok:
    raise ValueError(f'{what}: the bucket {bucket(url)!r} of {url!r} does not exist')
