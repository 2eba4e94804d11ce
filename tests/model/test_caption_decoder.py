"""The caption decoder (model/caption_decoder.py) on packed rows: shapes, causality inside a
caption, and each caption seeing only its own image's patches and its own earlier tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model import caption_decoder as cd

CFG = cd.get_caption_preset('tiny')
B, T, P = 2, 12, 10


def _batch():
  """Row 0: image 1 = patches 0-5 with caption tokens 0-4, image 2 = patches 6-8 with caption
  tokens 5-9, padding after. Row 1: one image (patches 0-9), caption tokens 0-6."""
  r = np.random.default_rng(0)
  tokens = r.integers(1, CFG.vocab_size, size=(B, T)).astype(np.int32)
  cap_ids = np.zeros((B, T), np.int32)
  cap_ids[0, :5], cap_ids[0, 5:10], cap_ids[1, :7] = 1, 2, 1
  positions = np.zeros((B, T), np.int32)
  positions[0, :5], positions[0, 5:10], positions[1, :7] = np.arange(5), np.arange(5), np.arange(7)
  patch_ids = np.zeros((B, P), np.int32)
  patch_ids[0, :6], patch_ids[0, 6:9], patch_ids[1, :] = 1, 2, 1
  feats = r.normal(size=(B, P, CFG.vision_dim)).astype(np.float32)
  return tokens, positions, cap_ids, feats, patch_ids


@pytest.fixture(scope='module')
def model_and_params():
  model = cd.CaptionDecoder(CFG)
  # An 'rbg' key: XLA:CPU compiles its init several times faster than threefry's.
  params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), *_batch())['params']
  apply = jax.jit(lambda p, *a: model.apply({'params': p}, *a))
  return apply, params


def test_shapes_and_dtype(model_and_params):
  apply, params = model_and_params
  logits = apply(params, *_batch())
  assert logits.shape == (B, T, CFG.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_causal_within_a_caption(model_and_params):
  apply, params = model_and_params
  tokens, positions, cap_ids, feats, patch_ids = _batch()
  base = np.asarray(apply(params, tokens, positions, cap_ids, feats, patch_ids))
  changed = tokens.copy()
  changed[0, 3] = (changed[0, 3] + 1) % CFG.vocab_size          # token 3 of caption 1
  out = np.asarray(apply(params, changed, positions, cap_ids, feats, patch_ids))
  np.testing.assert_array_equal(out[0, :3], base[0, :3])           # earlier tokens: unchanged
  assert np.abs(out[0, 3:5] - base[0, 3:5]).max() > 1e-4          # it and later ones: changed
  np.testing.assert_array_equal(out[0, 5:], base[0, 5:])          # the other caption: unchanged
  np.testing.assert_array_equal(out[1], base[1])


def test_a_caption_sees_only_its_own_image(model_and_params):
  apply, params = model_and_params
  tokens, positions, cap_ids, feats, patch_ids = _batch()
  base = np.asarray(apply(params, tokens, positions, cap_ids, feats, patch_ids))
  other = feats.copy()
  other[0, 6:9] = np.random.default_rng(1).normal(size=(3, CFG.vision_dim))  # image 2, row 0
  out = np.asarray(apply(params, tokens, positions, cap_ids, other, patch_ids))
  np.testing.assert_array_equal(out[0, :5], base[0, :5])           # caption of image 1
  assert np.abs(out[0, 5:10] - base[0, 5:10]).max() > 1e-4        # caption of image 2
  np.testing.assert_array_equal(out[1], base[1])                   # the other row
  padding = feats.copy()
  padding[0, 9] = np.random.default_rng(2).normal(size=CFG.vision_dim)  # a padding patch
  out = np.asarray(apply(params, tokens, positions, cap_ids, padding, patch_ids))
  np.testing.assert_array_equal(out[0, :10], base[0, :10])


def test_targets_stop_at_each_captions_end():
  tokens = np.array([[5, 6, 7, 8, 9, 0]])
  ids = np.array([[1, 1, 1, 2, 2, 0]])
  targets, mask = cd.caption_targets(tokens, ids)
  np.testing.assert_array_equal(np.asarray(targets), [[6, 7, 0, 9, 0, 0]])
  np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 0, 1, 0, 0]])


def test_presets_and_bad_inputs(model_and_params):
  apply, params = model_and_params
  shapes = jax.eval_shape(lambda: cd.CaptionDecoder(cd.get_caption_preset('so400m')).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32),
      jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 4, 1152)), jnp.ones((1, 4), jnp.int32)))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert round(n / 1e5) == 822, n                                 # the docstrings' 82.2M
  with pytest.raises(ValueError, match='unknown'):
    cd.get_caption_preset('huge')
  tokens, positions, cap_ids, feats, patch_ids = _batch()
  with pytest.raises(ValueError, match='image_features'):
    apply(params, tokens, positions, cap_ids, feats[..., :8], patch_ids)
