"""Train checkpoints: retention (keep last N + every K), partial restore of params for
`init_from=orbax:`, init from an orbax params directory; the state lands on the mesh shardings."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kimi_vl_jax.checkpoint import convert
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.train import checkpointing
from kimi_vl_jax.train.init import StateFactory, model_config


class _Iter:
  """A checkpointable counter standing in for the data iterator."""

  def __init__(self):
    self.i = 0

  def get_state(self):
    return {'i': self.i}

  def set_state(self, s):
    self.i = s['i']


def _cfg(init_from='scratch'):
  c = ml_collections.ConfigDict()
  c.model = 'tiny'
  c.model_overrides = {}
  c.init_from = init_from
  c.seed = 3
  c.optim = {'schedule': {'kind': 'constant', 'peak_lr': 1e-3}}
  c.parallel = mesh_lib.default_config()
  c.parallel.data = 2
  c.parallel.expert = 4
  c.parallel.rules = 'fsdp_ep'
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_retention_restore_and_init_sources(tmp_path):
  cfg = _cfg()
  mesh = mesh_lib.make_mesh(cfg.parallel)
  factory = StateFactory(cfg, model_config(cfg), mesh)
  state = factory.create()
  # Sharded as the rules say: experts split over 'expert', optimizer state over 'data' too.
  experts = state.params['language_model']['moe_layers']['mlp']['experts']['gate_proj']
  assert 'expert' in str(experts.sharding.spec)

  workdir = str(tmp_path / 'run')
  mgr = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), interval=2, keep=2,
                                   keep_every=4, async_save=True)
  it = _Iter()
  for step in range(1, 11):
    it.i = step * 10
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    checkpointing.save(mgr, step, state, it, {'phase': 0})
  mgr.wait_until_finished()
  # keep the last 2 of the every-2 saves, plus multiples of 4 (step 1 is the manager's first save).
  assert sorted(mgr.all_steps()) == [4, 8, 10]
  it2 = _Iter()
  restored = checkpointing.restore(mgr, 8, factory.abstract, it2)
  assert it2.i == 80 and int(restored.step) == 8
  assert checkpointing.restore_meta(mgr, 8) == {'phase': 0}
  for a, b in zip(_leaves(restored.params), _leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  got = restored.params['language_model']['moe_layers']['mlp']['experts']['gate_proj']
  assert got.sharding == experts.sharding
  mgr.close()

  # init_from=orbax:WORKDIR reads only the params, onto the new run's shardings; fresh optimizer.
  other = StateFactory(_cfg(f'orbax:{workdir}'), model_config(cfg), mesh).create()
  assert int(other.step) == 0
  for a, b in zip(_leaves(other.params), _leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  assert all(not np.any(x) for x in _leaves(other.opt_state) if x.dtype == np.float32)

  # init_from=params:DIR (what checkpoint.convert writes).
  pdir = str(tmp_path / 'params')
  convert.save_params(model_config(cfg), jax.device_get(state.params), pdir)
  third = StateFactory(_cfg(f'params:{pdir}'), model_config(cfg), mesh).create()
  for a, b in zip(_leaves(third.params), _leaves(state.params)):
    np.testing.assert_array_equal(a, b)
