"""The MoonViT pre-training model (model/vit_pretrain.py): its parameter tree is the one
checkpoint/siglip.py fills, its MoonViT the Kimi-VL preset's, and its outputs are the parts'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from kimi_vl_jax.checkpoint import siglip
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.caption_decoder import CaptionDecoder, get_caption_preset
from kimi_vl_jax.model.kimi_vl import init_params as kimi_vl_init
from kimi_vl_jax.model.siglip_text import SiglipTextTower
from kimi_vl_jax.model.vit_pretrain import VitPretrain, VitPretrainConfig, dummy_batch, init_params

TEXT = config_lib.SiglipTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_layers=2, num_heads=4, max_position_embeddings=8,
                                   projection_size=64)


def _config():
  mc = config_lib.get_preset('tiny')
  return VitPretrainConfig(mc, TEXT, get_caption_preset('tiny', vocab_size=64, vision_dim=64))


def _shapes(tree):
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in
          jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]}


@pytest.fixture(scope='module')
def params():
  return jax.jit(lambda r: nn.meta.unbox(init_params(_config(), r)))(jax.random.PRNGKey(0))


@pytest.mark.slow   # the fixture compiles the whole model's init: ~20-60 s on a loaded 2-core CPU
def test_tree_is_what_the_siglip_conversion_fills_and_moonvit_is_kimi_vls(params):
  cfg = _config()
  assert sorted(params) == ['caption_decoder', 'image_pooling', 'siglip_loss', 'text_tower',
                            'vision_tower']
  want = siglip.param_shapes(cfg.vision, cfg.text_tower)
  got = {tuple(k.strip("[]'").split("']['")): v for k, v in _shapes(params).items()}
  for path, shape in want.items():
    assert got[path] == tuple(shape), path
  assert set(want) == {p for p in got if p[0] != 'caption_decoder'}
  # The same MoonViT subtree as KimiVL's: a later stage loads it as is.
  kv = jax.eval_shape(lambda r: kimi_vl_init(cfg.model, r), jax.random.PRNGKey(0))
  assert _shapes(kv['vision_tower']) == _shapes(params['vision_tower'])
  np.testing.assert_allclose(params['siglip_loss']['log_temperature'], np.log(10.0), rtol=1e-6)
  assert float(params['siglip_loss']['bias']) == -10.0


@pytest.mark.slow
def test_outputs_are_the_parts(params):
  cfg = _config()
  b = dummy_batch(cfg, rows=2, max_patches=8, max_images=2, caption_len=6, text_len=5)
  rng = np.random.default_rng(0)
  b['patches'] = jnp.asarray(rng.normal(size=b['patches'].shape), jnp.float32)
  b['patch_image_ids'] = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]])
  b['patch_coords'] = jnp.asarray(np.tile([[0, 0], [0, 1], [1, 0], [1, 1]], (2, 2, 1)))
  b['image_grid_hws'] = jnp.asarray([[[2, 2], [2, 2]], [[2, 2], [0, 0]]])
  b['text_tokens'] = jnp.asarray(rng.integers(0, 64, size=(2, 2, 5)), jnp.int32)
  b['caption_tokens'] = jnp.asarray(rng.integers(0, 64, size=(2, 6)), jnp.int32)
  b['caption_image_ids'] = jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0]])
  b['caption_positions'] = jnp.asarray([[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 0, 0]])
  model = VitPretrain(cfg)
  out = jax.jit(lambda p, b: model.apply({'params': p}, b))(params, b)
  assert out['zimg'].shape == (2, 2, 64) and out['ztxt'].shape == (2, 2, 64)
  assert out['caption_logits'].shape == (2, 6, 64)
  np.testing.assert_array_equal(out['zimg'][1, 1], 0.0)          # the empty image slot
  ztxt = jax.jit(lambda p, t: SiglipTextTower(TEXT).apply({'params': p}, t))(
      params['text_tower'], b['text_tokens'].reshape(4, 5))
  np.testing.assert_allclose(out['ztxt'].reshape(4, -1), ztxt, rtol=1e-5, atol=1e-6)
  feats = jax.jit(lambda p, b: model.apply(
      {'params': p}, b['patches'], b['patch_coords'], b['patch_image_ids'], b['image_grid_hws'],
      True, method=VitPretrain.embed_images)[1])(params, b)
  logits = jax.jit(lambda p, b, f: CaptionDecoder(cfg.caption).apply(
      {'params': p}, b['caption_tokens'], b['caption_positions'], b['caption_image_ids'], f,
      b['patch_image_ids']))(params['caption_decoder'], b, feats)
  np.testing.assert_allclose(out['caption_logits'], logits, rtol=1e-5, atol=1e-5)


def test_mismatched_widths_are_refused():
  mc = config_lib.get_preset('tiny')
  with pytest.raises(ValueError, match='projection_size to 64'):
    VitPretrainConfig(mc, config_lib.siglip_tiny_text().__class__(projection_size=32),
                      get_caption_preset('tiny'))
  with pytest.raises(ValueError, match='vision_dim to 64'):
    VitPretrainConfig(mc, TEXT, get_caption_preset('tiny', vision_dim=96))
