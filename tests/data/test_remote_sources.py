"""Data sets on object storage (moto's S3 server, the GCS emulator, both on localhost): the
pipeline reads JSONL, text, ArrayRecord and the images records reference from `s3://` / `gs://`
and yields bitwise the batches of the same files read locally; reads go through the cache
(hits and misses in the data stats); faults are retried, then skipped and counted by reason."""

import os
import threading
import time

import numpy as np
import pytest

from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data import pipeline
from kimi_vl_jax.data import sources
from kimi_vl_jax.storage import paths

from data_helpers import vqa_record, write_jsonl, write_png
from object_store import moto_auth


def _upload_dir(local, url):
  paths.upload_tree(str(local), url)


def _cfg(srcs, **kw):
  cfg = dict(sources=srcs, seq_len=96, max_patches=64, max_images=4, batch_size=2,
             num_workers=0, packing=dict(num_bins=2), max_skip_rate=1.0)
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture
def mixed_dataset(small_chat_dataset, tmp_path):
  """The chat set plus a caption JSONL, a text file and an ArrayRecord copy, in one directory."""
  path, recs = small_chat_dataset
  root = os.path.dirname(path)
  write_jsonl(os.path.join(root, 'captions.jsonl'),
              [{'image': f'img/{k}.png', 'caption': f'picture {k}'} for k in range(6)])
  with open(os.path.join(root, 'docs.txt'), 'w') as f:
    f.write('\n'.join(f'document {i} ' + 'word ' * (i % 7) for i in range(30)) + '\n')
  sources.write_array_record(recs, os.path.join(root, 'chat.array_record'))
  return root


def _specs(root):
  j = lambda n: f'{root}/{n}'  # noqa: E731
  return [dict(name='chat', kind='chat', path=j('chat.jsonl'), weight=0.4),
          dict(name='captions', kind='caption', path=j('captions.jsonl'), weight=0.2),
          dict(name='docs', kind='text', path=j('docs.txt'), weight=0.2),
          dict(name='chat_ar', kind='chat', path=j('chat.array_record'), weight=0.2)]


@pytest.mark.parametrize('store', ['s3_env', 'gcs_env'])
def test_remote_dataset_gives_the_local_batches_through_the_cache(mixed_dataset, tok, store,
                                                                  request, monkeypatch):
  server, bucket = request.getfixturevalue(store)
  scheme = 's3' if store == 's3_env' else 'gs'
  url = f'{scheme}://{bucket}/sets/mixed'
  _upload_dir(mixed_dataset, url)
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_BLOCK_BYTES', '512')  # records span blocks
  local = _take(pipeline.make_iterator(_cfg(_specs(mixed_dataset)), tok, seed=5), 6)
  it = pipeline.make_iterator(_cfg(_specs(url)), tok, seed=5)
  _assert_same(local, _take(it, 6))
  stats = pipeline.data_stats(it)
  assert stats['cache_misses/chat'] > 0 and stats['cache_hits/chat'] > 0  # blocks re-read
  assert stats['skip_rate'] == 0.0
  # A second pass (a new iterator, as after a restart) reads everything from the cache.
  it2 = pipeline.make_iterator(_cfg(_specs(url)), tok, seed=5)
  _assert_same(local, _take(it2, 6))
  s2 = pipeline.data_stats(it2)
  assert sum(v for k, v in s2.items() if k.startswith('cache_misses/')) == 0
  assert s2['cache_hit_rate'] == 1.0


def test_missing_truncated_escaping_and_denied_images_are_counted_skips(tmp_path, tok, s3_env):
  server, bucket = s3_env
  root = tmp_path / 'set'
  write_png(str(root / 'ok.png'), seed=1)
  good = open(root / 'ok.png', 'rb').read()
  (root / 'cut.png').write_bytes(good[:len(good) // 2])
  recs = ([vqa_record('ok.png', f'q{i}', 'a') for i in range(6)]
          + [vqa_record('gone.png', 'q', 'a'), vqa_record('cut.png', 'q', 'a'),
             vqa_record('../other/ok.png', 'q', 'a')])
  write_jsonl(str(root / 'chat.jsonl'), recs)
  with open(root / 'chat.jsonl', 'ab') as f:
    f.write(b'{"messages": [{"role": "us')      # the object ends mid-record
  url = f's3://{bucket}/set'
  _upload_dir(root, url)
  paths.write_bytes(f's3://{bucket}/other/ok.png', good)
  it = pipeline.make_iterator(_cfg([dict(name='chat', kind='chat', path=f'{url}/chat.jsonl')],
                                   num_epochs=1, shuffle=False), tok)
  n = sum(1 for _ in it)
  assert n >= 1
  skips = pipeline.skip_counts(it)['chat']
  assert skips == {'missing_image': 1, 'truncated_image': 1, 'path_escape': 1,
                   'malformed_json': 1}, skips
  assert pipeline.data_stats(it)['examples/chat'] == 6

  image_cfg = images_lib.ImageConfig(max_patches=16)
  with moto_auth(server):
    with pytest.raises(images_lib.BadImage) as e:
      sources.load_images(['fresh.png'], url, image_cfg)
  assert e.value.reason == 'access_denied'


def test_server_restart_mid_run_loses_nothing_and_a_dead_server_is_counted(tmp_path, tok,
                                                                          s3_env, monkeypatch):
  server, bucket = s3_env
  root = tmp_path / 'set'
  for k in range(12):
    write_png(str(root / f'{k}.png'), seed=k)
  write_jsonl(str(root / 'chat.jsonl'), [vqa_record(f'{k}.png', f'q{k}', 'a') for k in range(12)])
  url = f's3://{bucket}/set'
  _upload_dir(root, url)
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_RETRIES', '6')   # 0.2 + 0.4 + ... + 3.2 = 6.2 s
  cfg = _cfg([dict(name='chat', kind='chat', path=f'{url}/chat.jsonl')], num_epochs=1,
             shuffle=False, read_threads=1, read_buffer_size=1)
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_CACHE_DIR', str(tmp_path / 'ref_cache'))
  ref = list(pipeline.make_iterator(cfg, tok))
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_CACHE_DIR', str(tmp_path / 'run_cache'))
  it = pipeline.make_iterator(cfg, tok)
  first = next(it)
  server.stop()
  restart = threading.Timer(1.5, server.start)
  restart.start()
  rest = list(it)                       # reads wait for the server instead of failing
  restart.join()
  assert pipeline.skip_counts(it)['chat'] == {}
  _assert_same(ref, [first] + rest)     # the same batches as without the outage

  # A server that stays down: each image read gives up after the bounded retries and counts.
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_RETRIES', '2')
  monkeypatch.setenv('KIMI_VL_JAX_STORAGE_CACHE_DIR', str(tmp_path / 'cold_cache'))
  it = pipeline.make_iterator(cfg, tok)
  server.stop()
  try:
    t = time.time()
    list(it)
    assert time.time() - t < 60
  finally:
    server.start()
  skips = pipeline.skip_counts(it)['chat']
  assert skips.get('remote_unavailable', 0) >= 1 and sum(skips.values()) == 12


@pytest.mark.slow  # grain worker processes start with spawn (about 30 s)
def test_remote_source_with_worker_processes_matches_local(small_chat_dataset, tok, s3_env):
  _, bucket = s3_env
  path, _ = small_chat_dataset
  url = f's3://{bucket}/chatset'
  _upload_dir(os.path.dirname(path), url)
  spec = lambda p: [dict(name='chat', kind='chat', path=p)]  # noqa: E731
  local = _take(pipeline.make_iterator(_cfg(spec(path), num_workers=2), tok), 5)
  it = pipeline.make_iterator(_cfg(spec(f'{url}/chat.jsonl'), num_workers=2), tok)
  _assert_same(local, _take(it, 5))
  stats = pipeline.data_stats(it)    # the workers' cache counts reach the parent
  assert stats['cache_misses/chat'] > 0 and stats['cache_hits/chat'] > 0


def test_tokenizer_file_from_the_bucket(s3_env, tok):
  from kimi_vl_jax.data import tokenizer as tok_lib
  _, bucket = s3_env
  paths.upload(tok_lib.TINY_SPM_PATH, f's3://{bucket}/tok/tiny_spm.model')
  remote = tok_lib.make_tokenizer({'kind': 'sentencepiece',
                                   'path': f's3://{bucket}/tok/tiny_spm.model'})
  text = 'what color is the circle? 12 + 7 = 19.'
  assert remote.encode(text) == tok.encode(text) and remote.vocab_size == tok.vocab_size
  with pytest.raises(FileNotFoundError, match='not found'):
    tok_lib.make_tokenizer({'kind': 'sentencepiece', 'path': f's3://{bucket}/tok/none.model'})
