"""Image-caption batches for MoonViT pre-training (data/caption_pairs.py) and progressive
resolution (data/resolution_schedule.py)."""

import numpy as np
import pytest

from data_helpers import write_jsonl, write_png
from kimi_vl_jax.data import caption_pairs as cp
from kimi_vl_jax.data.resolution_schedule import ResolutionSchedule

# 64x64 images: max 9 patches/image -> 48x48 -> padded 56x56 = 16 patches; max 36 -> 64x64 ->
# padded 84x84 = 36 patches (data/images.py).
SMALL, LARGE = 9, 36


@pytest.fixture
def caption_file(tmp_path):
  recs = []
  for k in range(12):
    write_png(str(tmp_path / 'img' / f'{k}.png'), (64, 64), seed=k)
    recs.append({'image': f'img/{k}.png', 'caption': f'A shape number {k}' + ' big' * (k % 3)})
  return write_jsonl(str(tmp_path / 'captions.jsonl'), recs), recs


def _iterator(path, tok, schedule=SMALL, **kw):
  cfg = cp.CaptionBatchConfig(batch_size=2, max_patches=48, max_images=3, caption_len=64,
                              text_len=6)
  return cp.CaptionPairIterator(path, tok, cfg, schedule, **kw)


def test_schedule():
  s = ResolutionSchedule([(0, 64), (100, 256), (1000, 1024)])
  assert [s(x) for x in (0, 99, 100, 999, 1000, 10 ** 6)] == [64, 64, 256, 256, 1024, 1024]
  assert ResolutionSchedule.from_config('0:64,100:256').stages == ((0, 64), (100, 256))
  assert ResolutionSchedule.from_config(128)(5) == 128
  for bad in ([(1, 64)], [(0, 64), (0, 128)], [(0, 2)], '0-64'):
    with pytest.raises(ValueError):
      ResolutionSchedule.from_config(bad)


def test_batch_layout_pairs_images_with_their_captions(caption_file, tok):
  path, recs = caption_file
  it = _iterator(path, tok)
  batch = next(it)
  assert set(batch) == set(cp.batch_keys()) | {'_stats'}
  assert batch['patches'].shape == (2, 48, 588) and batch['text_tokens'].shape == (2, 3, 6)
  # 16-patch images: 3 per row fill 48 patches; three captions fit in 64 tokens.
  np.testing.assert_array_equal(batch['image_valid'], np.ones((2, 3)))
  np.testing.assert_array_equal(batch['image_grid_hws'], np.full((2, 3, 2), 4))
  order = it._permutation(0)
  k = 0
  for row in range(2):
    for image in (1, 2, 3):
      rec = recs[order[k]]
      k += 1
      assert (batch['patch_image_ids'][row] == image).sum() == 16
      caption = batch['caption_tokens'][row][batch['caption_image_ids'][row] == image]
      want = [tok.special['[BOS]']] + tok.encode(rec['caption']) + [tok.special['[EOS]']]
      np.testing.assert_array_equal(caption, want)
      text = tok.encode(rec['caption'])[:6]
      np.testing.assert_array_equal(batch['text_tokens'][row, image - 1, :len(text)], text)
      pos = batch['caption_positions'][row][batch['caption_image_ids'][row] == image]
      np.testing.assert_array_equal(pos, np.arange(len(want)))
  assert batch['_stats']['images'] == 6 and batch['_stats']['max_patches_per_image'] == SMALL


def test_targets_match_the_decoders_rule(caption_file, tok):
  from kimi_vl_jax.model import caption_decoder
  path, _ = caption_file
  batch = next(_iterator(path, tok))
  targets, mask = caption_decoder.caption_targets(batch['caption_tokens'],
                                                  batch['caption_image_ids'])
  np.testing.assert_array_equal(batch['caption_targets'], np.asarray(targets))
  np.testing.assert_array_equal(batch['caption_loss_mask'], np.asarray(mask))


def test_progressive_resolution_fewer_larger_images_per_row(caption_file, tok):
  path, _ = caption_file
  it = _iterator(path, tok, schedule=[(0, SMALL), (2, LARGE)])
  sizes = []
  for _ in range(3):
    b = next(it)
    sizes.append((b['_stats']['max_patches_per_image'], b['_stats']['images'],
                  sorted({int(h) for h in b['image_grid_hws'][..., 0].ravel() if h})))
  assert sizes[0] == (SMALL, 6, [4]) and sizes[1] == (SMALL, 6, [4])
  assert sizes[2] == (LARGE, 2, [6])           # one 36-patch image per 48-patch row


def test_resume_and_oversize_skip(caption_file, tok):
  path, _ = caption_file
  a = _iterator(path, tok, seed=3)
  next(a)
  state = a.get_state()
  want = next(a)
  b = _iterator(path, tok, seed=3)
  b.set_state(state)
  got = next(b)
  for key in cp.batch_keys():
    np.testing.assert_array_equal(got[key], want[key])
  assert got['_stats'] == want['_stats']
  cfg = cp.CaptionBatchConfig(batch_size=1, max_patches=32, max_images=2, caption_len=40,
                              text_len=4)
  with pytest.raises(ValueError, match='every caption record was skipped'):
    next(cp.CaptionPairIterator(path, tok, cfg, LARGE))   # 36 patches never fit 32


def test_missing_image_is_counted(tmp_path, tok):
  write_png(str(tmp_path / 'a.png'), (28, 28))
  path = write_jsonl(str(tmp_path / 'c.jsonl'), [{'image': 'a.png', 'caption': 'a'},
                                                 {'image': 'gone.png', 'caption': 'b'}])
  cfg = cp.CaptionBatchConfig(batch_size=1, max_patches=8, max_images=2, caption_len=10,
                              text_len=4)
  batch = next(cp.CaptionPairIterator(path, tok, cfg, 16))
  assert batch['_stats']['skipped_missing_image'] >= 1
  with pytest.raises(ValueError, match='caption'):
    cp.read_records(write_jsonl(str(tmp_path / 'bad.jsonl'), [{'image': 'a.png'}]))


def test_long_captions_are_cut_to_the_row(tmp_path, tok):
  write_png(str(tmp_path / 'a.png'), (28, 28))
  long = ' '.join(['circle'] * 40)
  path = write_jsonl(str(tmp_path / 'c.jsonl'), [{'image': 'a.png', 'caption': long}])
  cfg = cp.CaptionBatchConfig(batch_size=1, max_patches=8, max_images=2, caption_len=10,
                              text_len=4)
  batch = next(cp.CaptionPairIterator(path, tok, cfg, 16))
  assert batch['_stats']['truncated_captions'] == 1 and batch['_stats']['images'] == 1
  np.testing.assert_array_equal(batch['caption_image_ids'][0], np.ones(10))
  assert batch['caption_tokens'][0, 0] == tok.special['[BOS]']
  assert tok.special['[EOS]'] not in batch['caption_tokens'][0]
  assert batch['caption_loss_mask'][0].sum() == 9


def test_the_demo_captions(tok):
  """The bundled easy-vqa captions ("A blue circle.", 64x64 images) pack as the tiny configs
  would: 16-patch images at a budget of 9 patches, 36 at 36."""
  from kimi_vl_jax.data import build_demo
  path = build_demo.resolve_path('demo:easy_vqa/captions_train.jsonl')
  cfg = cp.CaptionBatchConfig(batch_size=2, max_patches=64, max_images=4, caption_len=32,
                              text_len=8)
  it = cp.CaptionPairIterator(path, tok, cfg, [(0, SMALL), (1, LARGE)])
  small, large = next(it), next(it)
  assert small['_stats']['images'] == 8 and large['_stats']['images'] == 2
  text = tok.decode(small['text_tokens'][0, 0][small['text_tokens'][0, 0] != tok.special['[PAD]']])
  assert text.startswith('A ') and text.endswith('.')
