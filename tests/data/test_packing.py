"""Packing: rows reproduce every example exactly; targets/mask shift inside segments; patches
line up with <|media_pad|> runs; oversize examples are dropped and counted."""

import numpy as np
import pytest

from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data import pipeline
from kimi_vl_jax.data import sources

from data_helpers import vqa_record, write_jsonl, write_png


def _cfg(path, kind='chat', **kw):
  cfg = dict(sources=[dict(name='s', kind=kind, path=path)], seq_len=128, max_patches=64,
             max_images=4, batch_size=1, shuffle=False, num_epochs=1,
             packing=dict(num_bins=4, shuffle_bins=False), skip_check_min_examples=10 ** 9)
  cfg.update(kw)
  return cfg


def _segments(batch):
  """Yields (row, start, end) for every segment of every row."""
  for b in range(batch['input_ids'].shape[0]):
    seg = batch['segment_ids'][b]
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      assert (np.diff(idx) == 1).all()  # contiguous
      yield b, idx[0], idx[-1] + 1


def _direct_examples(path, tok, kind='chat', image_cfg=None):
  src = sources.open_source(path)
  import os
  maker = sources.ExampleMaker(tokenizer=tok, kind=kind, source_index=0, name='s',
                               root=os.path.dirname(path), fmt=sources.infer_format(path),
                               image_cfg=image_cfg or images_lib.ImageConfig())
  return [maker(src[i], np.random.default_rng(0)) for i in range(len(src))]


@pytest.mark.parametrize('algorithm', ['first_fit', 'best_fit'])
def test_packed_rows_reproduce_examples_exactly(small_chat_dataset, tok, algorithm):
  path, _ = small_chat_dataset
  it = pipeline.make_iterator(_cfg(path, packing=dict(algorithm=algorithm, num_bins=4,
                                                       shuffle_bins=False)), tok)
  packed = []
  for batch in it:
    assert batch['input_ids'].shape == (1, 128) and batch['patches'].shape == (1, 64, 588)
    row = {k: v[0] for k, v in batch.items()}
    n_pad = np.cumsum(row['input_ids'] == tok.media_pad_id)
    img_ids = row['patch_image_ids']
    for _, s, e in _segments(batch):
      ids = row['input_ids'][s:e]
      # Targets: next token inside the segment; the last one has target 0 and no loss.
      np.testing.assert_array_equal(row['targets'][s:e - 1], ids[1:])
      assert row['targets'][e - 1] == 0 and row['loss_mask'][e - 1] == 0
      np.testing.assert_array_equal(row['positions'][s:e], np.arange(e - s))
      # The segment's merged tokens -> its patches (4 per <|media_pad|>, in order).
      before = n_pad[s - 1] if s else 0
      n_here = n_pad[e - 1] - before
      patches = row['patches'][4 * before:4 * (before + n_here)]
      coords = row['patch_coords'][4 * before:4 * (before + n_here)]
      images = sorted(set(img_ids[4 * before:4 * (before + n_here)].tolist()))
      grids = row['image_grid_hws'][[i - 1 for i in images]] if images else np.zeros((0, 2))
      packed.append((ids.tobytes(), row['loss_mask'][s:e - 1].tobytes(), patches.tobytes(),
                     coords.tobytes(), np.asarray(grids, np.int32).tobytes()))
    # Padding: segment 0, no loss, pad id; patch padding has image id 0.
    pad = row['segment_ids'] == 0
    assert (row['loss_mask'][pad] == 0).all() and (row['input_ids'][pad] == tok.pad_id).all()
    n_patch = int((row['image_grid_hws'].prod(-1)).sum())
    assert (img_ids[:n_patch] > 0).all() and (img_ids[n_patch:] == 0).all()
    assert n_patch == 4 * int((row['input_ids'] == tok.media_pad_id).sum())
  expected = []
  for ex in _direct_examples(path, tok):
    expected.append((ex['input_ids'].tobytes(),
                     ex['token_mask'][1:].astype(np.float32).tobytes(), ex['patches'].tobytes(),
                     ex['patch_coords'].tobytes(), ex['image_grid_hws'].astype(np.int32).tobytes()))
  assert len(packed) == len(expected) == 40
  assert sorted(packed) == sorted(expected)
  stats = pipeline.data_stats(it)
  assert stats['examples/s'] == 40 and stats['skip_rate'] == 0


def test_oversize_examples_are_dropped_and_counted(tmp_path, tok):
  write_png(str(tmp_path / 'big.png'), (140, 140))
  write_png(str(tmp_path / 'small.png'), (28, 28))
  recs = [
      {'messages': [{'role': 'user', 'content': 'word ' * 200},
                    {'role': 'assistant', 'content': 'ok'}]},                       # too long
      vqa_record('big.png', 'q', 'a'),                                              # 100 patches
      {'messages': [{'role': 'user', 'content': [{'type': 'image', 'image': 'small.png'}] * 5
                     + [{'type': 'text', 'text': 'q'}]},
                    {'role': 'assistant', 'content': 'five'}]},                     # 5 images
      vqa_record('small.png', 'fine', 'yes'),
  ]
  path = write_jsonl(str(tmp_path / 'c.jsonl'), recs)
  it = pipeline.make_iterator(_cfg(path), tok)
  batches = list(it)
  seg_count = sum(int(b['segment_ids'].max()) for b in batches)
  assert seg_count == 1
  assert pipeline.skip_counts(it) == {'s': {'too_long': 1, 'too_many_patches': 1,
                                            'too_many_images': 1}}


def test_text_is_concatenated_then_split(tmp_path, tok):
  docs = [{'text': ' '.join(f'w{i}x{j}' for j in range(n))} for i, n in
          enumerate([3, 40, 7, 1, 90, 12, 5])]
  path = write_jsonl(str(tmp_path / 't.jsonl'), docs)
  cfg = _cfg(path, kind='text', seq_len=64, max_patches=0, max_images=0,
             packing=dict(num_bins=1, shuffle_bins=False))
  it = pipeline.make_iterator(cfg, tok)
  batches = list(it)
  stream = np.concatenate([tok.encode(d['text']) + [tok.eos_id] for d in docs])
  got = np.concatenate([b['input_ids'][0][b['segment_ids'][0] > 0] for b in batches])
  np.testing.assert_array_equal(got, stream)
  assert all((b['segment_ids'][0] > 0).all() for b in batches[:-1])  # full chunks, no padding
  assert batches[0]['patches'].shape == (1, 0, 588)
  # Documents stay separate segments inside a chunk; the split ends a segment with no loss.
  n_eos = sum(int(((b['input_ids'][0] == tok.eos_id) & (b['loss_mask'][0] == 0)).sum())
              for b in batches)
  assert n_eos == len(docs)
  for b in batches:
    for _, s, e in _segments(b):
      assert b['positions'][0][s] == 0 and b['loss_mask'][0][s:e - 1].all()
  assert pipeline.data_stats(it)['tokens/s'] == len(stream)
