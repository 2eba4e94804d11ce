"""JSONL files that configure a run (benchmark files, RL prompt sets, eval answer files), local
and on object storage (moto's S3 server on localhost): the same records either way, a remote
file read through the read cache, and every bad input a clear error naming the file and line.
(tests/evaluation/test_benchmark_remote.py and tests/rl/test_rollouts_remote.py read benchmark
files and prompt sets from the bucket.)"""

import json

import pytest

from kimi_vl_jax.storage import cache as cache_lib, jsonl, paths

RECORDS = [{'i': i, 'text': f'record {i}'} for i in range(5)]


def _both(tmp_path, bucket, name, text):
  """(local path, s3 URL) of a file holding `text`."""
  local = tmp_path / name
  local.write_text(text)
  url = f's3://{bucket}/cfg/{name}'
  paths.write_text(url, text)
  return str(local), url


def test_local_and_remote_records_limit_and_cache(s3_env, tmp_path):
  _, bucket = s3_env
  text = json.dumps(RECORDS[0]) + '\n\n' + ''.join(json.dumps(r) + '\n' for r in RECORDS[1:])
  for path in _both(tmp_path, bucket, 'a.jsonl', text):
    assert jsonl.read(path) == RECORDS
    assert jsonl.read(path, lambda r, line: (line, r['i']), limit=2) == [(1, 0), (3, 1)]
  cache = cache_lib.default_cache()
  assert cache.counters['misses'] == 1 and cache.counters['hits'] == 1   # fetched once


@pytest.mark.parametrize('text, message', [
    ('{"i": 0}\n{"i": 1\n', 'line 2: Expecting'),                   # not JSON
    ('{"i": 0}\n[1, 2]\n', 'line 2: a record must be a JSON object'),
    ('{"i": 0}\n{"i": 1}\n{"i": 2', 'line 3: '),                     # a cut-off last line
    (b'{"i": 0}\n{"t": "\xff"}\n', 'line 2: .*utf-8'),               # not UTF-8
    ('\n\n', 'no records'),
])
def test_bad_input_is_a_clear_error(s3_env, tmp_path, text, message):
  _, bucket = s3_env
  local = tmp_path / 'bad.jsonl'
  (local.write_bytes if isinstance(text, bytes) else local.write_text)(text)
  url = f's3://{bucket}/cfg/bad.jsonl'
  paths.write_bytes(url, text if isinstance(text, bytes) else text.encode())
  for path in (str(local), url):
    with pytest.raises(ValueError, match=f'prompt set {path}.*{message}'):
      jsonl.read(path, what='prompt set')


def test_parse_errors_missing_files_and_buckets(s3_env, tmp_path):
  _, bucket = s3_env
  for path in _both(tmp_path, bucket, 'a.jsonl', '{"i": 0}\n{"j": 1}\n'):
    with pytest.raises(ValueError, match='line 2: .*KeyError|line 2: \'i\''):
      jsonl.read(path, lambda r, _: r['i'], errors=(KeyError,))
    with pytest.raises(KeyError):                     # not declared: a bug, not bad input
      jsonl.read(path, lambda r, _: r['i'])
  with pytest.raises(FileNotFoundError, match='benchmark file'):
    jsonl.read(str(tmp_path / 'none.jsonl'), what='benchmark file')
  with pytest.raises(FileNotFoundError, match='none.jsonl'):
    jsonl.read(f's3://{bucket}/cfg/none.jsonl')
  with pytest.raises(ValueError, match='does not exist'):
    jsonl.read('s3://no-such-bucket-kvj/cfg/a.jsonl')
