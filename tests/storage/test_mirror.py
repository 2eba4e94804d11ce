"""Checkpoints on object storage: train checkpoints (orbax through a staging directory mirrored
to the bucket), `restore_params`, orbax parameter directories and HF checkpoints, on moto's S3
server and the GCS emulator. A fresh machine (a new, empty local cache) restores from the
bucket alone."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kimi_vl_jax.storage import direct as direct_lib
from kimi_vl_jax.storage import mirror as mirror_lib
from kimi_vl_jax.storage import paths
from kimi_vl_jax.train import checkpointing

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'fixtures',
                       'kimi_vl_tiny')


class _It:
  """A stand-in data iterator with a position."""

  def __init__(self, pos=0):
    self.pos = pos

  def get_state(self):
    return {'pos': self.pos}

  def set_state(self, s):
    self.pos = s['pos']


def _state(k):
  return {'w': jnp.arange(6.0).reshape(2, 3) * k, 'step': jnp.asarray(k, jnp.int32)}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(1))


@pytest.mark.parametrize('store', ['s3_env', 'gcs_env'])
def test_train_checkpoints_round_trip_through_the_bucket(store, request, monkeypatch, tmp_path):
  _, bucket = request.getfixturevalue(store)
  url = f'{"s3" if store == "s3_env" else "gs"}://{bucket}/run/checkpoints'
  mgr = checkpointing.make_manager(url, interval=1, keep=2)
  assert isinstance(mgr, checkpointing.MirroredManager)
  for k in (1, 2, 3):
    checkpointing.save(mgr, k, _state(k), _It(10 * k), {'phase': 0})
  mgr.wait_until_finished()
  mgr.close()                                       # uploads what is left
  assert mirror_lib.CheckpointMirror(url).remote_steps() == [2, 3]   # retention mirrored
  assert paths.listdir(url) == ['2', '3']
  assert 'commit_success.txt' in paths.listdir(f'{url}/3')

  # Another machine: an empty cache, so the staging directory is filled from the bucket.
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_CACHE_DIR', str(tmp_path / 'other_machine'))
  mgr = checkpointing.make_manager(url, interval=1, keep=2)
  assert checkpointing.latest_step(mgr) == 3
  it = _It()
  state = checkpointing.restore(mgr, 3, _abstract(), it)
  np.testing.assert_array_equal(state['w'], _state(3)['w'])
  assert it.pos == 30 and checkpointing.restore_meta(mgr, 3) == {'phase': 0}
  mgr.close()

  # An upload cut off before its commit file is not a checkpoint (and is cleaned up at the end).
  paths.write_bytes(f'{url}/7/state/junk', b'half an upload')
  assert mirror_lib.CheckpointMirror(url).remote_steps() == [2, 3]
  mirror = mirror_lib.CheckpointMirror(url)
  mirror.pull()
  mirror.finish()
  assert paths.listdir(url) == ['2', '3']


def test_restore_params_from_a_remote_workdir(s3_env):
  _, bucket = s3_env
  url = f's3://{bucket}/stage1'
  mgr = checkpointing.make_manager(f'{url}/checkpoints', interval=1, keep=1)
  params = {'dense': {'kernel': jnp.ones((3, 2)) * 7}}
  checkpointing.save(mgr, 5, {'params': params, 'opt': jnp.zeros(4)}, _It(), {'phase': 0})
  mgr.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  got = checkpointing.restore_params(url, abstract)
  np.testing.assert_array_equal(got['dense']['kernel'], params['dense']['kernel'])


def test_missing_bucket_and_multi_process_stop_at_start(s3_env):
  with pytest.raises(ValueError, match='checkpoint.dir: the bucket'):
    checkpointing.make_manager('s3://no-such-bucket-y/ckpt', interval=1, keep=1)
  with pytest.raises(ValueError, match='2 processes'):
    mirror_lib.check_single_process('s3://b/ckpt', 2)


def test_multi_process_runs_write_gs_directly_and_refuse_s3(s3_env, gcs_env, monkeypatch):
  """(The two-process save and restore itself: tests/parallel/test_multihost.py.)"""
  _, s3_bucket = s3_env
  _, gs_bucket = gcs_env
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'2 processes .* gs:// only'):
    checkpointing.make_manager(f's3://{s3_bucket}/ckpt', interval=1, keep=1)
  with pytest.raises(ValueError, match='the bucket'):
    checkpointing.make_manager('gs://no-such-bucket-y/ckpt', interval=1, keep=1)
  for k in ('TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING'):
    monkeypatch.setenv(k, '')       # restored (unset) after the test
    monkeypatch.delenv(k)
  assert direct_lib.check(f'gs://{gs_bucket}/ckpt/', 'checkpoint.dir', 2) == (
      f'gs://{gs_bucket}/ckpt')
  assert os.environ['TENSORSTORE_GCS_HTTP_URL'] == os.environ['STORAGE_EMULATOR_HOST']


@pytest.mark.parametrize('store', ['s3_env', 'gcs_env'])
def test_hf_and_params_directories_round_trip(store, request):
  from kimi_vl_jax.checkpoint import convert, hf
  _, bucket = request.getfixturevalue(store)
  root = f'{"s3" if store == "s3_env" else "gs"}://{bucket}'
  config, params = hf.load(FIXTURE)
  hf.save(config, params, f'{root}/hf_out', max_shard_bytes=200_000)
  assert 'config.json' in paths.listdir(f'{root}/hf_out')
  config2, params2 = hf.load(f'{root}/hf_out')
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  convert.save_params(config, params, f'{root}/params')
  config3, params3 = convert.load_params(f'{root}/params')
  assert config3 == config
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, params3))


def test_the_commit_file_is_uploaded_last(s3_env, monkeypatch):
  """A kill during an upload must never leave a step that looks complete: the commit file
  goes up after every other file (orbax writes its own local copy first in the listing)."""
  _, bucket = s3_env
  url = f's3://{bucket}/order/checkpoints'
  mgr = checkpointing.make_manager(url, interval=1, keep=1, async_save=False)
  uploaded = []
  real_upload = paths.upload
  monkeypatch.setattr(paths, 'upload', lambda l, u: (uploaded.append(u), real_upload(l, u)))
  checkpointing.save(mgr, 1, _state(1), _It(), {'phase': 0})
  mgr.close()
  names = [u.split('/checkpoints/1/', 1)[1] for u in uploaded]
  assert len(names) > 3 and names[-1] == mirror_lib.COMMIT_FILE
  assert names.count(mirror_lib.COMMIT_FILE) == 1
