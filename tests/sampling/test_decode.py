"""Cached decoding equals the full-sequence forward: prefill + one decode step per token (absorbed
and expanded MLA) give the logits of a teacher-forced forward over prompt + continuation, for
ragged text and image prompts, q-LoRA and YaRN configs; the sampler's loop state behaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.sampling import decode
from kimi_vl_jax.sampling.prompts import prefill_batch
from tests.sampling import helpers

STEPS = 5


def _cached_logits(cfg, p, prompts, cont, *, absorb, seq_len=16, cache_len=24):
  """Prefill logits [B, V] and the logits of each decode step [n, B, V] fed `cont` [B, n]."""
  batch = prefill_batch(prompts, len(prompts), seq_len, cfg)
  pre = jax.jit(lambda b: decode.prefill(KimiVL(cfg, mode='prefill'), p, b))
  logits0, entries = pre(batch)
  cache = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, cache_len - seq_len), (0, 0))),
                       entries)
  model = KimiVL(cfg, mode='decode', absorb=absorb)
  step = jax.jit(lambda c, tok, pos: model.apply({'params': p}, tok, positions=pos,
                                                 segment_ids=jnp.ones_like(tok), cache=c))
  rows = np.arange(len(prompts))
  out = []
  for i in range(cont.shape[1]):
    pos = batch['lengths'] + i
    logits, e = step(cache, cont[:, i:i + 1], pos[:, None])
    out.append(np.asarray(logits[:, 0]))
    cache = jax.tree.map(lambda c, x: c.at[:, rows, pos].set(x[:, :, 0]), cache, e)
  return np.asarray(logits0), np.stack(out), batch['lengths']


def _check(cfg, p, prompts, seed=0):
  cont = np.random.default_rng(seed).integers(1, 1000, size=(len(prompts), STEPS)).astype(np.int32)
  full = helpers.teacher_forced_logits(cfg, p, prompts, cont)
  got = {}
  for absorb in (True, False):
    logits0, steps, lens = _cached_logits(cfg, p, prompts, cont, absorb=absorb)
    rows = np.arange(len(prompts))
    ref = np.stack([full[rows, lens - 1 + i] for i in range(STEPS + 1)])   # [n + 1, B, V]
    got[absorb] = np.concatenate([logits0[None], steps])
    err = np.abs(got[absorb] - ref).max()
    assert err <= 1e-5, (absorb, err)
  # Absorbed and expanded decode are the same computation regrouped.
  assert np.abs(got[True] - got[False]).max() <= 1e-5


@pytest.mark.parametrize('variant', ['plain', pytest.param('qlora', marks=pytest.mark.slow),
                                     pytest.param('yarn', marks=pytest.mark.slow)])
def test_cached_logits_equal_full_forward_ragged_text(variant):
  cfg, p = helpers.config(variant), helpers.params(variant)
  _check(cfg, p, helpers.text_prompts((5, 11, 3)))


@pytest.mark.slow
def test_cached_logits_equal_full_forward_with_images():
  cfg, p = helpers.config(), helpers.params()
  prompts = [helpers.image_prompt(cfg, grids=((4, 4),), seed=1),
             helpers.text_prompts((7,), seed=2)[0],
             helpers.image_prompt(cfg, grids=((2, 4), (4, 2)), text=(2, 1), seed=3)]
  assert max(len(q.input_ids) for q in prompts) <= 16
  _check(cfg, p, prompts)


def test_decode_without_a_cache_or_positions_is_an_error():
  cfg, p = helpers.config(), helpers.params()
  ids = jnp.ones((1, 1), jnp.int32)
  with pytest.raises(ValueError, match='positions'):
    KimiVL(cfg, mode='decode').apply({'params': p}, ids)
  with pytest.raises(ValueError, match='cache'):
    KimiVL(cfg, mode='decode').apply({'params': p}, ids, positions=ids)
