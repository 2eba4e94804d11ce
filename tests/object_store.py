"""Object-storage servers on localhost for the tests (a pytest plugin, see tests/conftest.py):
moto's S3 server and gcp-storage-emulator's GCS server, one of each per test session, started
only when a test asks for them. `s3_env` / `gcs_env` point this process's clients (and the
processes it starts) at them, with a fresh read cache per test."""

import contextlib
import os
import socket
import time
import uuid

import pytest

S3_ENV = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
          'AWS_SESSION_TOKEN': 'testing', 'AWS_REGION': 'us-east-1',
          'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_EC2_METADATA_DISABLED': 'true'}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class S3Server:
  """moto's S3 endpoint; `stop()` / `start()` take it down and up on the same port (the
  objects stay: moto keeps them in this process)."""

  def __init__(self):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._srv = None
    self.start()

  def start(self):
    from moto.server import ThreadedMotoServer
    self._srv = ThreadedMotoServer(ip_address='127.0.0.1', port=self.port, verbose=False)
    self._srv.start()

  def stop(self):
    self._srv.stop()
    self._srv = None

  def env(self) -> dict:
    return {**S3_ENV, 'AWS_ENDPOINT_URL': self.url}

  def client(self):
    import boto3
    return boto3.client('s3', endpoint_url=self.url, region_name='us-east-1',
                        aws_access_key_id='testing', aws_secret_access_key='testing')

  def new_bucket(self) -> str:
    name = f'b-{uuid.uuid4().hex[:12]}'
    self.client().create_bucket(Bucket=name)
    return name


class GCSServer:
  def __init__(self):
    from gcp_storage_emulator.server import create_server
    self.port = free_port()
    self.host = f'127.0.0.1:{self.port}'
    self._srv = create_server('127.0.0.1', self.port, in_memory=True)
    self._srv.start()

  def stop(self):
    self._srv.stop()

  def env(self) -> dict:
    return {'STORAGE_EMULATOR_HOST': f'http://{self.host}'}

  def new_bucket(self) -> str:
    from gcsfs.core import GCSFileSystem
    name = f'b-{uuid.uuid4().hex[:12]}'
    fs = GCSFileSystem(token='anon', endpoint_url=f'http://{self.host}',
                             skip_instance_cache=True)
    fs.mkdir(name)
    return name


@pytest.fixture(scope='session')
def s3_server():
  srv = S3Server()
  yield srv
  if srv._srv is not None:
    srv.stop()


@pytest.fixture(scope='session')
def gcs_server():
  srv = GCSServer()
  yield srv
  srv.stop()


def _set_env(monkeypatch, tmp_path, env):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_CACHE_DIR', str(tmp_path / 'storage_cache'))
  # Faults must resolve quickly in tests: 3 attempts, 0.2 s apart at first.
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_RETRIES', '3')
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_BACKOFF_S', '0.2')
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_TIMEOUT_S', '5')


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
  """(server, a fresh bucket) with the environment pointing at the server."""
  _set_env(monkeypatch, tmp_path, s3_server.env())
  monkeypatch.delenv('AWS_PROFILE', raising=False)
  return s3_server, s3_server.new_bucket()


@pytest.fixture
def gcs_env(gcs_server, monkeypatch, tmp_path):
  _set_env(monkeypatch, tmp_path, gcs_server.env())
  return gcs_server, gcs_server.new_bucket()


def wait_until(cond, timeout=30.0):
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return True
    time.sleep(0.1)
  return False


def moto_auth(server):
  """Context: moto enforces IAM authentication (every request of unknown keys is denied)."""
  import requests

  @contextlib.contextmanager
  def ctx():
    r = requests.post(f'{server.url}/moto-api/reset-auth', data=b'0', timeout=10)
    r.raise_for_status()
    try:
      yield
    finally:
      requests.post(f'{server.url}/moto-api/reset-auth', data=b'inf', timeout=10)
  return ctx()
