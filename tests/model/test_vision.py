"""MoonViT vs the PyTorch reference (tests/reference/make_vision_fixtures.py) and its invariants."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file

from kimi_vl_jax.checkpoint import hf_mapping
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model import vision

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures',
                       'vision_tiny')
TOL = 1e-5  # measured ~1.3e-6


@functools.lru_cache(maxsize=None)
def fixture():
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    meta = json.load(f)
  config = config_lib.tiny()
  vc = config_lib.from_hf_dict({'vision_config': meta['vision_config'], 'text_config': {}}).vision
  assert vc == config.vision, (vc, config.vision)  # the fixture is tiny().vision
  tensors = load_file(os.path.join(FIXTURE, 'model.safetensors'))
  with np.load(os.path.join(FIXTURE, 'cases.npz')) as f:
    arrays = dict(f)
  return config, tensors, arrays, meta


def vision_and_projector_params(tensors, config):
  """`vision_tower` + `projector` subtrees via the checkpoint mapping table (vision rules only)."""
  shapes = hf_mapping.param_shapes(config)
  out = {}
  for key, slot in hf_mapping.expand(hf_mapping.vision_rules(config), config):
    path = slot.rule.path
    if path not in out:
      out[path] = np.zeros(shapes[path], np.float32)
    slice_shp = hf_mapping.slice_shape(slot.rule, shapes[path])
    assert tensors[key].shape == hf_mapping.hf_shape(slot.rule, slice_shp), key
    out[path][slot.index] = hf_mapping.to_param(slot.rule, tensors[key], slice_shp)
  assert len(out) == len([k for k in shapes if k[0] in ('vision_tower', 'projector')])
  return hf_mapping.unflatten(out)


def case_pixels(arrays, name):
  """Unpacks the fixture's nibble-packed pixel pool; the case uses its first L patches."""
  packed = arrays['pixel_nibbles']
  q = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1, 3, 14, 14)
  grids = arrays[f'{name}/grid_hws']
  n = int((grids[:, 0] * grids[:, 1]).sum())
  return (q[:n].astype(np.float32) - 7.5) / 4, grids


@functools.lru_cache(maxsize=None)
def apply_fn(dtype=jnp.float32, scan_layers=True, remat='none'):
  config = fixture()[0]
  model = vision.MoonViT(config.vision, dtype=dtype, scan_layers=scan_layers, remat_policy=remat)
  return model, jax.jit(lambda p, *a: model.apply({'params': p}, *a))


def params():
  config, tensors = fixture()[:2]
  return vision_and_projector_params(tensors, config)['vision_tower']


def run(batch, p=None, **kw):
  _, fn = apply_fn(**kw)
  return np.asarray(fn(params() if p is None else p, batch['patches'], batch['patch_coords'],
                       batch['patch_image_ids'], batch['image_grid_hws']))


CASES = ('nonsquare_6x10', 'grid_16x16', 'upsample_20x18', 'packed_4x8_10x6')


@pytest.mark.parametrize('name', CASES)
def test_vision_tower_matches_reference(name):
  _, _, arrays, _ = fixture()
  pixels, grids = case_pixels(arrays, name)
  out = run(vision.pack_hf_images(pixels, grids))[0]           # merge order
  out_hf = out[vision.hf_order(grids)]
  ref = arrays[f'{name}/vision_out']
  assert out_hf.shape == ref.shape
  err = np.abs(out_hf - ref).max()
  assert err < TOL, f'{name}: max |jax - torch| = {err}'


def test_params_match_param_tree_and_axes():
  config = fixture()[0]
  model = vision.MoonViT(config.vision)
  batch = vision.pack_hf_images(np.zeros((8, 3, 14, 14)), np.array([[2, 4]]))
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *batch.values()))['params']
  shapes = {k[1:]: v for k, v in hf_mapping.param_shapes(config).items()
            if k[0] == 'vision_tower'}
  flat = hf_mapping.flatten(jax.tree.map(lambda x: x.value.shape, boxed,
                                         is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  assert flat == shapes
  axes = hf_mapping.flatten(nn.get_partition_spec(boxed))
  assert tuple(axes[('blocks', 'wqkv', 'kernel')]) == (
      'layers', 'vit_embed', 'vit_qkv', 'vit_heads', 'vit_kv')
  assert tuple(axes[('blocks', 'wo', 'kernel')]) == ('layers', 'vit_heads', 'vit_kv', 'vit_embed')
  assert tuple(axes[('patch_embed', 'kernel')]) == ('patch', 'vit_embed')
  assert tuple(axes[('pos_emb',)]) == (None, None, 'vit_embed')


# ------------------------------------------------------------------------------------------
# Bicubic position-embedding resize.

def torch_upsample_bicubic2d(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """numpy port of PyTorch's CPU `upsample_bicubic2d` (align_corners=False, A=-0.75).

  grid [C, H, W]. Mirrors aten/src/ATen/native/UpSample.h: scale = in / out (float),
  real = scale * (dst + 0.5) - 0.5 (not clamped for cubic), t = real - floor(real), taps
  floor - 1 .. floor + 2 read with `upsample_get_value_bounded` (clamped), and the same-size
  shortcut (plain copy).
  """
  c, h, w = grid.shape
  if (h, w) == (out_h, out_w):
    return grid.copy()
  a = np.float32(-0.75)

  def coeffs(t):
    cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return [cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)]

  out = np.zeros((c, out_h, out_w), np.float64)
  sh, sw = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
  for oy in range(out_h):
    ry = np.float32(sh * np.float32(oy + 0.5) - np.float32(0.5))
    iy = int(np.floor(ry))
    cy = coeffs(np.float32(ry - iy))
    for ox in range(out_w):
      rx = np.float32(sw * np.float32(ox + 0.5) - np.float32(0.5))
      ix = int(np.floor(rx))
      cx = coeffs(np.float32(rx - ix))
      for i in range(4):
        for j in range(4):
          yy = min(max(iy - 1 + i, 0), h - 1)
          xx = min(max(ix - 1 + j, 0), w - 1)
          out[:, oy, ox] += cy[i] * cx[j] * grid[:, yy, xx]
  return out.astype(np.float32)


def jax_resize(grid_chw: np.ndarray, h: int, w: int) -> np.ndarray:
  """`interpolate_pos_emb` evaluated at every (row, col) of an (h, w) image -> [C, h, w]."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  coords = np.stack([rows, cols], -1)
  hw = np.broadcast_to(np.array([h, w]), coords.shape)
  out = jax.jit(vision.interpolate_pos_emb)(jnp.asarray(grid_chw.transpose(1, 2, 0)),
                                             jnp.asarray(coords), jnp.asarray(hw))
  return np.asarray(out).transpose(2, 0, 1)


def test_pos_emb_bicubic_matches_pytorch_for_odd_sizes():
  arrays = fixture()[2]
  grid = arrays['interp/grid']
  sizes = [tuple(int(v) for v in k.split('/')[1].split('x')) for k in arrays
           if k.startswith('interp/') and k != 'interp/grid']
  assert len(sizes) >= 5 and any(h % 2 and w % 2 for h, w in sizes)
  for h, w in sizes:
    torch_out = arrays[f'interp/{h}x{w}']
    numpy_out = torch_upsample_bicubic2d(grid, h, w)
    jax_out = jax_resize(grid, h, w)
    assert np.abs(numpy_out - torch_out).max() < 1e-5, (h, w)   # the port is faithful
    assert np.abs(jax_out - torch_out).max() < 1e-5, (h, w)
    assert np.abs(jax_out - numpy_out).max() < 1e-5, (h, w)


def test_pos_emb_identity_at_grid_size_and_not_jax_image_resize():
  rng = np.random.default_rng(0)
  grid = rng.normal(size=(3, 16, 16)).astype(np.float32)
  np.testing.assert_array_equal(jax_resize(grid, 16, 16), grid)
  # jax.image.resize 'bicubic' (Keys a=-0.5, antialiased) is a different function.
  ours = jax_resize(grid, 6, 10)
  theirs = np.asarray(jax.image.resize(jnp.asarray(grid), (3, 6, 10), 'bicubic'))
  assert np.abs(ours - theirs).max() > 1e-2


def test_pos_emb_dynamic_grid_under_jit():
  """One compiled function serves any (h, w): the grid is data, not a shape."""
  rng = np.random.default_rng(1)
  grid = rng.normal(size=(2, 16, 16)).astype(np.float32)
  f = jax.jit(vision.interpolate_pos_emb)
  coords = jnp.array([[2, 3], [5, 1]])
  for h, w in [(6, 10), (20, 18), (7, 9)]:
    out = np.asarray(f(jnp.asarray(grid.transpose(1, 2, 0)), coords,
                       jnp.array([[h, w], [h, w]])))
    want = torch_upsample_bicubic2d(grid, h, w)
    np.testing.assert_allclose(out[0], want[:, 2, 3], atol=1e-5)
    np.testing.assert_allclose(out[1], want[:, 5, 1], atol=1e-5)


# ------------------------------------------------------------------------------------------
# Packing.

def pad_batch(batch, n_pad, n_img_pad, rng):
  """Appends `n_pad` garbage padding patches (id 0) and `n_img_pad` (0, 0) image slots."""
  b = dict(batch)
  b['patches'] = np.concatenate(
      [b['patches'], rng.normal(size=(1, n_pad, 588)).astype(np.float32) * 5], 1)
  b['patch_coords'] = np.concatenate(
      [b['patch_coords'], rng.integers(0, 30, size=(1, n_pad, 2)).astype(np.int32)], 1)
  b['patch_image_ids'] = np.concatenate(
      [b['patch_image_ids'], np.zeros((1, n_pad), np.int32)], 1)
  b['image_grid_hws'] = np.concatenate(
      [b['image_grid_hws'], np.zeros((1, n_img_pad, 2), np.int32)], 1)
  return b


def test_packed_images_equal_each_alone_and_padding_is_inert():
  arrays = fixture()[2]
  pixels, grids = case_pixels(arrays, 'packed_4x8_10x6')
  n0 = int(grids[0, 0] * grids[0, 1])
  together = run(vision.pack_hf_images(pixels, grids))[0]
  alone0 = run(vision.pack_hf_images(pixels[:n0], grids[:1]))[0]
  alone1 = run(vision.pack_hf_images(pixels[n0:], grids[1:]))[0]
  np.testing.assert_allclose(together[:n0], alone0, atol=1e-5)
  np.testing.assert_allclose(together[n0:], alone1, atol=1e-5)
  assert np.abs(alone0[:4] - alone1[:4]).max() > 1e-2  # the images really differ

  rng = np.random.default_rng(0)
  padded = pad_batch(vision.pack_hf_images(pixels, grids), n_pad=12, n_img_pad=2, rng=rng)
  out = run(padded)[0]
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[:len(together)], together, atol=1e-5)


def test_batch_rows_and_patch_order_are_independent():
  """Two rows give each row's own result; shuffling patches within a row permutes the output."""
  arrays = fixture()[2]
  pixels, grids = case_pixels(arrays, 'packed_4x8_10x6')
  n0 = int(grids[0, 0] * grids[0, 1])
  a = vision.pack_hf_images(pixels[:n0], grids[:1])                    # 32 patches
  b = vision.pack_hf_images(pixels[n0:n0 + 16], np.array([[4, 4]]))   # 16 patches
  b = pad_batch(b, n_pad=16, n_img_pad=0, rng=np.random.default_rng(1))
  two = {k: np.concatenate([a[k], b[k]], 0) for k in a}
  out = run(two)
  np.testing.assert_allclose(out[0], run(a)[0], atol=1e-5)
  np.testing.assert_allclose(out[1, :16], run(b)[0, :16], atol=1e-5)

  perm = np.random.default_rng(2).permutation(n0)
  shuffled = {k: (v[:, perm] if k != 'image_grid_hws' else v) for k, v in a.items()}
  np.testing.assert_allclose(run(shuffled)[0], run(a)[0][perm], atol=1e-5)


def test_pack_hf_images_merge_order():
  h, w = 4, 6
  pixels = np.arange(h * w, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 14, 14))
  batch = vision.pack_hf_images(pixels, np.array([[h, w]]))
  order = batch['patches'][0, :, 0].astype(int)
  # Windows row-major; inside a window: top-left, top-right, bottom-left, bottom-right.
  assert order[:8].tolist() == [0, 1, 6, 7, 2, 3, 8, 9]
  assert order[12:16].tolist() == [12, 13, 18, 19]
  np.testing.assert_array_equal(batch['patch_coords'][0], np.stack([order // w, order % w], -1))
  assert batch['patch_image_ids'].tolist() == [[1] * 24]
  assert batch['image_grid_hws'].tolist() == [[[4, 6]]]
  np.testing.assert_array_equal(batch['patches'][0][vision.hf_order([[h, w]])],
                                pixels.reshape(24, -1))
  # The flattening is (channel, y, x), i.e. the conv weight's reshape.
  px = np.random.default_rng(0).normal(size=(4, 3, 14, 14)).astype(np.float32)
  got = vision.pack_hf_images(px, np.array([[2, 2]]))['patches'][0]
  np.testing.assert_array_equal(got, px.reshape(4, 588))


def test_pack_hf_images_rejects_bad_input():
  px = np.zeros((12, 3, 14, 14), np.float32)
  with pytest.raises(ValueError, match='multiples of the merge kernel'):
    vision.pack_hf_images(px, np.array([[3, 4]]))
  with pytest.raises(ValueError, match='needs sum'):
    vision.pack_hf_images(px, np.array([[2, 4]]))
  with pytest.raises(ValueError, match=r'pixel_values must be \[L, 3, 14, 14\]'):
    vision.pack_hf_images(np.zeros((12, 588)), np.array([[2, 6]]))
  with pytest.raises(ValueError, match='image_grid_hws must be'):
    vision.pack_hf_images(px, np.array([2, 6]))


# ------------------------------------------------------------------------------------------
# Layer stacking, remat, bf16.

def test_unscanned_matches_scanned():
  arrays = fixture()[2]
  pixels, grids = case_pixels(arrays, 'nonsquare_6x10')
  batch = vision.pack_hf_images(pixels, grids)
  want = run(batch)
  p = params()
  vc = fixture()[0].vision
  unscanned = vision.unstack_block_params(p, vc)
  assert 'blocks' not in unscanned and 'blocks_1' in unscanned
  np.testing.assert_allclose(run(batch, unscanned, scan_layers=False), want, atol=1e-5)
  restacked = vision.stack_block_params(unscanned, vc)
  jax.tree.map(np.testing.assert_array_equal, restacked, p)
  # An unscanned model initialises exactly the unrolled layout.
  model, _ = apply_fn(scan_layers=False)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *batch.values()))['params']
  assert jax.tree.structure(nn.meta.unbox(init)) == jax.tree.structure(unscanned)


@pytest.mark.slow
def test_remat_matches_no_remat_values_and_grads():
  arrays = fixture()[2]
  pixels, grids = case_pixels(arrays, 'nonsquare_6x10')
  batch = vision.pack_hf_images(pixels, grids)
  p = params()
  np.testing.assert_allclose(run(batch, remat='full'), run(batch), atol=1e-5)
  model, _ = apply_fn(remat='full')
  model0, _ = apply_fn()
  loss = lambda m: jax.jit(jax.grad(lambda q: jnp.sum(m.apply({'params': q}, *batch.values())
                                                      ** 2)))
  g1, g0 = loss(model)(p), loss(model0)(p)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4), g1, g0)


def test_bf16_compute_runs_and_stays_close():
  arrays = fixture()[2]
  pixels, grids = case_pixels(arrays, 'packed_4x8_10x6')
  batch = vision.pack_hf_images(pixels, grids)
  out = run(batch, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  ref = arrays['packed_4x8_10x6/vision_out']
  err = np.abs(out.astype(np.float32)[0][vision.hf_order(grids)] - ref)
  # LayerNorm outputs are O(1); bf16 keeps ~3 significant digits through two blocks.
  assert err.max() < 0.08 and err.mean() < 0.01, (err.max(), err.mean())  # measured 0.032, 0.004


# ------------------------------------------------------------------------------------------
# Padding costs no attention.

def test_all_padding_row_costs_no_attention(monkeypatch):
  """Flash MoonViT (the default kernels: blocks skipped row by row): a second, all-padding row
  adds no executed block pair (counted at run time) and changes nothing in the first."""
  from kimi_vl_jax.model import flash
  from kimi_vl_jax.model.kernels import default_kernels
  calls = []
  real = flash._block_logits

  def counting(*args, **kw):
    jax.debug.callback(lambda: calls.append(1))
    return real(*args, **kw)

  monkeypatch.setattr(flash, '_block_logits', counting)
  config = fixture()[0].replace(attention_impl='flash', attention_block_q=16,
                                attention_block_kv=16)
  # Unscanned layers: flax's nn.scan refuses a callback inside its body.
  model = vision.MoonViT(config.vision, scan_layers=False, kernels=default_kernels(config))
  p = vision.unstack_block_params(params(), config.vision)
  fn = jax.jit(lambda *a: model.apply({'params': p}, *a))
  arrays = fixture()[2]
  pixels, grids = case_pixels(arrays, 'packed_4x8_10x6')          # 32 + 60 patches
  one = pad_batch(vision.pack_hf_images(pixels, grids), n_pad=36, n_img_pad=2,
                  rng=np.random.default_rng(1))                      # P = 128
  text_only = {k: np.zeros_like(v) for k, v in one.items()}
  two = {k: np.concatenate([one[k], text_only[k]]) for k in one}
  counts = []
  for batch in (one, two):
    del calls[:]
    out = fn(batch['patches'], batch['patch_coords'], batch['patch_image_ids'],
             batch['image_grid_hws'])
    jax.effects_barrier()
    counts.append(len(calls))
    got = np.asarray(out)[0][:92][vision.hf_order(grids)]
    assert np.abs(got - arrays['packed_4x8_10x6/vision_out']).max() < TOL
    assert np.isfinite(np.asarray(out)).all()
  # Per layer: image 1 (blocks 0-1) 2 x 2 pairs, image 2 (blocks 2-5) 4 x 4; padding none.
  assert counts == [20 * config.vision.num_layers] * 2, counts
