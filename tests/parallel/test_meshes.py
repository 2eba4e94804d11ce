"""The tiny KimiVL's loss and gradients on the issue's remaining meshes (data 8; data 2 x expert 4)
equal one device's, and ZeRO-1 shrinks the per-device Muon/AdamW state with the data axis.
(data 2 x context 4 and expert 2 x pipeline 2 x context 2 are in test_context.py, data 2 x
pipeline 2 x expert 2 in test_pipeline_parallel.py; they share the helpers imported here.)"""

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from kimi_vl_jax.model.kimi_vl import KimiVL, init_params
from kimi_vl_jax.optim import make_optimizer
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from test_context import _assert_matches, _batch, _config, _init, _mesh, _run_sharded, _step_fn


def _rows(n):
  """n rows: copies of the two-row fixture batch with different random tokens."""
  parts = [_batch(seed) for seed in range(n // 2)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.slow
@pytest.mark.parametrize('axes, preset, moe_impl', [
    (dict(data=8), 'dp', 'dropless'),
    (dict(data=2, expert=4), 'dp_ep', 'ep_dropless'),
])
def test_loss_and_grads_match_one_device(axes, preset, moe_impl):
  config = _config()
  params = _init(config)
  batch = _rows(8)
  (loss, logits), grads = _step_fn(KimiVL(config))(params, batch)
  cfg = config.replace(text=dataclasses.replace(config.text, moe_impl=moe_impl))
  got, _ = _run_sharded(cfg, params, batch, _mesh(**axes), preset)
  _assert_matches(got, (loss, logits, grads))


def _per_device_bytes(tree) -> int:
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for x, s in zip(jax.tree.leaves(tree[0]), jax.tree.leaves(tree[1])))


def test_zero1_optimizer_state_shrinks_with_the_data_axis():
  config = _config()
  boxed = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
  abstract = nn.meta.unbox(boxed)
  tx, _ = make_optimizer({}, boxed)
  opt = jax.eval_shape(tx.init, abstract)
  sizes = {}
  for data in (1, 2, 8):
    c = mesh_lib.default_config()
    c.update(data=data)
    mesh = mesh_lib.make_mesh(c, devices=jax.devices()[:data])
    shardings = rules_lib.opt_state_shardings(opt, boxed, mesh, 'dp')
    sizes[data] = _per_device_bytes((opt, shardings))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt))
  assert sizes[1] == total
  # Every large buffer splits; only dims no data size divides (tiny 1-D leaves) stay whole.
  assert sizes[2] <= 0.55 * total, sizes
  assert sizes[8] <= 0.2 * total, sizes
