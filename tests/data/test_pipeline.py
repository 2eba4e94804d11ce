"""The grain pipeline: determinism, checkpoint/resume, host sharding, bad input, mixing."""

import json
import logging
import os

import numpy as np
import pytest

from kimi_vl_jax.data import batch as batch_lib
from kimi_vl_jax.data import pipeline
from kimi_vl_jax.data import sources

from data_helpers import vqa_record, write_jsonl, write_png


def _cfg(path, **kw):
  cfg = dict(sources=[dict(name='chat', kind='chat', path=path)], seq_len=96, max_patches=64,
             max_images=4, batch_size=2, num_workers=0, packing=dict(num_bins=2))
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == set(batch_lib.KEYS)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contract_and_determinism(small_chat_dataset, tok):
  path, _ = small_chat_dataset
  a = _take(pipeline.make_iterator(_cfg(path), tok, seed=3), 4)
  b = _take(pipeline.make_iterator(_cfg(path), tok, seed=3), 4)
  _assert_same(a, b)
  c = _take(pipeline.make_iterator(_cfg(path), tok, seed=4), 4)
  assert any(not np.array_equal(x['input_ids'], y['input_ids']) for x, y in zip(a, c))
  dtypes = {'input_ids': np.int32, 'targets': np.int32, 'loss_mask': np.float32,
            'segment_ids': np.int32, 'positions': np.int32, 'patches': np.float32,
            'patch_coords': np.int32, 'patch_image_ids': np.int32, 'image_grid_hws': np.int32}
  shapes = {'input_ids': (2, 96), 'patches': (2, 64, 588), 'patch_coords': (2, 64, 2),
            'patch_image_ids': (2, 64), 'image_grid_hws': (2, 4, 2)}
  for k, dt in dtypes.items():
    assert a[0][k].dtype == dt, k
    assert a[0][k].shape == shapes.get(k, (2, 96)), k
  # The one definition of the contract agrees, for every batch.
  spec = batch_lib.BatchSpec.from_config(_cfg(path))
  for x in a:
    spec.validate(x)


@pytest.mark.parametrize('workers', [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_from_state_equals_uninterrupted(small_chat_dataset, tok, workers):
  path, _ = small_chat_dataset
  cfg = _cfg(path, num_workers=workers, image=dict(augment=dict(enabled=True)))
  it = pipeline.make_iterator(cfg, tok, seed=1)
  _take(it, 5)  # mid-epoch (40 records, ~6 per row, 2 rows per batch)
  state = json.loads(json.dumps(it.get_state()))
  stats_then = pipeline.data_stats(it)
  uninterrupted = _take(it, 6)
  it2 = pipeline.make_iterator(cfg, tok, seed=1)
  it2.set_state(state)
  assert pipeline.data_stats(it2) == stats_then
  _assert_same(uninterrupted, _take(it2, 6))
  assert pipeline.data_stats(it2) == pipeline.data_stats(it)


@pytest.mark.slow
def test_two_workers_text_only_deterministic(tmp_path, tok):
  path = write_jsonl(str(tmp_path / 't.jsonl'), [{'text': f'document number {i}'} for i in range(50)])
  cfg = _cfg(None, sources=[dict(kind='text', path=path)], max_patches=0, max_images=0,
             num_workers=2)
  a = _take(pipeline.make_iterator(cfg, tok, seed=0), 3)
  assert a[0]['patches'].shape == (2, 0, 588) and a[0]['image_grid_hws'].shape == (2, 0, 2)
  batch_lib.BatchSpec.from_config(cfg).validate(a[0])
  _assert_same(a, _take(pipeline.make_iterator(cfg, tok, seed=0), 3))
  texts = _all_texts(a, tok)
  docs = [f'document number {i}[EOS]' for i in range(50)]
  assert len(texts) > 6 and all(any(t in d for d in docs) for t in texts), texts


def _all_texts(it, tok):
  out = []
  for b in it:
    for r in range(b['input_ids'].shape[0]):
      seg = b['segment_ids'][r]
      for s in range(1, seg.max() + 1):
        out.append(tok.decode(b['input_ids'][r][seg == s]))
  return out


def test_hosts_get_disjoint_shards(small_chat_dataset, tok):
  path, _ = small_chat_dataset
  cfg = _cfg(path, num_epochs=1, batch_size=1)
  per_host = [_all_texts(pipeline.make_iterator(cfg, tok, seed=0, process_index=i,
                                                process_count=2), tok) for i in range(2)]
  everything = _all_texts(pipeline.make_iterator(cfg, tok, seed=0), tok)
  assert len(per_host[0]) == len(per_host[1]) == 20
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == sorted(everything)
  with pytest.raises(ValueError, match='process_index'):
    pipeline.make_iterator(cfg, tok, process_index=2, process_count=2)


@pytest.fixture
def bad_dataset(tmp_path):
  root = tmp_path / 'root'
  write_png(str(root / 'ok.png'), (28, 28))
  write_png(str(tmp_path / 'outside.png'), (28, 28))
  (root / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(100))
  full = write_png(str(tmp_path / 'full.png'), (300, 300))
  data = open(full, 'rb').read()
  (root / 'truncated.png').write_bytes(data[:len(data) // 2])
  good = vqa_record('ok.png', 'q', 'a')
  bad = {
      'malformed_json': '{"messages": [',
      'unknown_role': {'messages': [{'role': 'robot', 'content': 'x'},
                                    {'role': 'assistant', 'content': 'y'}]},
      'empty_assistant': {'messages': [{'role': 'user', 'content': 'x'},
                                       {'role': 'assistant', 'content': ''}]},
      'image_only_assistant': {'messages': [
          {'role': 'user', 'content': 'x'},
          {'role': 'assistant', 'content': [{'type': 'image', 'image': 'ok.png'}]}]},
      'path_escape': vqa_record('../outside.png', 'q', 'a'),
      'missing_image': vqa_record('nope.png', 'q', 'a'),
      'corrupt_image': vqa_record('corrupt.png', 'q', 'a'),
      'truncated_image': vqa_record('truncated.png', 'q', 'a'),
  }
  abs_escape = vqa_record(str(tmp_path / 'outside.png'), 'q', 'a')
  os.symlink(str(tmp_path / 'outside.png'), str(root / 'link.png'))
  link_escape = vqa_record('link.png', 'q', 'a')
  lines = [good] * 4 + list(bad.values()) + [abs_escape, link_escape] + [good] * 4
  path = write_jsonl(str(root / 'data.jsonl'), lines)
  expected = {k: 1 for k in bad}
  expected['path_escape'] = 3
  return path, expected, len(lines)


def test_every_bad_input_kind_is_skipped_counted_and_logged(bad_dataset, tok, caplog):
  path, expected, n_lines = bad_dataset
  cfg = _cfg(path, num_epochs=1, batch_size=1, shuffle=False, max_skip_rate=1.0)
  with caplog.at_level(logging.WARNING, logger='kimi_vl_jax.data.sources'):
    it = pipeline.make_iterator(cfg, tok)
    texts = _all_texts(it, tok)
  assert len(texts) == 8
  assert pipeline.skip_counts(it) == {'chat': expected}
  stats = pipeline.data_stats(it)
  assert stats['skipped/chat'] == 10 and stats['skipped/chat/path_escape'] == 3
  assert stats['skip_rate'] == pytest.approx(10 / 18)
  # Logged with source and line: line 5 is the malformed JSON line, line 12 the truncated image.
  msgs = [r.getMessage() for r in caplog.records]
  assert any('data.jsonl' in m and 'line 5 (malformed_json)' in m for m in msgs), msgs
  assert any('line 12 (truncated_image)' in m for m in msgs), msgs
  assert len(msgs) == 10


def test_skip_rate_bound_stops_the_run(bad_dataset, tok):
  path, _, _ = bad_dataset
  cfg = _cfg(path, batch_size=1, shuffle=False, max_skip_rate=0.2, skip_check_min_examples=10)
  it = pipeline.make_iterator(cfg, tok)
  with pytest.raises(pipeline.DataQualityError, match=r'max_skip_rate=20.0%.*malformed_json'):
    for _ in range(50):
      next(it)


def test_array_record_source_matches_jsonl(small_chat_dataset, tok, tmp_path):
  path, recs = small_chat_dataset
  ar = os.path.join(os.path.dirname(path), 'chat.array_record')
  sources.write_array_record(recs, ar)
  a = _take(pipeline.make_iterator(_cfg(path), tok, seed=2), 3)
  b = _take(pipeline.make_iterator(_cfg(ar), tok, seed=2), 3)
  _assert_same(a, b)


def test_weighted_mix_is_realised_and_reported(tmp_path, tok):
  a = write_jsonl(str(tmp_path / 'a.jsonl'), [
      {'messages': [{'role': 'user', 'content': f'a{i}'}, {'role': 'assistant', 'content': 'x'}]}
      for i in range(30)])
  b = write_jsonl(str(tmp_path / 'b.jsonl'), [
      {'messages': [{'role': 'user', 'content': f'b{i}'}, {'role': 'assistant', 'content': 'y'}]}
      for i in range(30)])
  t = write_jsonl(str(tmp_path / 't.txt'), [f'plain text document {i}' for i in range(30)])
  cfg = _cfg(None, sources=[dict(name='a', kind='chat', path=a, weight=3.0),
                            dict(name='b', kind='chat', path=b, weight=1.0),
                            dict(name='t', kind='text', path=t, weight=0.5)],
             max_patches=0, max_images=0, seq_len=64)
  it = pipeline.make_iterator(cfg, tok)
  _take(it, 20)
  s = pipeline.data_stats(it)
  assert s['mix_target/a'] == pytest.approx(3 / 4.5)
  assert abs(s['mix_examples/a'] - 3 / 4.5) < 0.05 and abs(s['mix_examples/b'] - 1 / 4.5) < 0.05
  assert s['examples/t'] > 0 and s['tokens/t'] > 0 and s['images/a'] == 0


def test_config_errors_are_clear(small_chat_dataset, tok):
  path, _ = small_chat_dataset
  with pytest.raises(ValueError, match='unknown fields'):
    pipeline.make_iterator(_cfg(path, seq_length=3), tok)
  with pytest.raises(ValueError, match='unknown kind'):
    pipeline.make_iterator(_cfg(None, sources=[dict(kind='video', path=path)]), tok)
  with pytest.raises(ValueError, match='multiple of 4'):
    pipeline.make_iterator(_cfg(path, max_patches=10), tok)
  with pytest.raises(FileNotFoundError):
    pipeline.make_iterator(_cfg(path.replace('chat.jsonl', 'missing.jsonl')), tok)


def _corpus_with_bad_tail(tmp_path):
  """36 records, 8 bad: 5 in the middle and the last 3 (skipped after the last kept example)."""
  write_png(str(tmp_path / 'ok.png'), (28, 28))
  bad = ['{"messages": [', {'messages': [{'role': 'robot', 'content': 'x'},
                                         {'role': 'assistant', 'content': 'y'}]},
         vqa_record('nope.png', 'q', 'a'), vqa_record('../x.png', 'q', 'a'),
         {'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': ''}]}]
  good = [vqa_record('ok.png', f'question {i}?', f'answer {i}') if i % 2 else
          {'messages': [{'role': 'user', 'content': f'hi {i}'},
                        {'role': 'assistant', 'content': f'hello {i}'}]} for i in range(28)]
  lines = good[:10] + bad + good[10:] + bad[:3]
  assert len(lines) == 36
  return write_jsonl(str(tmp_path / 'data.jsonl'), lines)


@pytest.mark.parametrize('workers', [0, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize('batch_size', [1, 3])
def test_finite_run_counts_every_skip(tmp_path, tok, workers, batch_size):
  """Skips after the last emitted row, and in a dropped partial last batch, are counted."""
  path = _corpus_with_bad_tail(tmp_path)
  cfg = _cfg(path, num_epochs=1, shuffle=False, max_skip_rate=1.0, batch_size=batch_size,
             num_workers=workers, packing=dict(num_bins=2))
  it = pipeline.make_iterator(cfg, tok)
  texts = _all_texts(it, tok)
  stats = pipeline.data_stats(it)
  assert stats['skipped/chat'] == 8, pipeline.skip_counts(it)
  assert pipeline.skip_counts(it) == {'chat': {'malformed_json': 2, 'unknown_role': 2,
                                               'missing_image': 2, 'path_escape': 1,
                                               'empty_assistant': 1}}
  # `examples` counts what the trainer received (a dropped partial batch is not trained on).
  assert stats['examples/chat'] == len(texts) <= 28
  if batch_size == 1:
    assert len(texts) == 28


def test_finite_text_source_counts_every_skip(tmp_path, tok):
  docs = [{'text': f'document number {i}'} for i in range(20)]
  path = write_jsonl(str(tmp_path / 't.jsonl'), docs + ['{"text": 3}', 'not json', '{"x": 1}'])
  cfg = _cfg(None, sources=[dict(name='t', kind='text', path=path)], max_patches=0, max_images=0,
             num_epochs=1, shuffle=False, max_skip_rate=1.0, batch_size=1)
  it = pipeline.make_iterator(cfg, tok)
  for _ in it:
    pass
  assert pipeline.skip_counts(it) == {'t': {'bad_schema': 2, 'malformed_json': 1}}
