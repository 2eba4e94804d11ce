"""Blockwise (flash) attention == dense masked attention, values and gradients, and its memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model import attention, flash


def _qkv(B, T, S, N, H, Hv, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return f(B, T, N, H), f(B, S, N, H), f(B, S, N, Hv)


def _dense(q, k, v, qs, ks, causal, scale, q_pos=None, kv_pos=None):
  mask = attention.segment_mask(qs, ks, causal=causal, q_positions=q_pos, kv_positions=kv_pos)
  return attention.dot_product_attention(q, k, v, mask, scale)


def _check(q, k, v, qs, ks, *, causal, q_pos=None, kv_pos=None, bq=8, bk=16, scale=0.3,
           per_row=False):
  """Values and (q, k, v) gradients of a non-linear loss agree with the dense computation."""
  fl = lambda q, k, v: flash.flash_attention(  # noqa: E731
      q, k, v, qs, ks, causal=causal, scale=scale, q_positions=q_pos, kv_positions=kv_pos,
      block_q=bq, block_kv=bk, per_row=per_row)
  de = lambda q, k, v: _dense(q, k, v, qs, ks, causal, scale, q_pos, kv_pos)  # noqa: E731
  np.testing.assert_allclose(fl(q, k, v), de(q, k, v), rtol=1e-5, atol=1e-5)
  w = jnp.asarray(np.random.default_rng(1).normal(size=v.shape[:1] + q.shape[1:3]
                                                  + v.shape[3:]), jnp.float32)
  loss = lambda fn: lambda *a: (jnp.sin(fn(*a)) * w).sum()  # noqa: E731
  g_fl = jax.jit(jax.grad(loss(fl), argnums=(0, 1, 2)))(q, k, v)
  g_de = jax.jit(jax.grad(loss(de), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip('qkv', g_fl, g_de):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')
  assert np.isfinite(np.asarray(fl(q, k, v))).all()


def test_causal_packed_segments_with_padding_and_ragged_length():
  # T=37 is no multiple of the blocks (padded internally); row 0: 2 examples + 7 padding tokens.
  B, T, N, H, Hv = 2, 37, 3, 8, 5
  q, k, v = _qkv(B, T, T, N, H, Hv)
  seg = jnp.asarray([[1] * 10 + [2] * 20 + [0] * 7, [1] * 37], jnp.int32)
  _check(q, k, v, seg, seg, causal=True)


def test_non_causal_per_image_segments_mla_head_dims():
  # Vision-like: bidirectional inside each image, padding at the end; H=24, Hv=16 (MLA ratio).
  B, T, N, H, Hv = 2, 64, 2, 24, 16
  q, k, v = _qkv(B, T, T, N, H, Hv, seed=2)
  seg = jnp.asarray([[1] * 9 + [2] * 30 + [3] * 4 + [0] * 21, [1] * 16 + [2] * 48], jnp.int32)
  _check(q, k, v, seg, seg, causal=False, bq=16, bk=16)


def test_all_padding_row_is_finite_and_equal():
  B, T, N, H = 2, 32, 2, 8
  q, k, v = _qkv(B, T, T, N, H, H, seed=3)
  seg = jnp.asarray([[0] * 32, [1] * 20 + [0] * 12], jnp.int32)
  _check(q, k, v, seg, seg, causal=True, bq=8, bk=8)


def test_custom_indices_local_queries_against_full_keys():
  # Context-parallel shape: 16 local queries (load-balanced chunks 1 and 6 of 8) x 64 keys.
  B, S, N, H, Hv = 2, 64, 2, 8, 4
  index = np.arange(S)
  q_index = np.concatenate([index[8:16], index[48:56]])
  q, k, v = _qkv(B, 16, S, N, H, Hv, seed=4)
  kv_seg = jnp.asarray([[1] * 20 + [2] * 40 + [0] * 4, [1] * 64], jnp.int32)
  q_seg = kv_seg[:, q_index]
  _check(q, k, v, q_seg, kv_seg, causal=True, q_pos=jnp.asarray(q_index)[None],
         kv_pos=jnp.asarray(index)[None], bq=8, bk=16)


def test_block_table_skips_masked_blocks():
  # Causal, one segment: exactly the lower triangle (diagonal included) is live.
  T = 64
  seg = jnp.ones((1, T), jnp.int32)
  pos = jnp.arange(T)[None]
  live = flash.live_blocks(seg, seg, pos, pos, True, 16, 16)
  np.testing.assert_array_equal(live, np.tril(np.ones((4, 4), bool)))
  # Two images of 32 patches, non-causal: block-diagonal.
  seg = jnp.asarray([[1] * 32 + [2] * 32], jnp.int32)
  live = flash.live_blocks(seg, seg, pos, pos, False, 16, 16)
  np.testing.assert_array_equal(live, np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))


def test_bad_shapes_raise():
  q, k, v = _qkv(1, 8, 8, 2, 4, 4)
  seg = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match='segment ids'):
    flash.flash_attention(q, k, v, seg[:, :4], seg, causal=True, scale=1.0)
  with pytest.raises(ValueError, match='q_positions'):
    flash.flash_attention(q, k, v, seg, seg, causal=True, scale=1.0,
                          q_positions=jnp.arange(4)[None])


def test_gradient_memory_is_linear_in_length():
  """Jitted grad at T=4096: flash temporaries far below the dense [B, N, T, T] fp32 scores."""
  B, T, N, H = 1, 4096, 1, 16
  spec = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def temp(fn):
    g = jax.jit(jax.grad(lambda q, k, v, s: fn(q, k, v, s).sum(), argnums=(0, 1, 2)))
    return g.lower(spec, spec, spec, seg).compile().memory_analysis().temp_size_in_bytes

  dense = temp(lambda q, k, v, s: _dense(q, k, v, s, s, True, 0.25))
  fl = temp(lambda q, k, v, s: flash.flash_attention(q, k, v, s, s, causal=True, scale=0.25,
                                                      block_q=256, block_kv=256))
  scores = B * N * T * T * 4
  assert dense >= scores, (dense, scores)
  assert fl < scores / 8, (fl, scores)


def test_gradient_memory_inside_a_layer_scan():
  """Under `lax.scan` over layers (nn.scan) the segment ids are loop invariants: JAX must not hoist
  the per-block masks out of the loop (that would store all [T/bq, S/bk, ...] blocks, T^2)."""
  T, N, H = 4096, 1, 16
  seg = jnp.asarray(np.repeat([1, 2, 0], [2000, 2000, 96])[None], jnp.int32)   # a constant
  kern = attention.AttentionKernel('flash', 256, 256)

  def layers(w, x):
    def body(x, wi):
      y = jnp.einsum('BTNH,HK->BTNK', x, wi)
      return x + kern(y, y, y, seg, seg, causal=True, scale=0.25), None
    return jax.lax.scan(body, x, w)[0].sum()

  w = jax.ShapeDtypeStruct((2, H, H), jnp.float32)
  x = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
  temp = jax.jit(jax.grad(layers)).lower(w, x).compile().memory_analysis().temp_size_in_bytes
  assert temp < T * T * N * 4 / 8, temp


def _tiny_inputs(config, B=2, T=40, P=32):
  """Packed rows: 2 images per row (4x4 and 2x2 patches -> 4 + 1 image tokens), 2 examples and
  padding in row 0."""
  from kimi_vl_jax.model.vision import merge_order
  rng = np.random.default_rng(0)
  pad_id = config.media_placeholder_token_id
  ids = rng.integers(1, 1000, size=(B, T))
  ids[:, 3:7] = pad_id
  ids[:, 25] = pad_id
  seg = np.array([[1] * 20 + [2] * 15 + [0] * 5, [1] * 40])
  pos = np.concatenate([np.arange(20), np.arange(15), np.zeros(5, int)])
  coords = []
  for h, w in ((4, 4), (2, 2)):
    order = merge_order(h, w, config.vision.merge_kernel)
    coords.append(np.stack([order // w, order % w], -1))
  coords = np.concatenate(coords + [np.zeros((P - 20, 2), int)])
  return dict(
      input_ids=jnp.asarray(ids, jnp.int32), segment_ids=jnp.asarray(seg, jnp.int32),
      positions=jnp.asarray(np.stack([pos, np.arange(40)]), jnp.int32),
      patches=jnp.asarray(rng.normal(size=(B, P, config.vision.patch_dim)), jnp.float32),
      patch_coords=jnp.asarray(np.stack([coords] * B), jnp.int32),
      patch_image_ids=jnp.asarray(np.stack([[1] * 16 + [2] * 4 + [0] * 12] * B), jnp.int32),
      image_grid_hws=jnp.asarray([[[4, 4], [2, 2]]] * B, jnp.int32))


def test_tiny_kimi_vl_flash_equals_dense():
  """The whole tiny model (MoonViT + MLA decoder): logits and parameter gradients."""
  import dataclasses
  from kimi_vl_jax.model import KimiVL, get_preset
  dense_cfg = get_preset('tiny')
  # One vision block, one dense + one MoE decoder layer: every code path, less compile time.
  dense_cfg = dense_cfg.replace(vision=dataclasses.replace(dense_cfg.vision, num_layers=1),
                                text=dataclasses.replace(dense_cfg.text, num_layers=2))
  flash_cfg = dense_cfg.replace(attention_impl='flash', attention_block_q=8, attention_block_kv=8)
  inputs = _tiny_inputs(dense_cfg)
  params = KimiVL(dense_cfg).init(jax.random.key(0), **inputs)['params']

  def run(cfg):
    model = KimiVL(cfg)
    def loss(p):
      logits = model.apply({'params': p}, **inputs)
      return (jax.nn.log_softmax(logits) * (inputs['segment_ids'] > 0)[..., None]).mean(), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (l_d, logits_d), g_d = run(dense_cfg)
  (l_f, logits_f), g_f = run(flash_cfg)
  np.testing.assert_allclose(logits_f, logits_d, rtol=1e-5, atol=1e-5)
  g_f, g_d = nn.unbox(g_f), nn.unbox(g_d)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The vision tower's gradients are not trivially zero (the images reach the loss).
  assert float(jnp.abs(g_f['vision_tower']['patch_embed']['kernel']).max()) > 0


def test_config_rejects_unknown_impl():
  from kimi_vl_jax.model import get_preset
  with pytest.raises(ValueError, match='attention_impl'):
    get_preset('tiny', attention_impl='splash')
  with pytest.raises(ValueError, match='attention_block_q'):
    get_preset('tiny', attention_block_q=0)



# ------------------------------------------------------------------------------------------
# Padding costs nothing: executed block pairs, counted at run time.

def count_blocks(monkeypatch) -> list:
  """Counts the block pairs flash attention computes, forward and backward, while they run (a
  callback inside the taken branch of each block's `lax.cond`)."""
  calls = []
  real = flash._block_logits

  def counting(q, *args, **kw):
    jax.debug.callback(lambda: calls.append(1))
    return real(q, *args, **kw)

  monkeypatch.setattr(flash, '_block_logits', counting)
  return calls


def _image_rows():
  """Row 0: images of 20 and 12 patches, then 32 padding slots; row 1: all padding."""
  return jnp.asarray([[1] * 20 + [2] * 12 + [0] * 32, [0] * 64], jnp.int32)


@pytest.mark.parametrize('per_row', [False, True])
def test_padding_blocks_are_skipped(per_row, monkeypatch):
  calls = count_blocks(monkeypatch)
  seg = _image_rows()
  q, k, v = _qkv(2, 64, 64, 2, 8, 8, seed=5)
  attend = jax.jit(lambda q, k, v, seg: flash.flash_attention(
      q, k, v, seg, seg, causal=False, scale=0.3, block_q=16, block_kv=16, per_row=per_row))
  out = attend(q, k, v, seg)
  jax.effects_barrier()
  # Queries 0..31 x keys 0..31 only: 2 x 2 of the 4 x 4 blocks, whatever row 1 holds.
  assert len(calls) == 4, len(calls)
  alone = flash.flash_attention(q[:1], k[:1], v[:1], seg[:1], seg[:1], causal=False, scale=0.3,
                                block_q=16, block_kv=16)
  np.testing.assert_array_equal(out[:1], alone)
  np.testing.assert_array_equal(out[:, 32:], 0.0)          # padding attends to nothing: 0
  np.testing.assert_array_equal(out[1], 0.0)
  _check(q, k, v, seg, seg, causal=False, bq=16, bk=16, per_row=per_row)   # == dense


def test_per_row_listed_blocks_equal_dense():
  """The while_loop over listed live triples: causal packed rows with padding and a ragged
  length, local queries against full keys (context-parallel shape), MLA head dims."""
  q, k, v = _qkv(2, 37, 37, 3, 8, 5)
  seg = jnp.asarray([[1] * 10 + [2] * 20 + [0] * 7, [1] * 37], jnp.int32)
  _check(q, k, v, seg, seg, causal=True, per_row=True)
  index = np.arange(64)
  q_index = np.concatenate([index[8:16], index[48:56]])
  q, k, v = _qkv(2, 16, 64, 2, 24, 16, seed=4)
  kv_seg = jnp.asarray([[1] * 20 + [2] * 40 + [0] * 4, [1] * 64], jnp.int32)
  _check(q, k, v, kv_seg[:, q_index], kv_seg, causal=True, q_pos=jnp.asarray(q_index)[None],
         kv_pos=jnp.asarray(index)[None], bq=8, bk=16, per_row=True)


def test_all_padding_row_costs_nothing_row_by_row(monkeypatch):
  """Row 0 needs the diagonal blocks of its images, row 1 (one image of 48) a bigger square:
  with the table taken over the batch every row runs the union; per row, each row its own."""
  seg = jnp.asarray([[1] * 16 + [2] * 16 + [0] * 32, [1] * 48 + [0] * 16], jnp.int32)
  q, k, v = _qkv(2, 64, 64, 2, 8, 8, seed=6)
  counts = {}
  for per_row in (False, True):
    calls = count_blocks(monkeypatch)
    jax.grad(lambda q: flash.flash_attention(q, k, v, seg, seg, causal=False, scale=0.3,
                                             block_q=16, block_kv=16, per_row=per_row).sum())(q)
    jax.effects_barrier()
    counts[per_row] = len(calls)
  # Forward + backward. Batch-wide table: the union, 3 x 3 block pairs, each computed for both
  # rows (36 row-blocks); per row: row 0's 2 and row 1's 9, each for its own row (22).
  assert counts == {False: 18, True: 22}, counts
  ends = jnp.asarray([[0] * 64, [1] * 48 + [0] * 16], jnp.int32)
  calls = count_blocks(monkeypatch)
  flash.flash_attention(q, k, v, ends, ends, causal=False, scale=0.3, block_q=16, block_kv=16,
                        per_row=True)
  jax.effects_barrier()
  assert len(calls) == 9                                    # row 1's 3 x 3, row 0 nothing
