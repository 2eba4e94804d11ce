"""The RL plan (`kimi_vl_jax/aot_rl.py`) on the tiny RL config and the 8 emulated CPU devices:
the policy step and the colocated decode step compile on one mesh, the decode step takes the
trainer's parameter shards, and the two peaks add the resident buffers."""

import dataclasses
import importlib.util
import os

import jax
import pytest

from kimi_vl_jax import aot, aot_rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rl_tiny(**rl):
  spec = importlib.util.spec_from_file_location('rl_config', os.path.join(ROOT, 'configs',
                                                                          'rl.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config('tiny')
  with cfg.unlocked():
    cfg.init_from = 'scratch'
    cfg.parallel.data, cfg.parallel.expert, cfg.parallel.rules = 4, 2, 'dp_ep'
    cfg.rl.update(rl)
  return cfg


@pytest.mark.slow
def test_policy_and_decode_steps_planned_together():
  cfg = _rl_tiny(kl_to_start=True)
  topo = dataclasses.replace(aot.topology('v5e-8'), hbm_bytes=aot.GiB)
  text, rep = aot_rl.plan(cfg, topo, devices=jax.devices(), rows=16, seq_len=64,
                          decode_batch=16, context=128)
  t, d = rep['train'], rep['decode']
  assert (t['rows'], t['seq_len'], d['batch'], d['context']) == (16, 64, 16, 128)
  assert d['moe_impl'] == 'ep_dropless'          # experts split over the expert axis
  # The starting policy is one more copy of the (sharded) parameters.
  assert rep['start_params_bytes'] == rep['params_bytes'] > 0
  assert rep['state_bytes'] > rep['params_bytes']    # + Muon momentum, Adam moments (ZeRO-1)
  assert rep['train_peak'] == t['total'] + rep['params_bytes']
  assert rep['decode_peak'] == d['total'] + rep['state_bytes']
  assert rep['peak'] == max(rep['train_peak'], rep['decode_peak']) and rep['fits']
  assert 'together: training' in text and 'FITS' in text


def test_shard_bytes_counts_the_largest_shard():
  mesh = jax.make_mesh((8,), ('x',))
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))
  a = jax.ShapeDtypeStruct((64, 3), 'float32', sharding=s)
  b = jax.ShapeDtypeStruct((5,), 'bfloat16')
  assert aot_rl.shard_bytes({'a': a, 'b': b}) == 8 * 3 * 4 + 5 * 2


def test_refuses_other_stages():
  cfg = _rl_tiny()
  with cfg.unlocked():
    cfg.stage = 'joint_sft'
  with pytest.raises(ValueError, match='rl stage'):
    aot_rl.plan(cfg, 'v5e-8')
