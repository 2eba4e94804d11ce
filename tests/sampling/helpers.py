"""Shared set-up of the sampling tests: tiny configs and random parameters, ragged prompts
(text and images), and the full-sequence (teacher-forced) forward of prompt + continuation."""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.model.config import get_preset
from kimi_vl_jax.model.kimi_vl import KimiVL, init_params
from kimi_vl_jax.sampling.prompts import Prompt, prefill_batch

FIXTURE = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'kimi_vl_tiny')
YARN = (('beta_fast', 32), ('beta_slow', 1), ('factor', 4.0), ('mscale', 1.0),
        ('mscale_all_dim', 1.0), ('original_max_position_embeddings', 16), ('rope_type', 'yarn'))


def config(variant: str = 'plain'):
  """The tiny preset; 'qlora' adds a query low-rank projection, 'yarn' YaRN rope scaling."""
  c = get_preset('tiny')
  if variant == 'qlora':
    return c.replace(text=dataclasses.replace(c.text, q_lora_rank=24))
  if variant == 'yarn':
    return c.replace(text=dataclasses.replace(c.text, rope_scaling=YARN))
  assert variant == 'plain', variant
  return c


@functools.lru_cache(maxsize=None)
def params(variant: str = 'plain', seed: int = 0):
  return nn.meta.unbox(init_params(config(variant), jax.random.PRNGKey(seed)))


def text_prompts(lengths, seed=0, vocab=1000):
  r = np.random.default_rng(seed)
  return [Prompt(r.integers(1, vocab, size=n)) for n in lengths]


def image_prompt(cfg, grids=((4, 4),), text=(5, 3), seed=0):
  """A prompt with random images of `grids` (patches), each placeholder run between text."""
  r = np.random.default_rng(seed)
  ids, pv = list(r.integers(1, 1000, size=text[0])), []
  for h, w in grids:
    ids += [cfg.media_placeholder_token_id] * (h * w // 4) + list(r.integers(1, 1000, size=2))
    pv.append(r.normal(size=(h * w, 3, 14, 14)).astype(np.float32))
  ids += list(r.integers(1, 1000, size=text[1]))
  return Prompt(np.asarray(ids), np.concatenate(pv), np.asarray(grids, np.int32))


def teacher_forced_logits(cfg, p, prompts, continuations):
  """Full-sequence forward logits [B, T + n, V] of each prompt followed by its continuation
  (continuations [B, n]); row b's token t is predicted at index t - 1."""
  n = continuations.shape[1]
  T = max(len(q.input_ids) for q in prompts) + n
  batch = prefill_batch(prompts, len(prompts), T, cfg)
  ids, seg = batch['input_ids'], batch['segment_ids']
  for b, q in enumerate(prompts):
    L = len(q.input_ids)
    ids[b, L:L + n] = continuations[b]
    seg[b, L:L + n] = 1
  images = {k: batch[k] for k in ('patches', 'patch_coords', 'patch_image_ids', 'image_grid_hws')
            if k in batch}
  return np.asarray(jax.jit(KimiVL(cfg).apply)({'params': p}, ids, positions=batch['positions'],
                                                segment_ids=seg, **images))
