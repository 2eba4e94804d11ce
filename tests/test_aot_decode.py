"""The decode plan (`kimi_vl_jax/aot_decode.py`) on the tiny model: cache bytes per token read
off the compiled step, memory and bytes-read accounting, the largest-batch search."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from kimi_vl_jax import aot, aot_decode
from kimi_vl_jax.model.config import get_preset


@pytest.fixture(scope='module')
def tiny():
  return aot_decode.decode_config(get_preset('tiny'))


def _cpu_topology(hbm_bytes: int) -> aot.Topology:
  """The 8 emulated CPU devices, posing as a v5e-8 with the given HBM (the compile is XLA:CPU's)."""
  return dataclasses.replace(aot.topology('v5e-8'), hbm_bytes=hbm_bytes)


@pytest.mark.slow
def test_cache_bytes_and_memory_of_the_compiled_step(tiny):
  t = tiny.text
  rep = aot_decode.compile_decode(tiny, _cpu_topology(aot.GiB), jax.devices(), batch=16,
                                  context=128)
  # Latent c_kv (kv_lora_rank) + rope key per layer, bf16: 3 x (32 + 8) x 2 = 240 B.
  assert rep['cache_bytes_per_token'] == t.num_layers * (t.kv_lora_rank + t.qk_rope_head_dim) * 2
  assert rep['cache_bytes_per_token'] == 240 and rep['moe_impl'] == 'ep_dropless'
  assert rep['mesh']['expert'] == 8 and rep['row_shards'] == 8
  # Arguments per device hold the device's 2 cache rows (2 x 128 slots x 240 B) and more.
  reads = rep['bytes_read']
  assert reads['cache'] == 16 / 8 * 128 * 240
  assert rep['argument'] > reads['cache'] + reads['weights'] / 2
  # Uniform routing of 16 tokens, top-2 of 8 experts: 1 - (3/4)^16 of the experts touched.
  assert math.isclose(reads['experts_touched'], 1 - 0.75 ** 16)
  assert math.isclose(rep['roofline_tokens_per_s'],
                      16 / (reads['total'] / aot_decode.HBM_BANDWIDTH['v5e']))
  assert rep['fits'] and 'cache 240 B/token' in aot_decode.format_plan(_cpu_topology(aot.GiB),
                                                                     rep)


def test_largest_batch_on_the_memory_line():
  GiB = aot.GiB
  # 10 GiB at 8 rows, 13 GiB at 32 rows: 0.125 GiB per row -> 16 GiB at 56 rows.
  assert aot_decode.largest_batch([(8, 10 * GiB), (32, 13 * GiB)], 16 * GiB, 8) == 56
  assert aot_decode.largest_batch([(8, 10 * GiB), (32, 13 * GiB)], 15.9 * GiB, 8) == 48
  assert aot_decode.largest_batch([(8, 17 * GiB), (32, 20 * GiB)], 16 * GiB, 8) == 0
  with pytest.raises(ValueError, match='does not grow'):
    aot_decode.largest_batch([(8, 10 * GiB), (32, 10 * GiB)], 16 * GiB, 8)


def test_hbm_capacity_error_becomes_a_does_not_fit_report():
  err = RuntimeError('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent '
                     'error. Ran out of memory in memory space hbm. Used 15.75G of 15.75G hbm. '
                     'Exceeded hbm capacity by 3.00M.')
  rep = aot_decode.hbm_oom_report(err, 16 * aot.GiB)
  assert not rep['fits'] and rep['total'] == int(15.75 * aot.GiB + 3 * 2 ** 20)
  assert aot_decode.hbm_oom_report(RuntimeError('INTERNAL: other'), aot.GiB) is None


def test_scale_line_scales_the_per_row_part_only():
  GiB = aot.GiB
  # Fixed 8 GiB + 0.25 GiB per row; 4x the context: 1 GiB per row, the same 8 GiB fixed.
  line = aot_decode.scale_line([(8, 10 * GiB), (32, 16 * GiB)], 4.0)
  assert line == [(8, 16 * GiB), (32, 40 * GiB)]


@pytest.mark.slow
def test_search_finds_a_batch_that_fits_and_one_more_step_does_not(tiny, monkeypatch):
  """With a made-up HBM between the memory of 24 and 32 rows, the search lands on 24."""
  devices = jax.devices()
  compiled = {}
  real = aot_decode.compile_decode

  def once(config, topo, devices, *, batch, context, **kw):   # each batch compiled once
    if batch not in compiled:
      compiled[batch] = real(config, topo, devices, batch=batch, context=context, **kw)
    return {**compiled[batch], 'fits': compiled[batch]['total'] <= topo.hbm_bytes}

  monkeypatch.setattr(aot_decode, 'compile_decode', once)
  mem = {b: once(tiny, _cpu_topology(aot.GiB), devices, batch=b, context=512)['total']
         for b in (24, 32)}
  hbm = (mem[24] + mem[32]) // 2
  rep = aot_decode.search_batch(tiny, _cpu_topology(hbm), devices, context=512)
  assert rep['largest_batch'] == 24 and rep['fits'] and rep['total'] <= hbm
  assert sorted(compiled) == [8, 24, 32]


def test_plan_for_an_unattached_tpu_slice(tiny):
  pytest.importorskip('libtpu')
  text, rep = aot_decode.plan(get_preset('tiny'), 'v5e-8', context=256, batch=8)
  assert rep['fits'] and rep['cache_bytes_per_token'] == 240
  assert rep['hbm'] == 16 * aot.GiB and 'v5e-8' in text
  assert rep['xla_bytes_accessed'] > 0
