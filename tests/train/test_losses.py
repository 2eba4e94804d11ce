"""Chunked cross-entropy (train/losses.py): the same loss, metrics and gradients as whole-batch
logits, without ever holding fp32 logits for more than one chunk of tokens."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.train import losses
from tests.train.helpers import make_state, packed_batch

B, T = 2, 24
CHUNK_TOKENS = 16          # -> 3 chunks of 8 positions per row (16 tokens per chunk)


def _loss_and_grads(mc, params, batch, chunk_tokens, z=0.0):
  model = KimiVL(mc)
  fn = lambda p: losses.lm_loss(model, p, batch, z_loss_weight=z, loss_chunk_tokens=chunk_tokens)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


def test_loss_chunks():
  assert losses.loss_chunks(2, 24, 0) == 1
  assert losses.loss_chunks(2, 24, 48) == 1
  assert losses.loss_chunks(2, 24, 16) == 3     # the smallest divisor of 24 with 2 * 24 / n <= 16
  assert losses.loss_chunks(2, 24, 10) == 6     # 5 does not divide 24
  assert losses.loss_chunks(4, 8192, 2048) == 16
  with pytest.raises(ValueError, match='below the 4 rows'):
    losses.loss_chunks(4, 8, 3)
  with pytest.raises(ValueError, match='>= 0'):
    losses.loss_chunks(4, 8, -1)


@pytest.mark.parametrize('tie', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_chunked_equals_whole_batch(tie):
  mc, state, _, _ = make_state()
  params = state.params
  if tie:  # tied head: the logits come from the token-embedding table
    mc = mc.replace(text=dataclasses.replace(mc.text, tie_word_embeddings=True))
    params = dict(params, language_model={k: v for k, v in params['language_model'].items()
                                          if k != 'lm_head'})
  batch = {k: jnp.asarray(v) for k, v in packed_batch(mc, B=B, T=T).items()}
  (l0, a0), g0 = _loss_and_grads(mc, params, batch, 0, z=0.1)
  (l1, a1), g1 = _loss_and_grads(mc, params, batch, CHUNK_TOKENS, z=0.1)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for k in ('ce_sum', 'z_sum', 'loss_sum', 'tokens', 'correct', 'balance_loss'):
    np.testing.assert_allclose(a1[k], a0[k], rtol=1e-6, err_msg=k)
  np.testing.assert_array_equal(a1['expert_load'], a0['expert_load'])
  assert float(a0['tokens']) > 0 and float(a0['z_sum']) > 0
  head = ('embed_tokens', 'embedding') if tie else ('lm_head', 'kernel')
  assert float(jnp.abs(g0['language_model'][head[0]][head[1]]).max()) > 0
  flat0 = jax.tree_util.tree_flatten_with_path(g0)[0]
  flat1 = jax.tree.leaves(g1)
  for (path, x0), x1 in zip(flat0, flat1):
    # fp32 summation order differs (per chunk, then over chunks): relative to the tensor's scale.
    scale = float(np.abs(x0).max())
    np.testing.assert_allclose(x1, x0, rtol=1e-5, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def _vocab_buffers(hlo: str, vocab: int) -> list[int]:
  """Element counts of every f32 array in the HLO text with a dimension of size `vocab`."""
  out = []
  for dims in re.findall(r'f32\[([\d,]+)\]', hlo):
    shape = [int(d) for d in dims.split(',')]
    if vocab in shape:
      out.append(int(np.prod(shape)))
  return out


def test_chunked_loss_never_holds_whole_batch_logits():
  """The compiled loss + gradient of the tiny model (CPU): no f32 buffer larger than one chunk of
  logits; the whole-batch path has the [B, T, V] logits (so the check can fail)."""
  mc, state, _, _ = make_state()
  V = mc.text.vocab_size
  batch = {k: jnp.asarray(v) for k, v in packed_batch(mc, B=B, T=T).items()}
  compiled = {}
  for chunk in (0, CHUNK_TOKENS):
    model = KimiVL(mc)
    fn = lambda p, chunk=chunk: losses.lm_loss(model, p, batch, loss_chunk_tokens=chunk)[0]
    compiled[chunk] = jax.jit(jax.grad(fn)).lower(state.params).compile()
  # The head weight [D, V] and its gradient are the largest legitimate vocab buffers.
  head = mc.text.hidden_size * V
  whole = _vocab_buffers(compiled[0].as_text(), V)
  assert max(whole) >= B * T * V, whole
  chunked = _vocab_buffers(compiled[CHUNK_TOKENS].as_text(), V)
  assert max(chunked) <= max(CHUNK_TOKENS * V, head), sorted(set(chunked))[-5:]


def test_chunked_cross_entropy_temp_memory():
  """Where the logits dominate (vocab 8192, 1024 tokens, 4 chunks): the compiled value + gradient
  (w.r.t. the hidden states and the head weight) needs far less temporary memory chunked, with the
  same values."""
  Bm, Tm, D, V = 4, 256, 16, 8192
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(Bm, Tm, D)), jnp.float32)
  w = jnp.asarray(0.3 * rng.normal(size=(D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, size=(Bm, Tm)), jnp.int32)
  mask = jnp.asarray(rng.random((Bm, Tm)) < 0.8, jnp.float32)

  def loss(h, w, n):
    head = lambda x: jnp.einsum('BTD,DV->BTV', x, w)
    sums = losses.chunked_cross_entropy_sums(h, head, targets, mask, n, z_loss_weight=0.01)
    return sums['loss_sum'], sums

  temp, vals = {}, {}
  for n in (1, 4):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    temp[n] = fn.lower(hidden, w, n).compile().memory_analysis().temp_size_in_bytes
    vals[n] = fn(hidden, w, n)
  (_, s1), g1 = vals[1]
  (_, s4), g4 = vals[4]
  for k in s1:
    np.testing.assert_allclose(s4[k], s1[k], rtol=1e-6, err_msg=k)
  for a, b in zip(g4, g1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
  logits_bytes = Bm * Tm * V * 4                                   # 32 MiB
  assert temp[1] >= 2 * logits_bytes, temp                         # logits + their gradient
  assert temp[4] < temp[1] / 3, temp
