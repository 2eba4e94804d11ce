"""HF checkpoint mapping: exact round trips, sharding, and clear errors on mismatches."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kimi_vl_jax.checkpoint import hf, hf_mapping
from kimi_vl_jax.model import config as config_lib


def random_params(config, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  flat = {path: rng.standard_normal(shape).astype(
      np.float32 if path[-1] in hf_mapping.FP32_PARAMS else dtype)
          for path, shape in hf_mapping.param_shapes(config).items()}
  return hf_mapping.unflatten(flat)


def assert_trees_equal(a, b):
  fa, fb = hf_mapping.flatten(a), hf_mapping.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


@pytest.mark.parametrize('variant', ['tiny', 'qlora', 'all_dense'])
def test_round_trip_is_exact(tmp_path, variant):
  config = config_lib.tiny()
  if variant == 'qlora':
    config = config.replace(text=config_lib.dataclasses.replace(config.text, q_lora_rank=24))
  if variant == 'all_dense':
    config = config.replace(text=config_lib.dataclasses.replace(config.text, n_routed_experts=0))
  params = random_params(config)
  hf.save(config, params, str(tmp_path))
  config2, params2 = hf.load(str(tmp_path))
  assert config2 == config
  assert_trees_equal(params, params2)
  # Saving what was loaded writes byte-identical tensors.
  hf.save(config2, params2, str(tmp_path / 'again'))
  a, b = load_file(tmp_path / 'model.safetensors'), load_file(tmp_path / 'again/model.safetensors')
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_bf16_round_trip(tmp_path):
  config = config_lib.tiny()
  params = random_params(config, dtype=ml_dtypes.bfloat16)
  hf.save(config, params, str(tmp_path), max_shard_bytes=20_000)
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  assert len(set(index['weight_map'].values())) > 3
  _, params2 = hf.load(str(tmp_path), dtype=ml_dtypes.bfloat16)
  assert_trees_equal(params, params2)


def test_known_layout_of_individual_tensors(tmp_path):
  """Spot-checks the table against hand-written conversions of PyTorch layouts."""
  config = config_lib.tiny()
  t, v = config.text, config.vision
  params = random_params(config)
  hf.save(config, params, str(tmp_path))
  sd = load_file(tmp_path / 'model.safetensors')
  # q_proj of HF layer 1 (= first MoE layer): [N*Hqk, D] = kernel[D, N, Hqk] flattened, transposed.
  q = params['language_model']['moe_layers']['self_attn']['q_proj']['kernel'][0]
  np.testing.assert_array_equal(sd['language_model.model.layers.1.self_attn.q_proj.weight'],
                                q.reshape(t.hidden_size, -1).T)
  # o_proj: [D, N*Hv].
  o = params['language_model']['dense_layers']['self_attn']['o_proj']['kernel'][0]
  np.testing.assert_array_equal(sd['language_model.model.layers.0.self_attn.o_proj.weight'],
                                o.reshape(-1, t.hidden_size).T)
  # expert 3 of HF layer 2.
  g = params['language_model']['moe_layers']['mlp']['experts']['down_proj'][1, 3]
  np.testing.assert_array_equal(sd['language_model.model.layers.2.mlp.experts.3.down_proj.weight'],
                                g.T)
  # patch conv [Dv, 3, 14, 14] from kernel [588, Dv].
  k = params['vision_tower']['patch_embed']['kernel']
  np.testing.assert_array_equal(sd['vision_tower.patch_embed.proj.weight'],
                                k.T.reshape(v.hidden_size, 3, 14, 14))
  # wqkv rows q | k | v, head-major.
  w = params['vision_tower']['blocks']['wqkv']['kernel'][1]
  np.testing.assert_array_equal(sd['vision_tower.encoder.blocks.1.wqkv.weight'],
                                w.reshape(v.hidden_size, -1).T)


def _write(tmp_path, config, sd):
  os.makedirs(tmp_path, exist_ok=True)
  save_file(sd, str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text(json.dumps(config_lib.to_hf_dict(config)))


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
  config = config_lib.tiny()
  hf.save(config, random_params(config), str(tmp_path / 'good'))
  sd = load_file(tmp_path / 'good/model.safetensors')

  bad = dict(sd)
  del bad['language_model.model.layers.2.mlp.experts.5.up_proj.weight']
  _write(tmp_path / 'missing', config, bad)
  with pytest.raises(hf_mapping.CheckpointMismatch, match=r'1 missing.*layers\.2\.mlp\.experts\.5'):
    hf.load(str(tmp_path / 'missing'))

  bad = dict(sd, **{'language_model.model.layers.9.foo.weight': np.zeros(3, np.float32)})
  _write(tmp_path / 'unexpected', config, bad)
  with pytest.raises(hf_mapping.CheckpointMismatch, match=r'1 unexpected.*layers\.9\.foo'):
    hf.load(str(tmp_path / 'unexpected'))

  key = 'language_model.model.layers.1.self_attn.kv_b_proj.weight'
  bad = dict(sd, **{key: np.zeros((7, 5), np.float32)})
  _write(tmp_path / 'shape', config, bad)
  with pytest.raises(hf_mapping.CheckpointMismatch,
                     match=r'kv_b_proj.weight: checkpoint shape \(7, 5\) but the config expects '
                           r"\(128, 32\)"):
    hf.load(str(tmp_path / 'shape'))


def test_text_only_deepseek_checkpoint_keys_are_accepted():
  config = config_lib.tiny()
  params = random_params(config)
  text_sd = {k[len('language_model.'):]: v
             for k, v in hf_mapping.params_to_hf(params, config, include_vision=False)}
  assert 'model.layers.0.self_attn.o_proj.weight' in text_sd
  loaded = hf_mapping.hf_to_params(text_sd, config, include_vision=False)
  ref = hf_mapping.flatten(params)
  for path, value in hf_mapping.flatten(loaded).items():
    np.testing.assert_array_equal(value, ref[path])


def test_hf_config_round_trip_and_refusals():
  for name in ('tiny', 'small', 'kimi_vl_a3b'):
    config = config_lib.get_preset(name)
    assert config_lib.from_hf_dict(config_lib.to_hf_dict(config)) == config
  d = config_lib.to_hf_dict(config_lib.tiny())
  d['text_config']['scoring_func'] = 'softmax'
  with pytest.raises(ValueError, match='scoring_func'):
    config_lib.from_hf_dict(d)
  with pytest.raises(ValueError, match='text_config'):
    config_lib.from_hf_dict({'vision_config': {}})


def test_router_bias_stays_fp32_under_bf16_storage(tmp_path):
  config = config_lib.tiny()
  params = random_params(config)
  hf.save(config, params, str(tmp_path))
  config2, loaded = hf.load(str(tmp_path), param_dtype='bfloat16')
  assert config2.param_dtype == 'bfloat16'
  gate = loaded['language_model']['moe_layers']['mlp']['gate']
  assert gate['e_score_correction_bias'].dtype == np.float32
  assert gate['kernel'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
      gate['e_score_correction_bias'],
      params['language_model']['moe_layers']['mlp']['gate']['e_score_correction_bias'])
