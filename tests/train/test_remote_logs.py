"""The logs of a remote workdir (moto's S3 server on localhost): pulled at start, uploaded when
changed (in the background, on request or on an interval), a failed upload retried later and
raised at the end."""

import os
import time

import pytest

from kimi_vl_jax.storage import paths
from kimi_vl_jax.train.remote_logs import RemoteLogs


def _append(path, text):
  with open(path, 'a') as f:
    f.write(text)


def test_upload_sends_changed_log_files_but_not_checkpoints(s3_env, tmp_path):
  _, bucket = s3_env
  remote, local = f's3://{bucket}/run', str(tmp_path / 'run')
  logs = RemoteLogs(remote, local)
  logs.pull()                                     # nothing there yet
  _append(os.path.join(local, 'metrics.jsonl'), '{"step": 1}\n')
  os.makedirs(os.path.join(local, 'tensorboard'))
  _append(os.path.join(local, 'tensorboard', 'events'), 'e1')
  os.makedirs(os.path.join(local, 'checkpoints', '3'))
  _append(os.path.join(local, 'checkpoints', '3', 'x'), 'ckpt')
  assert logs.upload() == 2
  assert paths.walk_files(remote) == ['metrics.jsonl', 'tensorboard/events']
  assert logs.upload() == 0                       # nothing changed
  time.sleep(0.01)
  _append(os.path.join(local, 'metrics.jsonl'), '{"step": 2}\n')
  assert logs.upload() == 1
  assert paths.read_text(f'{remote}/metrics.jsonl') == '{"step": 1}\n{"step": 2}\n'

  # Another machine starts from the bucket's logs and uploads only what it changes.
  other = RemoteLogs(remote, str(tmp_path / 'other'))
  other.pull()
  assert open(tmp_path / 'other' / 'metrics.jsonl').read() == '{"step": 1}\n{"step": 2}\n'
  assert other.upload() == 0


def test_background_uploads_on_request_and_interval(s3_env, tmp_path):
  _, bucket = s3_env
  remote, local = f's3://{bucket}/run', str(tmp_path / 'run')
  logs = RemoteLogs(remote, local, interval_s=3600)
  logs.pull()
  path = os.path.join(local, 'metrics.jsonl')
  _append(path, '{"step": 1}\n')
  assert not logs.maybe_upload()                  # the interval has not passed
  logs.upload_in_background()
  assert logs.wait(30)
  assert paths.read_text(f'{remote}/metrics.jsonl') == '{"step": 1}\n'
  logs.interval_s = 0
  _append(path, '{"step": 2}\n')
  assert logs.maybe_upload()
  assert logs.wait(30)
  assert paths.read_text(f'{remote}/metrics.jsonl').count('\n') == 2
  logs.finish()
  with pytest.raises(ValueError, match='log_upload_s'):
    RemoteLogs(remote, local, interval_s=-1)


def test_failed_upload_is_retried_and_raised_at_finish(s3_env, tmp_path):
  server, bucket = s3_env
  remote, local = f's3://{bucket}/run', str(tmp_path / 'run')
  logs = RemoteLogs(remote, local)
  logs.pull()
  _append(os.path.join(local, 'metrics.jsonl'), '{"step": 1}\n')
  server.stop()
  try:
    logs.upload_in_background()                   # fails after its retries: logged, kept
    assert logs.wait(60)
    assert logs.uploads == 0
    with pytest.raises(OSError):
      logs.finish()                               # the final upload fails too: raised
  finally:
    server.start()
  assert logs.upload() == 1                       # the file was never marked as sent
  assert paths.read_text(f'{remote}/metrics.jsonl') == '{"step": 1}\n'
