"""`hf.load` into target shardings: equal to the host load, each block read once, bounded host
memory; any block of any parameter reads exactly the HF ranges it covers; `init_from='hf:DIR'`
lands on the train state's shardings. (Two processes each reading half: tests/parallel/
test_multihost.py.)"""

import dataclasses
import tracemalloc

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from kimi_vl_jax.checkpoint import hf, hf_mapping
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.kimi_vl import init_params
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.train.init import StateFactory, model_config
from test_hf import random_params


def _shardings(config, rules: str, **axes):
  par = mesh_lib.default_config()
  par.rules = rules
  for name, size in axes.items():
    par[name] = size
  abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  return rules_lib.param_shardings(abstract, mesh_lib.make_mesh(par), rules)


def _assert_equal(sharded, host, shardings):
  fs, fh, fsh = (hf_mapping.flatten(t) for t in (sharded, host, shardings))
  assert fs.keys() == fh.keys() == fsh.keys()
  for k in fh:
    assert isinstance(fs[k], jax.Array) and fs[k].sharding == fsh[k], k
    assert fs[k].dtype == fh[k].dtype, k
    np.testing.assert_array_equal(np.asarray(fs[k]), fh[k], err_msg=str(k))


def _bigger():
  """tiny() widened so that parameters dominate the loader's own small allocations."""
  c = config_lib.tiny()
  text = dataclasses.replace(c.text, vocab_size=4096, hidden_size=256, intermediate_size=512,
                             moe_intermediate_size=128, kv_lora_rank=64, qk_nope_head_dim=32,
                             qk_rope_head_dim=16, v_head_dim=32)
  vision = dataclasses.replace(c.vision, hidden_size=128, intermediate_size=256)
  return c.replace(text=text, vision=vision, media_placeholder_token_id=4095)


def _peak_traced(fn):
  tracemalloc.start()
  try:
    out = fn()
    return out, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_fsdp_load_on_8_devices_equals_host_load_with_bounded_host_memory(tmp_path):
  config = _bigger()
  params = random_params(config)
  tree_bytes = sum(x.nbytes for x in hf_mapping.flatten(params).values())
  hf.save(config, params, str(tmp_path))
  del params
  shardings = _shardings(config, 'fsdp', data=8)   # 'embed'-like dims split 8 ways
  (_, host), host_peak = _peak_traced(lambda: hf.load(str(tmp_path)))
  stats = hf.ReadStats()
  (_, sharded), sharded_peak = _peak_traced(
      lambda: hf.load(str(tmp_path), shardings=shardings, stats=stats))
  print(f'\ntree {tree_bytes:,d} B; peak traced host memory: host load {host_peak:,d} B '
        f'({host_peak / tree_bytes:.0%}), 8-way fsdp load {sharded_peak:,d} B '
        f'({sharded_peak / tree_bytes:.1%}); largest block {stats.largest_block_bytes:,d} B; '
        f'{stats.reads} reads, {stats.bytes_read:,d} B read')
  _assert_equal(sharded, host, shardings)
  # The instrument sees numpy buffers (the host load holds the whole tree) ...
  assert host_peak >= tree_bytes
  # ... and the sharded load holds a small fraction of it: one block plus one piece at a time.
  assert sharded_peak < 0.25 * tree_bytes
  assert stats.largest_block_bytes <= tree_bytes // 8
  # One process: every distinct block once, so every byte exactly once.
  assert stats.bytes_read == tree_bytes


def test_partially_replicated_blocks_are_read_once_and_cast_per_block(tmp_path):
  config = config_lib.tiny()
  params = random_params(config)
  hf.save(config, params, str(tmp_path))
  # Experts split 4 ways over 'expert' and replicated over 'data' (2): 4 distinct blocks on 8
  # devices; replicated leaves: one block on 8 devices.
  shardings = _shardings(config, 'fsdp_ep', data=2, expert=4)
  stats = hf.ReadStats()
  _, sharded = hf.load(str(tmp_path), shardings=shardings, dtype=ml_dtypes.bfloat16, stats=stats)
  _, host = hf.load(str(tmp_path), dtype=ml_dtypes.bfloat16)
  _assert_equal(sharded, host, shardings)
  assert stats.bytes_read == sum(x.nbytes for x in hf_mapping.flatten(params).values())
  experts = sharded['language_model']['moe_layers']['mlp']['experts']['up_proj']
  assert experts.dtype == ml_dtypes.bfloat16 and 'expert' in str(experts.sharding.spec)
  gate = sharded['language_model']['moe_layers']['mlp']['gate']
  assert gate['e_score_correction_bias'].dtype == np.float32


def test_any_block_reads_exactly_its_source_ranges():
  """For every parameter and random blocks (including ones that cut inner dims of a flattened
  HF axis, e.g. part of every head), the block equals the host parameter's block and the bytes
  read equal the block's."""
  config = config_lib.tiny().replace(
      text=dataclasses.replace(config_lib.tiny().text, q_lora_rank=24))
  params = hf_mapping.flatten(random_params(config))
  hf_sd = dict(hf_mapping.params_to_hf(hf_mapping.unflatten(params), config))

  class Counting(hf_mapping.ArraySource):
    read_bytes = 0

    def read(self, key, index):
      value = super().read(key, index)
      Counting.read_bytes += value.size * 4
      return value

  source = Counting(hf_sd)
  leaves = hf_mapping.plan(source, config, dtype=np.float32)
  assert leaves.keys() == params.keys()
  rng = np.random.default_rng(0)
  for path, leaf in leaves.items():
    for _ in range(4):
      block = []
      for n in leaf.shape:
        a = int(rng.integers(0, n))
        block.append(slice(a, int(rng.integers(a + 1, n + 1))))
      block = tuple(block)
      Counting.read_bytes = 0
      got = hf_mapping.read_block(leaf, block, source)
      np.testing.assert_array_equal(got, params[path][block], err_msg=str((path, block)))
      if leaf.rule.kind != 'conv':  # the patch conv reads whole output channels
        assert Counting.read_bytes == got.size * 4, (path, block)


def _train_cfg(init_from, **model_overrides):
  c = ml_collections.ConfigDict()
  c.model = 'tiny'
  c.model_overrides = model_overrides
  c.init_from = init_from
  c.seed = 0
  c.optim = {'schedule': {'kind': 'constant', 'peak_lr': 1e-3}}
  c.parallel = mesh_lib.default_config()
  c.parallel.data, c.parallel.expert, c.parallel.rules = 2, 4, 'fsdp_ep'
  return c


def test_init_from_hf_loads_into_the_state_shardings(tmp_path):
  config = config_lib.tiny()
  params = random_params(config)
  hf.save(config, params, str(tmp_path))
  cfg = _train_cfg(f'hf:{tmp_path}')
  mesh = mesh_lib.make_mesh(cfg.parallel)
  factory = StateFactory(cfg, model_config(cfg), mesh)
  state = factory.create()
  _assert_equal(state.params, params, factory.param_shardings)
  # A model config that disagrees with the checkpoint stops before reading, naming the shapes.
  bad = _train_cfg(f'hf:{tmp_path}', text={'moe_intermediate_size': 48})
  with pytest.raises(ValueError, match=r'experts/gate_proj: checkpoint \(2, 8, 64, 32\) vs '
                                       r'target \(2, 8, 64, 48\)'):
    StateFactory(bad, model_config(bad), mesh).create()
