"""Kimi-VL image preprocessing: resize over the limit, pad to 28, normalise, merge-order patches."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax.data import images as im


def _ref_row_major(x, p=14):
  """The reference's patchify: [H, W, C] -> [h*w, C, p, p] row-major over the patch grid."""
  hh, ww, c = x.shape
  t = x.transpose(2, 0, 1).reshape(c, hh // p, p, ww // p, p).transpose(1, 3, 0, 2, 4)
  return t.reshape(-1, c, p, p)


def test_merge_order_matches_reference_patches():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(56, 84, 3)).astype(np.float32)
  patches, coords = im.patchify(x)
  ref = _ref_row_major(x)  # [24, 3, 14, 14], grid (4, 6)
  h, w = 4, 6
  assert patches.shape == (24, 588) and coords.shape == (24, 2)
  for k in range(24):
    r, c = coords[k]
    np.testing.assert_array_equal(patches[k], ref[r * w + c].reshape(-1))  # (channel, y, x)
  # Windows row-major, four patches each in TL, TR, BL, BR order.
  assert coords[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
  assert coords[12:16].tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]
  perm = im.merge_order_permutation(h, w)
  np.testing.assert_array_equal(ref.reshape(24, -1)[perm], patches)


def test_resize_over_limit_pad_and_normalise():
  cfg = im.ImageConfig(max_patches=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
  img = Image.new('RGB', (200, 150), (255, 255, 255))
  patches, coords, (h, w) = im.preprocess(img, cfg)
  scale = math.sqrt(16 / ((200 // 14) * (150 // 14)))
  nw, nh = int(200 * scale), int(150 * scale)  # bicubic-resized, then zero-padded to 28
  assert (h, w) == (math.ceil(nh / 28) * 2, math.ceil(nw / 28) * 2)
  assert patches.shape == (h * w, 588) and patches.dtype == np.float32
  # Unpack the merge order back to pixels to check values.
  pix = np.zeros((h * 14, w * 14, 3), np.float32)
  for k, (r, c) in enumerate(coords):
    pix[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = patches[k].reshape(3, 14, 14).transpose(1, 2, 0)
  white = (1 - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 0.25, 1.0])
  pad = (0 - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 0.25, 1.0])
  np.testing.assert_allclose(pix[nh // 2, nw // 2], white, atol=1e-5)
  np.testing.assert_allclose(pix[-1, -1], pad, atol=1e-6)
  np.testing.assert_allclose(pix[nh:, :].reshape(-1, 3), np.broadcast_to(pad, (pix[nh:].size // 3, 3)),
                             atol=1e-6)
  # Under the limit: no resize, only padding (64 -> 84: 6x6 patches, 9 tokens).
  _, _, hw = im.preprocess(Image.new('RGB', (64, 64)), im.ImageConfig())
  assert hw == (6, 6) and im.num_image_tokens(hw) == 9


def test_augmentation_is_deterministic_given_the_seed():
  cfg = im.ImageConfig(augment=True, scale_min=0.5, scale_max=1.5, hflip_prob=0.5)
  img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 90, 3), np.uint8))
  a = im.preprocess(img, cfg, np.random.default_rng(7))
  b = im.preprocess(img, cfg, np.random.default_rng(7))
  np.testing.assert_array_equal(a[0], b[0])
  outs = {im.preprocess(img, cfg, np.random.default_rng(s))[0].tobytes() for s in range(6)}
  assert len(outs) > 1
  plain = im.preprocess(img, im.ImageConfig(), None)
  assert plain[2] == (6, 8)  # 60x90 -> 84x112


def _save(img, path, **kw):
  img.save(path, **kw)
  return str(path)


def test_unusual_images_are_converted(tmp_path):
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 255, (28, 56, 3), np.uint8))
  files = {
      'gray': _save(rgb.convert('L'), tmp_path / 'gray.png'),
      'la': _save(rgb.convert('LA'), tmp_path / 'la.png'),
      'palette': _save(rgb.convert('P'), tmp_path / 'pal.png', transparency=0),
      'cmyk': _save(rgb.convert('CMYK'), tmp_path / 'cmyk.jpg'),
      'bits16': _save(Image.fromarray((rng.integers(0, 65535, (28, 56))).astype(np.uint16)),
                      tmp_path / 'b16.png'),
      'tiny': _save(Image.new('RGB', (1, 1), (9, 9, 9)), tmp_path / 'tiny.png'),
      'huge': _save(Image.new('RGB', (3000, 2000), (200, 10, 10)), tmp_path / 'huge.png'),
      'huge_jpeg': _save(Image.new('RGB', (4000, 3000), (10, 200, 10)), tmp_path / 'huge.jpg'),
      'long': _save(Image.new('RGB', (9000, 20), (1, 2, 3)), tmp_path / 'long.png'),
  }
  rgba = np.zeros((28, 56, 4), np.uint8)
  rgba[..., 3] = 0  # fully transparent -> white after compositing
  files['rgba'] = _save(Image.fromarray(rgba, 'RGBA'), tmp_path / 'rgba.png')
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  files['exif'] = _save(rgb, tmp_path / 'exif.jpg', exif=exif)
  cfg = im.ImageConfig()
  grids = {}
  for name, path in files.items():
    img = im.load_image(path, draft_limit=cfg.max_patches)
    assert img.mode == 'RGB', name
    patches, coords, hw = im.preprocess(img, cfg)
    assert patches.shape == (hw[0] * hw[1], 588) and np.isfinite(patches).all(), name
    assert hw[0] % 2 == 0 and hw[1] % 2 == 0 and hw[0] < 512 and hw[1] < 512, name
    if name.startswith('huge'):  # resized to the 4096-patch limit (padding adds < 2 rows/cols)
      assert hw[0] * hw[1] > 3000 and (hw[0] - 2) * (hw[1] - 2) <= 4096, (name, hw)
    grids[name] = hw
  assert grids['exif'] == (4, 2)  # 56 wide x 28 high, rotated to 28 x 56
  assert grids['tiny'] == (2, 2)
  assert grids['long'][1] < 512
  white = np.asarray(im.load_image(files['rgba']))
  assert (white == 255).all()
  g16 = np.asarray(im.load_image(files['bits16']))
  assert g16.max() > 200 and g16.min() < 50  # rescaled from 16 bits, not clipped to 255


def test_bad_images_raise_with_reason(tmp_path):
  with pytest.raises(im.BadImage) as e:
    im.load_image(str(tmp_path / 'missing.png'))
  assert e.value.reason == 'missing_image'
  junk = tmp_path / 'junk.png'
  junk.write_bytes(os.urandom(300))
  with pytest.raises(im.BadImage) as e:
    im.load_image(str(junk))
  assert e.value.reason == 'corrupt_image'
  good = _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)),
               tmp_path / 'full.png')
  data = open(good, 'rb').read()
  cut = tmp_path / 'cut.png'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(im.BadImage) as e:
    im.load_image(str(cut))
  assert e.value.reason == 'truncated_image'
  jpg = _save(Image.new('RGB', (100, 100), (5, 5, 5)), tmp_path / 'full.jpg')
  data = open(jpg, 'rb').read()
  cutj = tmp_path / 'cut.jpg'
  cutj.write_bytes(data[:len(data) // 2])
  with pytest.raises(im.BadImage) as e:
    im.load_image(str(cutj))
  assert e.value.reason in ('truncated_image', 'corrupt_image')


def test_image_config_from_config():
  c = im.ImageConfig.from_config({'max_patches': 9, 'mean': [0.5] * 3,
                                  'augment': {'enabled': True, 'hflip_prob': 0.5}})
  assert c.max_patches == 9 and c.mean == (0.5, 0.5, 0.5) and c.augment and c.hflip_prob == 0.5
  with pytest.raises(ValueError, match='unknown fields'):
    im.ImageConfig.from_config({'max_pathces': 9})
