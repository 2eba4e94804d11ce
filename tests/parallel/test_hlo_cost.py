"""Loop-corrected accounting of compiled programs: loops x trip counts, dots, bytes, collectives,
conditionals, parts; the tiny model's scanned step against its unrolled compile."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_vl_jax.parallel import hlo_cost


def _xla(compiled) -> dict:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def _f32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_dot_flops_and_bytes_agree_with_cost_analysis_on_a_loop_free_program():
  def f(a, b, c):
    x = jnp.einsum('bij,bjk->bik', a, b)             # batch dims
    return jnp.einsum('bik,kl->bil', x, c)           # a contraction over one dim
  compiled = jax.jit(f).lower(_f32(3, 16, 32), _f32(3, 32, 24), _f32(24, 40)).compile()
  cost = hlo_cost.compiled_cost(compiled)
  want = 2 * 3 * 16 * 32 * 24 + 2 * 3 * 16 * 24 * 40
  assert cost.matmul_flops == want == _xla(compiled)['flops']
  np.testing.assert_allclose(cost.bytes, _xla(compiled)['bytes accessed'], rtol=0.02)
  assert cost.loops == [] and cost.collective_bytes == 0


def _loop_program(unroll: bool):
  """An outer fori_loop of 5 over an inner scan of 3 matmuls + tanh, or the same unrolled."""
  def inner(h, w):
    return jnp.tanh(h @ w), None

  def f(x, ws):
    def outer(i, h):
      if unroll:
        for j in range(ws.shape[0]):
          h, _ = inner(h, ws[j])
        return h
      return jax.lax.scan(inner, h, ws)[0]
    if unroll:
      for i in range(5):
        x = outer(i, x)
      return x
    return jax.lax.fori_loop(0, 5, outer, x)
  return jax.jit(f).lower(_f32(8, 64), _f32(3, 64, 64)).compile()


def test_nested_loops_are_multiplied_by_their_trip_counts():
  looped, unrolled = _loop_program(False), _loop_program(True)
  a, b = hlo_cost.compiled_cost(looped), hlo_cost.compiled_cost(unrolled)
  want = 5 * 3 * 2 * 8 * 64 * 64
  assert a.matmul_flops == b.matmul_flops == want
  assert a.totals['transcendentals'] == b.totals['transcendentals'] == 5 * 3 * 8 * 64
  assert sorted(n for _, n in a.loops) == [3, 5] and not a.unknown_trip_counts
  # What XLA reports counts each loop body once: one matmul of the 15.
  assert _xla(looped)['flops'] < want / 5
  np.testing.assert_allclose(_xla(unrolled)['flops'], b.flops, rtol=0.01)


def test_trip_count_from_the_loop_condition_without_the_annotation():
  text = _loop_program(False).as_text()
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', '', text)
  assert stripped != text
  cost = hlo_cost.hlo_cost(stripped)
  assert cost.matmul_flops == 5 * 3 * 2 * 8 * 64 * 64 and not cost.unknown_trip_counts


def test_conditional_counts_the_costliest_branch_and_reports_the_cheapest():
  def f(p, x, w):
    return jax.lax.cond(p, lambda: (x @ w) @ w, lambda: x)
  compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((), jnp.bool_), _f32(16, 32),
                              _f32(32, 32)).compile()
  cost = hlo_cost.compiled_cost(compiled)
  assert cost.matmul_flops == 2 * (2 * 16 * 32 * 32)
  assert cost.lower['matmul_flops'] == 0


_HLO = """HloModule m, entry_computation_layout={(f32[4,256]{1,0}, f32[64,8]{1,0})->f32[16,256]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}, execution_thread="sparsecore"

%fused_update (p0: f32[64,8], p1: f32[1,8], p2: s32[]) -> f32[64,8] {
  %p0 = f32[64,8]{1,0} parameter(0)
  %p1 = f32[1,8]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[64,8]{1,0} dynamic-update-slice(%p0, %p1, %p2, %z)
}

%fused_slice (q0: f32[64,8], q1: s32[]) -> f32[1,8] {
  %q0 = f32[64,8]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z2 = s32[] constant(0)
  ROOT %ds = f32[1,8]{1,0} dynamic-slice(%q0, %q1, %z2), dynamic_slice_sizes={1,8}
}

ENTRY %main (x: f32[4,256], t: f32[64,8]) -> f32[16,256] {
  %x = f32[4,256]{1,0} parameter(0)
  %t = f32[64,8]{1,0} parameter(1)
  %i = s32[] constant(3)
  %ag = ((f32[4,256]{1,0}), f32[16,256]{1,0}) all-gather-start(%x), replica_groups={{0,1,2,3}}, dimensions={0}, metadata={op_name="jit(f)/transpose(jvp(KimiVL))/language_model/moe_layers/self_attn/all_gather"}
  %agd = f32[16,256]{1,0} all-gather-done(%ag)
  %ar = f32[16,256]{1,0} all-reduce(%agd), replica_groups={{0,1,2,3}}, to_apply=%add, metadata={op_name="jit(f)/optimizer/psum"}
  %row = f32[1,8]{1,0} fusion(%t, %i), kind=kLoop, calls=%fused_slice
  %upd = f32[64,8]{1,0} fusion(%t, %row, %i), kind=kLoop, calls=%fused_update
  ROOT %rs = f32[16,256]{1,0} collective-permute(%ar), source_target_pairs={{0,1},{1,0}}
}
"""


def test_collective_and_in_place_bytes_from_module_text():
  cost = hlo_cost.hlo_cost(_HLO)
  gathered = 16 * 256 * 4
  assert cost.collectives == {'all-gather': gathered, 'all-reduce': gathered,
                              'collective-permute': gathered}
  assert cost.by_part['attention']['collective_bytes'] == gathered
  assert cost.by_part['optimizer']['collective_bytes'] == gathered
  # The slicing fusion reads one row; the in-place update writes one row (and reads it).
  row = 8 * 4
  slice_bytes = row + 4 + row
  update_bytes = row + 4 + row
  assert cost.by_part['other']['bytes'] == slice_bytes + update_bytes + 2 * gathered
  assert cost.by_part['optimizer']['bytes'] == 2 * gathered


def test_parts_from_op_names():
  part = hlo_cost.part_of
  assert part('jit(train_step)/jvp(KimiVL)/KimiVL.encode_images/vision_tower/while/body/'
              'eval_jaxpr/blocks/mlp/fc1/dot_general') == 'vision'
  assert part('jit(train_step)/transpose(jvp(KimiVL))/language_model/language_model._run/'
              'moe_layers/self_attn/dot_general') == 'attention'
  assert part('jit(train_step)/jvp(KimiVL)/language_model/language_model._run/moe_layers/mlp/'
              'dot_general') == 'mlp_moe'
  assert part('jit(train_step)/jvp(KimiVL)/language_model/language_model._run/while/body/'
              'jit(dynamic_update_index_in_dim)/dynamic_update_slice') == 'decoder'
  assert part('jit(train_step)/transpose(jvp(KimiVL))/language_model/lm_head/dot_general') == (
      'loss')
  assert part('jit(train_step)/optimizer/dot_general') == 'optimizer'
  assert part('jit(train_step)/add') == 'other'


def test_sharded_program_counts_per_device_work_and_its_collectives():
  mesh = jax.make_mesh((4,), ('x',), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,))
  x_sh, w_sh = NamedSharding(mesh, P('x', None)), NamedSharding(mesh, P(None, 'x'))
  f = jax.jit(lambda x, w: (x @ w).sum(0), in_shardings=(x_sh, w_sh),
              out_shardings=NamedSharding(mesh, P()))
  compiled = f.lower(_f32(64, 128), _f32(128, 256)).compile()
  cost = hlo_cost.compiled_cost(compiled)
  assert cost.matmul_flops == 2 * 64 * 128 * 256 / 4
  # XLA gathers x's rows (64 x 128) and the 4 output slices (256) on every device.
  assert cost.collectives == {'all-gather': (64 * 128 + 256) * 4}
  assert cost.collective_bytes == (64 * 128 + 256) * 4


def _tiny_grad_compiled(scan: bool):
  """The tiny model's loss gradient (vision included) with the layer stacks scanned or not."""
  import dataclasses

  from kimi_vl_jax.model.config import get_preset
  from kimi_vl_jax.model.kimi_vl import KimiVL
  from kimi_vl_jax.model.summary import abstract_params
  from kimi_vl_jax.train.losses import lm_loss
  config = dataclasses.replace(get_preset('tiny'), scan_layers=scan)
  model = KimiVL(config)
  params = abstract_params(config)
  B, T, Pn = 2, 64, 32
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  batch = {'input_ids': i32(B, T), 'targets': i32(B, T), 'loss_mask': _f32(B, T),
           'segment_ids': i32(B, T), 'positions': i32(B, T),
           'patches': _f32(B, Pn, config.vision.patch_dim), 'patch_coords': i32(B, Pn, 2),
           'patch_image_ids': i32(B, Pn), 'image_grid_hws': i32(B, 2, 2)}
  grad = jax.grad(lambda p, b: lm_loss(model, p, b)[0])
  return jax.jit(grad).lower(params, batch).compile()


@pytest.mark.slow
def test_tiny_model_loop_corrected_counts_equal_the_unrolled_compile():
  scanned, unrolled = _tiny_grad_compiled(True), _tiny_grad_compiled(False)
  a, b = hlo_cost.compiled_cost(scanned), hlo_cost.compiled_cost(unrolled)
  assert {n for _, n in a.loops} == {2} and len(a.loops) == 4 and not b.loops
  # Matmul FLOPs: equal, part by part.
  for part in hlo_cost.PARTS:
    assert a.by_part[part]['matmul_flops'] == b.by_part[part]['matmul_flops'], part
  assert a.by_part['vision']['matmul_flops'] > 0 and a.by_part['mlp_moe']['matmul_flops'] > 0
  assert a.by_part['attention']['matmul_flops'] > 0 and a.by_part['loss']['matmul_flops'] > 0
  # All FLOPs (elementwise ones follow fusion decisions): within 1%; XLA undercounts the scan.
  np.testing.assert_allclose(a.flops, b.flops, rtol=0.01)
  np.testing.assert_allclose(b.flops, _xla(unrolled)['flops'], rtol=0.01)
  assert _xla(scanned)['flops'] < 0.9 * a.flops
  # Bytes of the loop-free program agree with XLA's; the scanned program moves more (loop
  # carries, stacking residuals), never less.
  np.testing.assert_allclose(b.bytes, _xla(unrolled)['bytes accessed'], rtol=0.02)
  assert a.bytes >= 0.95 * b.bytes
