"""SigLIP -> MoonViT / pooling head / text tower / loss scalars (checkpoint/siglip.py) against
the tiny transformers `SiglipModel` of tests/reference/make_siglip_fixtures.py."""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from kimi_vl_jax.checkpoint import hf_mapping, siglip
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model import image_pooling, siglip_text, vision

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures',
                       'siglip_tiny')
TOL = 1e-5


@functools.lru_cache(maxsize=None)
def fixture():
  with open(os.path.join(FIXTURE, 'config.json')) as f:
    meta = json.load(f)
  tensors = load_file(os.path.join(FIXTURE, 'model.safetensors'))
  with np.load(os.path.join(FIXTURE, 'cases.npz')) as f:
    arrays = dict(f)
  return meta, tensors, arrays


@functools.lru_cache(maxsize=None)
def loaded(height=None, width=None, eps=None):
  """`siglip.load` of the fixture, optionally into a MoonViT with another grid / LayerNorm eps."""
  vc = None
  if height is not None:
    default = siglip.configs_from_hf_dict(fixture()[0])[0]
    vc = dataclasses.replace(default, pos_emb_height=height, pos_emb_width=width,
                             layer_norm_eps=eps)
  return siglip.load(FIXTURE, vision_config=vc)


def pixels():
  packed = fixture()[2]['pixel_nibbles']
  size = fixture()[0]['vision_config']['image_size']
  q = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1, 3, size, size)
  return (q.astype(np.float32) - 7.5) / 4


def patchify(images, p=14):
  """[N, 3, S, S] -> HF pixel_values [N * G * G, 3, p, p], row-major patches per image."""
  n, c, s, _ = images.shape
  g = s // p
  return images.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)


def packed_batch():
  """All fixture images in one packed MoonViT row (merge order) + the index back to HF order."""
  imgs = pixels()
  g = fixture()[0]['vision_config']['image_size'] // 14
  grids = np.array([[g, g]] * len(imgs))
  return vision.pack_hf_images(patchify(imgs), grids), vision.hf_order(grids), g


# ------------------------------------------------------------------------------------------
# Configs and the parameter tree.

def test_configs_from_the_checkpoint():
  init = loaded()
  v, t = init.vision, init.text
  vc, tc = fixture()[0]['vision_config'], fixture()[0]['text_config']
  assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, v.patch_size) == (
      vc['hidden_size'], vc['num_hidden_layers'], vc['num_attention_heads'],
      vc['intermediate_size'], vc['patch_size'])
  # MoonViT keeps its own grid, eps and RoPE (checkpoint/siglip.py docstring).
  assert (v.pos_emb_height, v.pos_emb_width, v.layer_norm_eps) == (64, 64, 1e-5)
  assert t == config_lib.SiglipTextConfig(
      vocab_size=tc['vocab_size'], hidden_size=tc['hidden_size'],
      intermediate_size=tc['intermediate_size'], num_layers=tc['num_hidden_layers'],
      num_heads=tc['num_attention_heads'], max_position_embeddings=tc['max_position_embeddings'],
      projection_size=tc['projection_size'], layer_norm_eps=tc['layer_norm_eps'])
  # The released SO400M config.json (its non-default fields) gives the SO400M presets.
  so400m = {'vision_config': {'hidden_size': 1152, 'image_size': 384, 'intermediate_size': 4304,
                              'num_attention_heads': 16, 'num_hidden_layers': 27,
                              'patch_size': 14},
            'text_config': {'hidden_size': 1152, 'intermediate_size': 4304,
                            'num_attention_heads': 16, 'num_hidden_layers': 27}}
  v, t, g = siglip.configs_from_hf_dict(so400m)
  assert v == config_lib.VisionConfig() and t == config_lib.siglip_so400m_text() and g == 27


def init_shapes(v, t):
  """Flat {path: shape} of the three modules' own `init` (abstract)."""
  ids = jnp.zeros((1, 8), jnp.int32)
  grid = jnp.ones((1, 1, 2), jnp.int32)
  trees = {
      'vision_tower': lambda: vision.MoonViT(v).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 8, v.patch_dim)), jnp.zeros((1, 8, 2), jnp.int32),
          jnp.ones((1, 8), jnp.int32), grid),
      'image_pooling': lambda: image_pooling.AttentionPoolingHead(v).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 8, v.hidden_size)), jnp.ones((1, 8), jnp.int32),
          grid),
      'text_tower': lambda: siglip_text.SiglipTextTower(t).init(jax.random.PRNGKey(0), ids),
  }
  out = {}
  for name, fn in trees.items():
    tree = nn.meta.unbox(jax.eval_shape(fn)['params'])
    out.update({(name,) + k: tuple(x.shape)
                for k, x in hf_mapping.flatten(jax.tree.map(lambda a: a, tree)).items()})
  return out


@pytest.mark.parametrize('size', ['tiny', 'so400m'])
def test_param_shapes_are_the_modules_init(size):
  if size == 'tiny':
    v, t = loaded().vision, loaded().text
  else:
    v, t = config_lib.VisionConfig(), config_lib.siglip_so400m_text()
  want = {k: s for k, s in siglip.param_shapes(v, t).items() if k[0] != 'siglip_loss'}
  assert init_shapes(v, t) == want
  if size == 'tiny':
    got = {k: v.shape for k, v in hf_mapping.flatten(loaded().params).items()}
    assert got == siglip.param_shapes(v, t)


# ------------------------------------------------------------------------------------------
# Every tensor, by an independent statement of the transform.

def test_every_tensor_converted_as_documented():
  _, hf, arrays = fixture()
  init = loaded()
  p = init.params
  v, t = init.vision, init.text
  lin = lambda w, *shape: w.T.reshape(*shape)     # torch Linear [out, in] -> [in, *out]
  seen = set()

  def check(key, got, want):
    seen.add(key)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=key)

  def layers(prefix, tree, cfg_d, cfg_n, n_layers):
    h = cfg_d // cfg_n
    for i in range(n_layers):
      pre = f'{prefix}.encoder.layers.{i}.'
      for j, x in enumerate('qkv'):
        check(pre + f'self_attn.{x}_proj.weight', tree['wqkv']['kernel'][i][:, j],
              lin(hf[pre + f'self_attn.{x}_proj.weight'], cfg_d, cfg_n, h))
        check(pre + f'self_attn.{x}_proj.bias', tree['wqkv']['bias'][i][j],
              hf[pre + f'self_attn.{x}_proj.bias'].reshape(cfg_n, h))
      check(pre + 'self_attn.out_proj.weight', tree['wo']['kernel'][i],
            lin(hf[pre + 'self_attn.out_proj.weight'], cfg_n, h, cfg_d))
      check(pre + 'self_attn.out_proj.bias', tree['wo']['bias'][i],
            hf[pre + 'self_attn.out_proj.bias'])
      for src, dst in (('layer_norm1', 'norm0'), ('layer_norm2', 'norm1')):
        check(pre + f'{src}.weight', tree[dst]['scale'][i], hf[pre + f'{src}.weight'])
        check(pre + f'{src}.bias', tree[dst]['bias'][i], hf[pre + f'{src}.bias'])
      for src, dst in (('fc1', 'fc0'), ('fc2', 'fc1')):
        check(pre + f'mlp.{src}.weight', tree['mlp'][dst]['kernel'][i],
              hf[pre + f'mlp.{src}.weight'].T)
        check(pre + f'mlp.{src}.bias', tree['mlp'][dst]['bias'][i], hf[pre + f'mlp.{src}.bias'])

  vt, ip, tt = p['vision_tower'], p['image_pooling'], p['text_tower']
  d, n = v.hidden_size, v.num_heads
  check('vision_model.embeddings.patch_embedding.weight', vt['patch_embed']['kernel'],
        hf['vision_model.embeddings.patch_embedding.weight'].reshape(d, -1).T)
  check('vision_model.embeddings.patch_embedding.bias', vt['patch_embed']['bias'],
        hf['vision_model.embeddings.patch_embedding.bias'])
  # The 4 x 4 grid resized to 64 x 64 (the resize itself: test_position_grid_resize_is_torch's).
  seen.add('vision_model.embeddings.position_embedding.weight')
  assert vt['pos_emb'].shape == (64, 64, d)
  layers('vision_model', vt['blocks'], d, n, v.num_layers)
  for t_, leaf in (('weight', 'scale'), ('bias', 'bias')):
    check(f'vision_model.post_layernorm.{t_}', vt['final_layernorm'][leaf],
          hf[f'vision_model.post_layernorm.{t_}'])
    check(f'vision_model.head.layernorm.{t_}', ip['norm'][leaf],
          hf[f'vision_model.head.layernorm.{t_}'])
    check(f'text_model.final_layer_norm.{t_}', tt['final_layernorm'][leaf],
          hf[f'text_model.final_layer_norm.{t_}'])
  h = 'vision_model.head.'
  check(h + 'probe', ip['probe'], hf[h + 'probe'][0, 0])
  w, b = hf[h + 'attention.in_proj_weight'], hf[h + 'attention.in_proj_bias']
  check(h + 'attention.in_proj_weight', ip['wq']['kernel'], lin(w[:d], d, n, d // n))
  np.testing.assert_array_equal(ip['wkv']['kernel'][:, 0], lin(w[d:2 * d], d, n, d // n))
  np.testing.assert_array_equal(ip['wkv']['kernel'][:, 1], lin(w[2 * d:], d, n, d // n))
  check(h + 'attention.in_proj_bias', ip['wq']['bias'], b[:d].reshape(n, -1))
  np.testing.assert_array_equal(ip['wkv']['bias'], b[d:].reshape(2, n, -1))
  check(h + 'attention.out_proj.weight', ip['wo']['kernel'],
        lin(hf[h + 'attention.out_proj.weight'], n, d // n, d))
  check(h + 'attention.out_proj.bias', ip['wo']['bias'], hf[h + 'attention.out_proj.bias'])
  for src, dst in (('fc1', 'fc0'), ('fc2', 'fc1')):
    check(h + f'mlp.{src}.weight', ip['mlp'][dst]['kernel'], hf[h + f'mlp.{src}.weight'].T)
    check(h + f'mlp.{src}.bias', ip['mlp'][dst]['bias'], hf[h + f'mlp.{src}.bias'])

  check('text_model.embeddings.token_embedding.weight', tt['token_embedding'],
        hf['text_model.embeddings.token_embedding.weight'])
  check('text_model.embeddings.position_embedding.weight', tt['position_embedding'],
        hf['text_model.embeddings.position_embedding.weight'])
  layers('text_model', tt['layers'], t.hidden_size, t.num_heads, t.num_layers)
  check('text_model.head.weight', tt['head']['kernel'], hf['text_model.head.weight'].T)
  check('text_model.head.bias', tt['head']['bias'], hf['text_model.head.bias'])
  check('logit_scale', p['siglip_loss']['log_temperature'], hf['logit_scale'][0])
  check('logit_bias', p['siglip_loss']['bias'], hf['logit_bias'][0])
  assert p['siglip_loss']['log_temperature'].shape == () and \
      p['siglip_loss']['log_temperature'].dtype == np.float32
  assert seen == set(hf), sorted(set(hf) - seen)


def test_position_grid_resize_is_torch_bicubic():
  _, hf, arrays = fixture()
  table = hf['vision_model.embeddings.position_embedding.weight']
  g = int(np.sqrt(table.shape[0]))
  sizes = [k.split('/')[1] for k in arrays if k.startswith('pos_resized/')]
  assert '16x16' in sizes and '8x12' in sizes
  for s in sizes:
    h, w = (int(x) for x in s.split('x'))
    got = siglip.resize_position_grid(table, h, w).transpose(2, 0, 1)
    np.testing.assert_allclose(got, arrays[f'pos_resized/{s}'], atol=TOL, err_msg=s)
  # Converting into a 16 x 16 MoonViT grid stores exactly that resize; a native-size grid is a
  # plain reshape.
  np.testing.assert_allclose(loaded(16, 16, 1e-5).params['vision_tower']['pos_emb'],
                             arrays['pos_resized/16x16'].transpose(1, 2, 0), atol=TOL)
  np.testing.assert_array_equal(loaded(g, g, 1e-6).params['vision_tower']['pos_emb'],
                                table.reshape(g, g, -1))


# ------------------------------------------------------------------------------------------
# Outputs.

def test_patch_embedding_output_equals_reference():
  _, _, arrays = fixture()
  batch, back, g = packed_batch()
  init = loaded(g, g, 1e-6)
  model = vision.MoonViT(init.vision)
  _, state = jax.jit(lambda p, *a: model.apply({'params': p}, *a, capture_intermediates=True))(
      init.params['vision_tower'], *batch.values())
  out = np.asarray(state['intermediates']['patch_embed']['__call__'][0])[0][back]
  ref = arrays['patch_embeds'].reshape(out.shape)
  np.testing.assert_allclose(out, ref, atol=TOL)
  # + the (unresized) position grid: SigLIP's embeddings.
  pos = init.params['vision_tower']['pos_emb'].reshape(g * g, -1)
  np.testing.assert_allclose(out + np.tile(pos, (len(pixels()), 1)),
                             arrays['embeddings'].reshape(out.shape), atol=TOL)


@functools.lru_cache(maxsize=None)
def text_fn(config):
  model = siglip_text.SiglipTextTower(config)
  return jax.jit(lambda p, ids, mask: model.apply({'params': p}, ids, mask, return_hidden=True))


@pytest.mark.parametrize('case', ['full', 'short', 'masked'])
def test_text_tower_equals_reference(case):
  _, _, arrays = fixture()
  init = loaded()
  ids = arrays[f'text/{case}/input_ids']
  mask = arrays.get(f'text/{case}/attention_mask')
  z, hidden = text_fn(init.text)(init.params['text_tower'], ids, mask)
  np.testing.assert_allclose(np.asarray(hidden), arrays[f'text/{case}/hidden'], atol=TOL)
  np.testing.assert_allclose(np.asarray(z), arrays[f'text/{case}/pooled'], atol=TOL)


def moonvit_and_pool(init, batch, zero_rope: bool):
  """MoonViT (optionally with its RoPE angles forced to 0) + the pooling head, jitted fresh."""
  def fn(p, b):
    x = vision.MoonViT(init.vision).apply({'params': p['vision_tower']}, b['patches'],
                                          b['patch_coords'], b['patch_image_ids'],
                                          b['image_grid_hws'])
    z = image_pooling.AttentionPoolingHead(init.vision).apply(
        {'params': p['image_pooling']}, x, b['patch_image_ids'], b['image_grid_hws'])
    return x, z
  if not zero_rope:
    return jax.jit(fn)(init.params, batch)
  real = vision.rope_2d_angles
  vision.rope_2d_angles = lambda coords, d, theta: jnp.zeros(coords.shape[:-1] + (d // 2,))
  try:
    return jax.jit(fn)(init.params, batch)
  finally:
    vision.rope_2d_angles = real


def test_vision_path_without_rope_equals_siglip_and_logits():
  """Where MoonViT and SigLIP agree (no RoPE, native grid, SigLIP's eps) the converted MoonViT +
  pooling head reproduce SigLIP's vision tower and pooled embedding; with the text tower and the
  loss scalars, SigLIP's logits (t' = logit_scale, b = logit_bias)."""
  _, _, arrays = fixture()
  batch, back, g = packed_batch()
  init = loaded(g, g, 1e-6)
  x, z = moonvit_and_pool(init, batch, zero_rope=True)
  x = np.asarray(x)[0][back]
  np.testing.assert_allclose(x, arrays['vision_hidden'].reshape(x.shape), atol=TOL)
  np.testing.assert_allclose(np.asarray(z)[0], arrays['vision_pooled'], atol=TOL)

  text, _ = text_fn(init.text)(init.params['text_tower'],
                               arrays['text/full/input_ids'][:len(z[0])], None)
  unit = lambda a: np.asarray(a) / np.linalg.norm(np.asarray(a), axis=-1, keepdims=True)
  loss = init.params['siglip_loss']
  logits = unit(z[0]) @ unit(text).T * np.exp(loss['log_temperature']) + loss['bias']
  np.testing.assert_allclose(logits, arrays['logits_per_image'], atol=1e-4)

  # With its RoPE, the initialised MoonViT is a different function (docstring of siglip.py).
  x_rope, _ = moonvit_and_pool(init, batch, zero_rope=False)
  assert np.abs(np.asarray(x_rope)[0][back] - x).max() > 1e-2


# ------------------------------------------------------------------------------------------
# Bad input.

def test_bad_checkpoints_raise_checkpoint_mismatch():
  _, hf, _ = fixture()
  init = loaded()
  v, t = init.vision, init.text
  convert = lambda tensors: siglip.convert(tensors, v, t, grid=4)
  missing = {k: a for k, a in hf.items() if k != 'vision_model.head.probe'}
  with pytest.raises(hf_mapping.CheckpointMismatch,
                     match=r"1 missing.*vision_model\.head\.probe \(1, 1, 32\)"):
    convert(missing)
  extra = dict(hf, **{'text_model.encoder.layers.2.mlp.fc1.bias': np.zeros(40, np.float32)})
  with pytest.raises(hf_mapping.CheckpointMismatch,
                     match=r"1 unexpected.*text_model\.encoder\.layers\.2\.mlp\.fc1\.bias "
                           r"\(40,\)"):
    convert(extra)
  bad = dict(hf)
  bad['text_model.head.weight'] = np.zeros((32, 25), np.float32)
  with pytest.raises(hf_mapping.CheckpointMismatch,
                     match=r"text_model\.head\.weight: checkpoint shape \(32, 25\) but the "
                           r"configs expect \(32, 24\)"):
    convert(bad)
  with pytest.raises(hf_mapping.CheckpointMismatch,
                     match=r"position_embedding\.weight: checkpoint shape \(16, 32\) but the "
                           r"configs expect \(25, 32\)"):
    siglip.convert(hf, v, t, grid=5)
  # A MoonViT of another width than the checkpoint.
  with pytest.raises(hf_mapping.CheckpointMismatch, match='patch_embedding.weight'):
    siglip.convert(hf, dataclasses.replace(v, hidden_size=64), t, grid=4)
  # The position_ids buffer some exports carry is not a weight.
  ok = convert(dict(hf, **{'text_model.embeddings.position_ids': np.arange(16)[None]}))
  assert ok.keys() == init.params.keys()


def test_load_from_a_broken_directory(tmp_path):
  _, hf, _ = fixture()
  shutil.copy(os.path.join(FIXTURE, 'config.json'), tmp_path / 'config.json')
  bad = dict(hf)
  bad['vision_model.encoder.layers.1.self_attn.k_proj.weight'] = np.zeros((32, 31), np.float32)
  save_file(bad, str(tmp_path / 'model.safetensors'))
  with pytest.raises(hf_mapping.CheckpointMismatch,
                     match=r'layers\.1\.self_attn\.k_proj\.weight: checkpoint shape \(32, 31\)'):
    siglip.load(str(tmp_path))
  cfg = json.load(open(os.path.join(FIXTURE, 'config.json')))
  cfg['vision_config']['vision_use_head'] = False
  json.dump(cfg, open(tmp_path / 'config.json', 'w'))
  with pytest.raises(ValueError, match='vision_use_head=False'):
    siglip.load(str(tmp_path))


def test_text_tower_rejects_bad_input():
  init = loaded()
  model = siglip_text.SiglipTextTower(init.text)
  p = {'params': init.params['text_tower']}
  with pytest.raises(ValueError, match='17 tokens but the SigLIP text tower has 16 positions'):
    model.apply(p, np.zeros((1, 17), np.int32))
  with pytest.raises(ValueError, match='attention_mask'):
    model.apply(p, np.zeros((1, 8), np.int32), np.ones((1, 7), np.int32))
