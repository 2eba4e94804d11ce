"""MLA: parity with transformers' DeepseekV3Attention, RoPE convention, YaRN, masking."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import text_fixture_utils as U
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.mla import MLA, apply_rope_interleaved, rope_parameters


def layer0_attention(name):
  config = U.load_config(name)
  params = U.load_params(name, config)
  return config.text, jax.tree.map(lambda a: a[0], params['dense_layers']['self_attn'])


@pytest.mark.parametrize('name', U.VARIANTS)
def test_matches_transformers_attention(name):
  """Layer-0 self_attn output on the reference's own input (plain q; q-LoRA + YaRN)."""
  text, params = layer0_attention(name)
  probes = U.load_arrays(name, 'layers')
  x = probes['attn_in']
  B, T, _ = x.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  out = jax.jit(MLA(text).apply)({'params': params}, x, pos, jnp.ones((B, T), jnp.int32))
  np.testing.assert_allclose(np.asarray(out), probes['attn_out'], atol=1e-5, rtol=0)


def test_interleaved_rope_gives_the_reference_scores():
  """Rotating pairs (2j, 2j+1) in place == the reference's de-interleave-then-rotate (its output
  is `cat(x_even*cos - x_odd*sin, x_odd*cos + x_even*sin)`): same q.k for every position pair."""
  rng = np.random.default_rng(0)
  Hr, T = 8, 6
  q, k = rng.standard_normal((T, Hr)), rng.standard_normal((T, Hr))
  inv_freq = 1.0 / 10000 ** (np.arange(0, Hr, 2) / Hr)
  ang = np.arange(T)[:, None] * inv_freq
  cos, sin = np.cos(ang), np.sin(ang)

  def reference(x):
    e, o = x[:, 0::2], x[:, 1::2]
    return np.concatenate([e * cos - o * sin, o * cos + e * sin], -1)

  ours_q = np.asarray(apply_rope_interleaved(jnp.asarray(q, jnp.float32), cos, sin))
  ours_k = np.asarray(apply_rope_interleaved(jnp.asarray(k, jnp.float32), cos, sin))
  np.testing.assert_allclose(ours_q @ ours_k.T, reference(q) @ reference(k).T, atol=1e-5)
  # ... and it is a rotation of each adjacent pair (not of (j, j + Hr/2) as rotate-half would be).
  np.testing.assert_allclose(ours_q[:, 0::2], reference(q)[:, :Hr // 2], atol=1e-6)
  np.testing.assert_allclose(ours_q[:, 1::2], reference(q)[:, Hr // 2:], atol=1e-6)


def test_rope_parameters_default_and_yarn():
  text = config_lib.tiny().text
  inv_freq, factor, scale = rope_parameters(text)
  np.testing.assert_allclose(inv_freq, 1.0 / 10000 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
  assert factor == 1.0 and scale == pytest.approx(24 ** -0.5)
  yarn = dataclasses.replace(text, rope_scaling=(
      ('factor', 4.0), ('mscale', 1.0), ('mscale_all_dim', 1.0),
      ('original_max_position_embeddings', 64), ('rope_type', 'yarn')))
  inv_yarn, factor, scale = rope_parameters(yarn)
  mscale = 0.1 * np.log(4.0) + 1.0
  assert factor == pytest.approx(1.0)  # mscale == mscale_all_dim
  assert scale == pytest.approx(24 ** -0.5 * mscale ** 2)
  # Highest frequency extrapolated (unchanged), lowest ones interpolated (divided by the factor).
  assert inv_yarn[0] == pytest.approx(inv_freq[0])
  np.testing.assert_allclose(inv_yarn[2:], inv_freq[2:] / 4.0, rtol=1e-6)
  with pytest.raises(ValueError, match='rope_type'):
    rope_parameters(dataclasses.replace(
        text, rope_scaling=(('factor', 2.0), ('rope_type', 'linear'))))


def test_packed_segments_and_padding():
  """Row 0 = [a (5) | b (4) | pad (3)]; rows 1, 2 = a, b alone. Padding gives finite output."""
  text, params = layer0_attention('text_tiny')
  rng = np.random.default_rng(1)
  T, la, lb, D = 12, 5, 4, text.hidden_size
  a, b = rng.standard_normal((la, D)), rng.standard_normal((lb, D))
  x = np.zeros((3, T, D), np.float32)
  seg, pos = np.zeros((3, T), np.int32), np.zeros((3, T), np.int32)
  x[0, :la], x[0, la:la + lb], x[0, la + lb:] = a, b, 7.0
  seg[0, :la], seg[0, la:la + lb] = 1, 2
  pos[0, :la], pos[0, la:la + lb] = np.arange(la), np.arange(lb)
  x[1, :la], seg[1, :la], pos[1, :la] = a, 1, np.arange(la)
  x[2, :lb], seg[2, :lb], pos[2, :lb] = b, 1, np.arange(lb)
  out = np.asarray(jax.jit(MLA(text).apply)({'params': params}, x, pos, seg))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out[0, :la], out[1, :la], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, la:la + lb], out[2, :lb], atol=1e-5, rtol=0)
  # Without the segment ids, b would attend to a: the comparison above can fail.
  merged = np.asarray(jax.jit(MLA(text).apply)({'params': params}, x, pos, np.ones_like(seg)))
  assert np.abs(merged[0, la:la + lb] - out[2, :lb]).max() > 1e-3
  # RoPE is relative: shifting every position of a sequence leaves its output unchanged.
  shifted = np.asarray(jax.jit(MLA(text).apply)({'params': params}, x, pos + 5, seg))
  np.testing.assert_allclose(shifted, out, atol=1e-4, rtol=0)


def test_wrong_hidden_size_raises():
  text, params = layer0_attention('text_tiny')
  with pytest.raises(ValueError, match='hidden size'):
    MLA(text).apply({'params': params}, jnp.zeros((1, 3, 5)), jnp.zeros((1, 3), jnp.int32),
                    jnp.ones((1, 3), jnp.int32))
