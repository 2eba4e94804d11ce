"""SigLIP text tower invariants (model/siglip_text.py); parity with transformers'
SiglipTextModel is in tests/checkpoint/test_siglip.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model import siglip_text

CONFIG = config_lib.siglip_tiny_text()


@functools.lru_cache(maxsize=None)
def setup(scan=True):
  model = siglip_text.SiglipTextTower(CONFIG, scan_layers=scan)
  ids = jnp.zeros((2, CONFIG.max_position_embeddings), jnp.int32)
  return random_params(model, ids), jax.jit(lambda p, ids, mask: model.apply({'params': p},
                                                                          ids, mask))


def random_params(model, *args):
  """Seeded normal values in the shapes of `model.init` (abstract: nothing is compiled)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)['params'])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3, shapes)


def test_masked_keys_are_invisible_and_the_last_position_is_pooled():
  params, fn = setup()
  rng = np.random.default_rng(0)
  t = CONFIG.max_position_embeddings
  ids = rng.integers(0, CONFIG.vocab_size, (2, t)).astype(np.int32)
  mask = np.ones((2, t), np.int32)
  mask[:, 5:-1] = 0          # hide positions 5 .. T-2 (the pooled last one stays visible)
  z = np.asarray(fn(params, ids, mask))
  changed = ids.copy()
  changed[:, 5:-1] = rng.integers(0, CONFIG.vocab_size, (2, t - 6))
  np.testing.assert_allclose(np.asarray(fn(params, changed, mask)), z, atol=1e-6)
  # Without the mask those tokens matter; so does the last token in any case.
  full = np.ones_like(mask)
  assert np.abs(np.asarray(fn(params, changed, full)) - np.asarray(fn(params, ids, full))).max() \
      > 1e-3
  last = ids.copy()
  last[:, -1] = (last[:, -1] + 1) % CONFIG.vocab_size
  assert np.abs(np.asarray(fn(params, last, mask)) - z).max() > 1e-3
  assert z.shape == (2, CONFIG.projection_size) and z.dtype == np.float32


def test_unscanned_layers_match_scanned():
  params, fn = setup()
  _, fn_unscanned = setup(scan=False)
  unrolled = dict(params)
  stacked = unrolled.pop('layers')
  for i in range(CONFIG.num_layers):
    unrolled[f'layers_{i}'] = jax.tree.map(lambda a, i=i: a[i], stacked)
  ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size,
                                          (2, CONFIG.max_position_embeddings)).astype(np.int32)
  mask = np.ones_like(ids)
  np.testing.assert_allclose(np.asarray(fn_unscanned(unrolled, ids, mask)),
                             np.asarray(fn(params, ids, mask)), atol=1e-5)
