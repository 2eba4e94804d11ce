"""JSONL files that configure a run, read whole at start: benchmark files (evaluation/),
RL prompt sets (rl/), eval answer files (train/evaluate.py). Local, `s3://` or `gs://`.

    records = jsonl.read(path, parse, limit=100, what='benchmark file')

`parse(record, line)` turns each non-blank line's JSON object into what the caller keeps. A
remote file is fetched whole into the read cache (`files.fetch_file`: keyed by its URL and
version, checksummed, pinned while it is read), so reading it again is a cache hit.

Bad input stops the caller at start, naming the file and the 1-based line: a missing file
(FileNotFoundError), a line that is not UTF-8, not JSON (a cut-off last line included) or not a
JSON object, and any exception of the `errors` types that `parse` raises (ValueError). Such a
file is configuration: skipping a line would change the benchmark or prompt set silently.
(Training data is read by data/sources.py instead, which skips and counts bad records.)
"""

from __future__ import annotations

import json
from typing import Any, Callable

from kimi_vl_jax.storage import files, paths
from kimi_vl_jax.storage.retry import StorageError


def read(path: str, parse: Callable[[dict, int], Any] | None = None, *,
         limit: int | None = None, errors: tuple[type[BaseException], ...] = (),
         what: str = 'JSONL file') -> list:
  """[parse(record, line) for each record of the file], at most `limit`; ValueError if none."""
  if limit is not None and limit < 1:
    raise ValueError(f'{what} {path!r}: limit must be >= 1 or None, got {limit}')
  local, pin = _local(path, what)
  out = []
  try:
    with open(local, 'rb') as f:
      for line_no, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        try:
          record = json.loads(raw.decode('utf-8'))
          if not isinstance(record, dict):
            raise ValueError(f'a record must be a JSON object, got {type(record).__name__}')
          out.append(record if parse is None else parse(record, line_no))
        except (ValueError, *errors) as e:   # JSONDecodeError / UnicodeDecodeError included
          raise ValueError(f'{what} {path} line {line_no}: {e}') from e
        if limit is not None and len(out) >= limit:
          break
  finally:
    if pin is not None:
      pin.close()
  if not out:
    raise ValueError(f'{what} {path}: no records')
  return out


def _local(path: str, what: str):
  """(a local path to read, the cache pin or None)."""
  if not paths.is_remote(path):
    if not paths.isfile(path):
      raise FileNotFoundError(f'{what}: no file {path!r}')
    return path, None
  paths.check_bucket(path, what)
  try:
    return files.fetch_file(path)
  except StorageError as e:
    if e.reason == 'missing_object':
      raise FileNotFoundError(f'{what}: no file {path!r}') from e
    raise
