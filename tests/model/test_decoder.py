"""LanguageModel: parity with transformers' DeepseekV3ForCausalLM; masking / layout properties."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import text_fixture_utils as U
from kimi_vl_jax.checkpoint import hf_mapping
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.decoder import LanguageModel, stack_layer_params, unstack_layer_params


def with_text(config, **kw):
  return config.replace(text=dataclasses.replace(config.text, **kw))


_FORWARD = {}


def forward_fn(config):
  """jitted (params, input_ids, positions, segment_ids) -> (logits, aux), one per config (so tests
  sharing a config and shapes share one compilation)."""
  if config in _FORWARD:
    return _FORWARD[config]
  model = LanguageModel(config)

  @jax.jit
  def f(params, ids, positions=None, segment_ids=None):
    x = model.apply({'params': params}, ids, method=model.embed)
    return model.apply({'params': params}, x, positions, segment_ids)
  _FORWARD[config] = f
  return f


@pytest.fixture(scope='module')
def tiny():
  """The plain-q fixture model, its params (scan layout) and reference arrays."""
  config = with_text(U.load_config('text_tiny'), moe_impl='dropless', capacity_factor=4.0)
  return config, U.load_params('text_tiny', config)


def both_batches(name):
  """The fixture's two batches ([2, 12] and [1, 20]) as one [3, 20] batch: batch 0 padded at the
  end with segment id 0 (causal + segment masking make padding invisible to real tokens)."""
  inputs = U.load_arrays(name, 'inputs')
  a, b = inputs['input_ids_0'], inputs['input_ids_1']
  T = max(a.shape[1], b.shape[1])
  ids = np.zeros((a.shape[0] + b.shape[0], T), np.int32)
  seg = np.zeros_like(ids)
  ids[:a.shape[0], :a.shape[1]], seg[:a.shape[0], :a.shape[1]] = a, 1
  ids[a.shape[0]:, :b.shape[1]], seg[a.shape[0]:, :b.shape[1]] = b, 1
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape)
  return ids, pos, seg


@pytest.mark.parametrize('name,impl', [
    ('text_tiny', 'dropless'), ('text_tiny_qlora', 'dropless'), ('text_tiny', 'capacity'),
    pytest.param('text_tiny_qlora', 'capacity', marks=pytest.mark.slow)])
def test_logits_match_transformers(name, impl):
  # capacity_factor = E / K gives every expert room for every token: nothing can be dropped.
  config = U.load_config(name)
  config = with_text(config, moe_impl=impl, capacity_factor=4.0)
  params = U.load_params(name, config)
  logits = U.load_arrays(name, 'logits')
  got, aux = forward_fn(config)(params, *both_batches(name))
  assert got.dtype == jnp.float32
  want0, want1 = logits['logits_0'], logits['logits_1']
  b0, t0 = want0.shape[:2]
  np.testing.assert_allclose(np.asarray(got[:b0, :t0]), want0, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got[b0:]), want1, atol=1e-4, rtol=0)
  assert aux['expert_load'].shape == (config.text.num_moe_layers, config.text.n_routed_experts)
  np.testing.assert_allclose(np.asarray(aux['expert_load']).sum(-1), 1.0, atol=1e-6)


def test_params_follow_the_param_tree_contract():
  for name in U.VARIANTS:
    config = U.load_config(name)
    boxed = jax.eval_shape(LanguageModel(config).init, jax.random.key(0),
                           jnp.zeros((1, 4, config.text.hidden_size)))['params']
    shapes = {k[1:]: v for k, v in hf_mapping.param_shapes(config, include_vision=False).items()}
    got = {k: v.shape for k, v in hf_mapping.flatten(nn.meta.unbox(boxed)).items()}
    assert got == shapes
  specs = hf_mapping.flatten(nn.get_partition_spec(boxed))
  assert tuple(specs[('moe_layers', 'mlp', 'experts', 'gate_proj')]) == (
      'layers', 'expert', 'embed', 'expert_mlp')
  assert tuple(specs[('moe_layers', 'self_attn', 'q_b_proj', 'kernel')]) == (
      'layers', 'q_lora', 'heads', 'kv')
  assert tuple(specs[('dense_layers', 'self_attn', 'o_proj', 'kernel')]) == (
      'layers', 'heads', 'kv', 'embed')
  assert tuple(specs[('embed_tokens', 'embedding')]) == ('vocab', 'embed')


def test_packed_segments_match_separate_sequences(tiny):
  """Row 0 packs sequences a (len 9) and b (len 8) + 3 pad; rows 1-2 hold a and b alone (padded).
  Same shapes as `both_batches`, so the compiled forward is shared."""
  config, params = tiny
  rng = np.random.default_rng(0)
  T, la, lb = 20, 9, 8
  a, b = rng.integers(0, config.text.vocab_size, la), rng.integers(0, config.text.vocab_size, lb)
  ids = np.zeros((3, T), np.int32)
  seg = np.zeros((3, T), np.int32)
  pos = np.zeros((3, T), np.int32)
  ids[0, :la], ids[0, la:la + lb] = a, b
  seg[0, :la], seg[0, la:la + lb] = 1, 2
  pos[0, :la], pos[0, la:la + lb] = np.arange(la), np.arange(lb)
  ids[1, :la], seg[1, :la], pos[1, :la] = a, 1, np.arange(la)
  ids[2, :lb], seg[2, :lb], pos[2, :lb] = b, 1, np.arange(lb)
  ids[0, la + lb:] = 5  # padding content must not matter
  logits, aux = forward_fn(config)(params, ids, pos, seg)
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits))
  np.testing.assert_allclose(logits[0, :la], logits[1, :la], atol=2e-5, rtol=0)
  np.testing.assert_allclose(logits[0, la:la + lb], logits[2, :lb], atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(aux['expert_load']).sum(-1), 1.0, atol=1e-6)


def small_config(**kw):
  """tiny() with 2 layers (1 dense + 1 MoE) and a small vocab: cheap to differentiate."""
  config = config_lib.tiny()
  return with_text(config, num_layers=2, vocab_size=64, **kw)


def init_params(config, seed=0):
  """Random params of the right tree (from eval_shape, so nothing is compiled): norm scales near 1,
  matrices ~ N(0, 0.1^2), a non-zero router bias (as after some training)."""
  shapes = jax.eval_shape(LanguageModel(config).init, jax.random.key(0),
                          jnp.zeros((1, 4, config.text.hidden_size)))['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
    std = 0.01 if 'e_score_correction_bias' in name else 0.1
    return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


# Rows probe different positions t_b: d logits[b, t_b] / d embeds[b, s] must be 0 exactly for
# s > t_b and non-zero for s <= t_b. One backward pass covers all rows (rows are independent).
PROBE_T = (0, 2, 5, 7)
_GRADS = {}


def probe_grads(config):
  """(logits, d f / d params, d f / d embeds) for f = sum_b logits[b, PROBE_T[b]] . probe, on the
  small model; cached per config (both the causality and the remat test use the 'none' one)."""
  if config in _GRADS:
    return _GRADS[config]
  model = LanguageModel(config)
  params = init_params(small_config())
  B, T, D = len(PROBE_T), 8, config.text.hidden_size
  embeds = jax.random.normal(jax.random.key(3), (B, T, D))
  probe = jax.random.normal(jax.random.key(4), (config.text.vocab_size,))

  def f(p, x):
    logits, _ = model.apply({'params': p}, x)
    return (logits[jnp.arange(B), jnp.array(PROBE_T)] @ probe).sum(), logits

  (_, logits), (g_params, g_embeds) = jax.jit(
      jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, embeds)
  _GRADS[config] = (logits, g_params, g_embeds)
  return _GRADS[config]


def test_causal_by_gradients():
  _, _, g_embeds = probe_grads(small_config())
  mag = np.abs(np.asarray(g_embeds)).sum(-1)                  # [B, S]
  for b, t in enumerate(PROBE_T):
    assert np.all(mag[b, t + 1:] == 0.0), f'logits[{t}] depends on a later token: {mag[b]}'
    assert np.all(mag[b, :t + 1] > 0.0), f'logits[{t}] ignores an earlier token: {mag[b]}'


def test_scan_equals_unrolled(tiny):
  config, params = tiny
  batch = both_batches('text_tiny')
  scanned = forward_fn(config)(params, *batch)
  unrolled_config = config.replace(scan_layers=False)
  unrolled_params = unstack_layer_params(params, config)
  assert 'moe_layers_1' in unrolled_params and 'moe_layers' not in unrolled_params
  init_keys = jax.eval_shape(LanguageModel(unrolled_config).init, jax.random.key(0),
                             jnp.zeros((1, 4, config.text.hidden_size)))['params'].keys()
  assert set(init_keys) == set(unrolled_params)
  unrolled = forward_fn(unrolled_config)(unrolled_params, *batch)
  np.testing.assert_allclose(unrolled[0], scanned[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(unrolled[1]['expert_load'], scanned[1]['expert_load'], atol=1e-7)
  restacked = stack_layer_params(unrolled_params, config)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)


def test_bf16_compute_close_to_fp32(tiny):
  config, params = tiny
  batch = both_batches('text_tiny')
  want = np.asarray(forward_fn(config)(params, *batch)[0])
  config16 = config.replace(dtype='bfloat16', param_dtype='bfloat16')
  params16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
  got, aux = forward_fn(config16)(params16, *batch)
  assert got.dtype == jnp.float32 and aux['expert_load'].dtype == jnp.float32
  real = batch[2] != 0
  got, want = np.asarray(got)[real], want[real]
  assert np.all(np.isfinite(got))
  # bf16 (8-bit mantissa) through 3 layers: close in aggregate, and the argmax mostly agrees.
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 0.1, rel
  assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.8


def test_remat_full_matches_no_remat():
  config = small_config()
  logits0, gp0, ge0 = probe_grads(config)
  logits1, gp1, ge1 = probe_grads(config.replace(remat_policy='full'))
  np.testing.assert_allclose(logits1, logits0, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ge1, ge0, atol=1e-6, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), gp1, gp0)
  # The router bias is outside the gradient; the router kernel and the experts are not.
  mlp = gp0['moe_layers']['mlp']
  assert np.all(np.asarray(mlp['gate']['e_score_correction_bias']) == 0)
  assert np.abs(np.asarray(mlp['gate']['kernel'])).max() > 0
  assert np.abs(np.asarray(mlp['experts']['down_proj'])).max() > 0


def test_bad_inputs_raise(tiny):
  config, params = tiny
  model = LanguageModel(config)
  with pytest.raises(ValueError, match='inputs_embeds'):
    model.apply({'params': params}, jnp.zeros((1, 4, 3)))
  with pytest.raises(ValueError, match='segment_ids'):
    model.apply({'params': params}, jnp.zeros((1, 4, config.text.hidden_size)),
                None, jnp.ones((1, 5), jnp.int32))
