"""Small synthetic packed batches and a train-state builder for the train tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kimi_vl_jax.model.config import get_preset
from kimi_vl_jax.optim import make_optimizer
from kimi_vl_jax.train.train_step import TrainState, new_counters, trainable_tree
from kimi_vl_jax.model.kimi_vl import init_params


def packed_batch(mc, B: int = 2, T: int = 24, seed: int = 0, grid=(4, 4)) -> dict:
  """B rows, each: one image of `grid` patches (its h*w/4 placeholders first) then text; two
  packed segments per row; loss on the second half of each segment."""
  rng = np.random.default_rng(seed)
  h, w = grid
  P, n_img = h * w, h * w // 4
  V = mc.text.vocab_size
  ids = rng.integers(1, V - 8, size=(B, T)).astype(np.int32)
  ids[:, 1:1 + n_img] = mc.media_placeholder_token_id
  seg = np.ones((B, T), np.int32)
  seg[:, T // 2:] = 2
  seg[:, -2:] = 0
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    for s in (1, 2):
      idx = np.where(seg[b] == s)[0]
      pos[b, idx] = np.arange(len(idx))
  targets = np.roll(ids, -1, axis=1)
  loss_mask = ((seg > 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
  loss_mask[:, :1 + n_img] = 0
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  coords = np.stack([rows.ravel(), cols.ravel()], -1).astype(np.int32)
  return {
      'input_ids': ids, 'targets': targets.astype(np.int32), 'loss_mask': loss_mask,
      'segment_ids': seg, 'positions': pos,
      'patches': rng.normal(size=(B, P, mc.vision.patch_dim)).astype(np.float32),
      'patch_coords': np.broadcast_to(coords, (B, P, 2)).copy(),
      'patch_image_ids': np.ones((B, P), np.int32),
      'image_grid_hws': np.tile(np.array([[[h, w]]], np.int32), (B, 1, 1)),
  }


def optim_cfg(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({'schedule': {'kind': 'constant', 'peak_lr': 1e-2},
                                 'weight_decay': 0.1})
  for k, v in kw.items():
    c[k] = v
  return c


def make_state(mc=None, seed: int = 0, **optim_kw):
  """(model config, state, tx, trainable tree) for the tiny preset, unsharded."""
  mc = mc or get_preset('tiny')
  boxed = init_params(mc, jax.random.PRNGKey(seed))
  params = nn.meta.unbox(boxed)
  ocfg = optim_cfg(**optim_kw)
  tx, _ = make_optimizer(ocfg, boxed)
  trainable = trainable_tree(params, ocfg.get('trainable'), tuple(ocfg.get('frozen', ())))
  state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                     opt_state=tx.init(params), rng=jax.random.PRNGKey(1),
                     counters=new_counters())
  return mc, state, tx, trainable
