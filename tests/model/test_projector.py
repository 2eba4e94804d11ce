"""Projector vs the PyTorch reference (tests/reference/make_vision_fixtures.py) and the 2x2 merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from kimi_vl_jax.checkpoint import hf_mapping
from kimi_vl_jax.model import projector as projector_lib
from kimi_vl_jax.model import vision
from test_vision import CASES, fixture, vision_and_projector_params

TOL = 1e-5


@pytest.mark.parametrize('name', CASES)
def test_projector_matches_reference(name):
  config, tensors, arrays, meta = fixture()
  assert meta['projector_ln_eps'] == config.projector_ln_eps
  assert meta['text_hidden_size'] == config.text.hidden_size
  params = vision_and_projector_params(tensors, config)['projector']
  grids = arrays[f'{name}/grid_hws']
  # The reference vision output (HF order) put into merge order, as the model would hold it.
  order = np.argsort(vision.hf_order(grids))
  x = arrays[f'{name}/vision_out'][order][None]
  out = projector_lib.Projector(config).apply({'params': params}, jnp.asarray(x))
  ref = arrays[f'{name}/projector_out']
  assert out.shape == (1,) + ref.shape
  err = np.abs(np.asarray(out[0]) - ref).max()
  assert err < TOL, f'{name}: max |jax - torch| = {err}'


def test_merge_patches_order():
  """Merged token k = its window's 4 patches concatenated in (top-left, top-right, bottom-left,
  bottom-right) order, given patches in merge order."""
  h, w, d = 4, 6, 3
  img = np.arange(h * w * d, dtype=np.float32).reshape(h, w, d)     # value encodes (r, c, ch)
  packed = vision.pack_hf_images(np.zeros((h * w, 3, 14, 14)), np.array([[h, w]]))
  rows, cols = packed['patch_coords'][0].T
  merged = np.asarray(projector_lib.merge_patches(jnp.asarray(img[rows, cols][None])))
  assert merged.shape == (1, h * w // 4, 4 * d)
  # Kimi-VL's patch_merger: [h, w, D] -> [h/2, 2, w/2, 2, D] -> [h/2, w/2, 2, 2, D].
  want = img.reshape(h // 2, 2, w // 2, 2, d).transpose(0, 2, 1, 3, 4).reshape(-1, 4 * d)
  np.testing.assert_array_equal(merged[0], want)
  with pytest.raises(ValueError, match='not a multiple of the merge window'):
    projector_lib.merge_patches(jnp.zeros((1, 6, d)))


def test_projector_params_and_axes():
  config = fixture()[0]
  boxed = jax.eval_shape(lambda: projector_lib.Projector(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, config.vision.hidden_size))))['params']
  flat = hf_mapping.flatten(jax.tree.map(lambda x: x.value.shape, boxed,
                                         is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  want = {k[1:]: v for k, v in hf_mapping.param_shapes(config).items() if k[0] == 'projector'}
  assert flat == want
  axes = hf_mapping.flatten(nn.get_partition_spec(boxed))
  assert tuple(axes[('linear_1', 'kernel')]) == ('mm_embed', 'mlp')
  assert tuple(axes[('linear_2', 'kernel')]) == ('mlp', 'embed')
  with pytest.raises(ValueError, match='projector input must be'):
    projector_lib.Projector(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 5)))


def test_whole_model_fixture_image_features():
  """kimi_vl_tiny (sharded Kimi-VL checkpoint): config == tiny(), and MoonViT + Projector on its
  HF-order pixel_values reproduce the reference's projected image features."""
  import os
  from kimi_vl_jax.checkpoint import hf
  from kimi_vl_jax.model import config as config_lib
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures',
                      'kimi_vl_tiny')
  assert os.path.exists(os.path.join(path, 'model.safetensors.index.json'))
  config, params = hf.load(path)
  assert config == config_lib.tiny()
  with np.load(os.path.join(path, 'inputs.npz')) as f:
    inputs = dict(f)
  with np.load(os.path.join(path, 'outputs.npz')) as f:
    want = f['image_features']
  batch = vision.pack_hf_images(inputs['pixel_values'].astype(np.float32),
                                inputs['image_grid_hws'])
  assert int((inputs['input_ids'] == config.media_placeholder_token_id).sum()) == len(want)

  def encode(p, b):
    feats = vision.MoonViT(config.vision).apply(
        {'params': p['vision_tower']}, b['patches'], b['patch_coords'], b['patch_image_ids'],
        b['image_grid_hws'])
    return projector_lib.Projector(config).apply({'params': p['projector']}, feats)

  got = np.asarray(jax.jit(encode)(params, batch))[0]
  err = np.abs(got - want).max()
  assert err < TOL, f'max |jax - torch| = {err}'
