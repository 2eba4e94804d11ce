"""Whole-model tests: the documented `hf.load` + `KimiVL.apply` API against the PyTorch reference
(tests/fixtures/kimi_vl_tiny, written by tests/reference/make_kimi_vl_fixtures.py), the parameter
tree contract, image-token scattering and packed-batch equivalence."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.checkpoint import hf, hf_mapping
from kimi_vl_jax.model import KimiVL
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.kimi_vl import dummy_inputs, scatter_image_features
from kimi_vl_jax.model.vision import pack_hf_images

FIXTURE = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'kimi_vl_tiny')


@pytest.fixture(scope='module')
def reference():
  config, params = hf.load(FIXTURE)
  inputs = dict(np.load(os.path.join(FIXTURE, 'inputs.npz')))
  outputs = dict(np.load(os.path.join(FIXTURE, 'outputs.npz')))
  inputs['pixel_values'] = inputs['pixel_values'].astype(np.float32)
  return config, params, inputs, outputs


def test_whole_model_matches_reference_logits(reference):
  config, params, inputs, outputs = reference
  logits = KimiVL(config).apply({'params': params}, inputs['input_ids'],
                                pixel_values=inputs['pixel_values'],
                                image_grid_hws=inputs['image_grid_hws'])
  assert logits.shape == outputs['logits'].shape
  err = float(np.max(np.abs(np.asarray(logits) - outputs['logits'])))
  assert err <= 1e-4, err


def test_packed_rows_equal_hf_style_call(reference):
  """The training layout (one packed vision row per text row) gives the HF-style logits."""
  config, params, inputs, outputs = reference
  ids, grids, pv = inputs['input_ids'], inputs['image_grid_hws'], inputs['pixel_values']
  # Images 0, 1 belong to row 0 and image 2 to row 1 (fixture docstring).
  sizes = [int(h * w) for h, w in grids]
  starts = np.cumsum([0] + sizes)
  rows = [(pv[starts[0]:starts[2]], grids[:2]), (pv[starts[2]:starts[3]], grids[2:])]
  P, I = max(len(r[0]) for r in rows) + 8, 2
  batch = {k: [] for k in ('patches', 'patch_coords', 'patch_image_ids', 'image_grid_hws')}
  for row_pv, row_grids in rows:
    packed = pack_hf_images(row_pv, row_grids)
    n = packed['patches'].shape[1]
    pad = P - n
    batch['patches'].append(np.pad(np.asarray(packed['patches'][0]), ((0, pad), (0, 0))))
    batch['patch_coords'].append(np.pad(np.asarray(packed['patch_coords'][0]), ((0, pad), (0, 0))))
    batch['patch_image_ids'].append(np.pad(np.asarray(packed['patch_image_ids'][0]), (0, pad)))
    g = np.asarray(packed['image_grid_hws'][0])
    batch['image_grid_hws'].append(np.pad(g, ((0, I - len(g)), (0, 0))))
  batch = {k: np.stack(v) for k, v in batch.items()}
  logits = jax.jit(lambda p, b: KimiVL(config).apply({'params': p}, ids, **b))(params, batch)
  np.testing.assert_allclose(np.asarray(logits), outputs['logits'], atol=1e-4, rtol=0)


def test_placeholder_count_mismatch_is_a_clear_error(reference):
  config, params, inputs, _ = reference
  ids = inputs['input_ids'].copy()
  ids[0, np.argmax(ids[0] == config.media_placeholder_token_id)] = 5
  with pytest.raises(ValueError, match='media placeholders'):
    KimiVL(config).apply({'params': params}, ids, pixel_values=inputs['pixel_values'],
                         image_grid_hws=inputs['image_grid_hws'])


@pytest.mark.parametrize('preset', ['tiny', 'small', 'kimi_vl_a3b'])
def test_param_tree_matches_the_mapping_contract(preset):
  config = config_lib.get_preset(preset)
  abstract = jax.eval_shape(
      lambda: KimiVL(config).init(jax.random.key(0), **dummy_inputs(config)))
  flat = hf_mapping.flatten(nn.meta.unbox(abstract['params']))
  got = {path: tuple(x.shape) for path, x in flat.items()}
  assert got == hf_mapping.param_shapes(config)


def test_every_param_has_logical_axes():
  config = config_lib.tiny()
  abstract = jax.eval_shape(
      lambda: KimiVL(config).init(jax.random.key(0), **dummy_inputs(config)))
  leaves = jax.tree.leaves(abstract['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == x.value.ndim


def test_scatter_fills_placeholders_in_order():
  embeds = jnp.zeros((2, 6, 3))
  ids = jnp.array([[9, 7, 7, 9, 7, 9], [7, 9, 9, 9, 9, 9]])
  feats = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3) + 1
  out = np.asarray(scatter_image_features(embeds, ids, feats, placeholder_id=7))
  np.testing.assert_array_equal(out[0, [1, 2, 4]], np.asarray(feats[0, :3]))
  np.testing.assert_array_equal(out[1, 0], np.asarray(feats[1, 0]))
  assert not out[0, [0, 3, 5]].any() and not out[1, 1:].any()


def test_save_load_round_trip_preserves_logits(tmp_path):
  config = config_lib.tiny()
  rng = np.random.default_rng(0)
  params = hf_mapping.unflatten({p: 0.05 * rng.standard_normal(s).astype(np.float32)
                                 for p, s in hf_mapping.param_shapes(config).items()})
  hf.save(config, params, str(tmp_path))
  config2, params2 = hf.load(str(tmp_path))
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  a = jax.jit(KimiVL(config).apply)({'params': params}, ids)
  b = jax.jit(KimiVL(config2).apply)({'params': params2}, ids)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_summary_counts_of_the_real_config():
  from kimi_vl_jax.model import summary
  counts = summary.count(config_lib.kimi_vl_a3b())
  assert abs(counts['total'] / 16.4e9 - 1) < 0.01
  assert abs(counts['vision_tower'] / 417e6 - 1) < 0.01
  assert abs(counts['projector'] / 31e6 - 1) < 0.02
  # Kimi-VL-A3B: LM ~2.92B active + vision 0.417B + projector 0.031B.
  assert abs(counts['active'] / (2.92e9 + 0.417e9 + 0.031e9) - 1) < 0.01
