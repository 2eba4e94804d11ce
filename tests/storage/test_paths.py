"""The file API against real servers on localhost: moto (S3) and gcp-storage-emulator (GCS);
faults end in a StorageError with a countable reason after bounded retries, never a hang."""

import socket
import time

import pytest

from kimi_vl_jax.storage import paths, retry

from object_store import moto_auth


@pytest.fixture(params=['s3', 'gs'])
def store(request):
  server, bucket = request.getfixturevalue('s3_env' if request.param == 's3' else 'gcs_env')
  return server, f'{request.param}://{bucket}'


def test_write_read_list_delete_round_trip(store):
  _, root = store
  paths.write_bytes(f'{root}/d/a.txt', b'hello')
  paths.write_text(f'{root}/d/sub/b.txt', 'world')
  assert paths.read_bytes(f'{root}/d/a.txt') == b'hello'
  assert paths.read_bytes(f'{root}/d/a.txt', 1, 4) == b'ell'
  assert paths.isfile(f'{root}/d/a.txt') and not paths.isfile(f'{root}/d/none')
  assert paths.listdir(f'{root}/d') == ['a.txt', 'sub']
  assert paths.walk_files(f'{root}/d') == ['a.txt', 'sub/b.txt']
  assert paths.info(f'{root}/d/a.txt')['size'] == 5
  paths.remove(f'{root}/d')
  assert paths.listdir(f'{root}/d') == []


def test_missing_object_is_not_retried(store):
  _, root = store
  t = time.time()
  with pytest.raises(retry.StorageError) as e:
    paths.read_bytes(f'{root}/no/such/object')
  assert e.value.reason == 'missing_object'
  assert time.time() - t < 2  # no backoff for a permanent error


def test_missing_bucket_is_a_clear_error_at_start(store):
  _, root = store
  scheme = root.split('://')[0]
  with pytest.raises(ValueError, match="bucket 'no-such-bucket-x' .* does not exist"):
    paths.check_bucket(f'{scheme}://no-such-bucket-x/ckpt', 'config.workdir')
  paths.check_bucket(f'{root}/ckpt', 'config.workdir')


def test_unreachable_server_gives_up_after_bounded_retries(s3_env, monkeypatch):
  with socket.socket() as s:  # bound, never listening: connections are refused
    s.bind(('127.0.0.1', 0))
    monkeypatch.setenv('AWS_ENDPOINT_URL', f'http://127.0.0.1:{s.getsockname()[1]}')
    t = time.time()
    with pytest.raises(retry.StorageError) as e:
      paths.read_bytes('s3://any-bucket/key')
  assert e.value.reason == 'remote_unavailable' and 'failed 3 times' in str(e.value)
  assert 0.5 < time.time() - t < 30  # two backoffs (0.2 + 0.4 s), then it gives up


def test_access_denied_is_reported_not_retried(s3_env):
  server, bucket = s3_env
  paths.write_bytes(f's3://{bucket}/k', b'x')
  with moto_auth(server):  # the test credentials are unknown to moto's IAM: 403
    t = time.time()
    with pytest.raises(retry.StorageError) as e:
      paths.read_bytes(f's3://{bucket}/k')
    assert e.value.reason == 'access_denied'
    assert time.time() - t < 2
  assert paths.read_bytes(f's3://{bucket}/k') == b'x'


def test_classification_uses_codes_not_digits_in_messages():
  err = ConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:40312/b/k"')
  assert retry.classify(err) == 'remote_unavailable'
  assert retry.classify(FileNotFoundError('k')) == 'missing_object'
  assert retry.classify(PermissionError('k')) == 'access_denied'

  class HttpError(Exception):
    code = 403
  assert retry.classify(HttpError('forbidden')) == 'access_denied'
