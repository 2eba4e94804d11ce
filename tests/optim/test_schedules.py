"""LR schedules: warmup + cosine / linear, multi-phase with re-warm (joint SFT, docs/recipe.md)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kimi_vl_jax.optim import schedules


def _vals(fn, steps):
  return np.array([float(fn(jnp.int32(s))) for s in steps])


def test_warmup_cosine_values():
  fn = schedules.warmup_cosine(peak_lr=1.0, total_steps=110, warmup_steps=10, end_lr=0.1)
  got = _vals(fn, [0, 5, 10, 60, 110, 500])
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6, atol=1e-7)
  # A quarter into the decay: end + (peak - end) * (1 + cos(pi/4)) / 2.
  np.testing.assert_allclose(float(fn(35)), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-6)


def test_warmup_linear_values_and_no_warmup():
  fn = schedules.warmup_linear(peak_lr=2.0, total_steps=12, warmup_steps=4, end_lr=0.0, init_lr=1.0)
  np.testing.assert_allclose(_vals(fn, [0, 2, 4, 8, 12, 20]), [1.0, 1.5, 2.0, 1.0, 0.0, 0.0],
                             rtol=1e-6, atol=1e-7)
  fn0 = schedules.warmup_linear(peak_lr=2.0, total_steps=10)
  np.testing.assert_allclose(_vals(fn0, [0, 5, 10]), [2.0, 1.0, 0.0], rtol=1e-6, atol=1e-7)


def _sft_config():
  cfg = ml_collections.ConfigDict()
  cfg.kind = 'multi_phase'
  cfg.phases = [  # joint SFT: 1 epoch @32K 2e-5 -> 2e-6, then 1 epoch @128K re-warm 1e-5 -> 1e-6
      dict(steps=100, warmup_steps=10, peak_lr=2e-5, end_lr=2e-6, decay='cosine'),
      dict(steps=50, warmup_steps=5, peak_lr=1e-5, end_lr=1e-6, decay='linear'),
  ]
  return cfg


def test_multi_phase_boundaries_rewarm_and_continuity():
  fn = schedules.make_schedule(_sft_config())
  got = _vals(fn, [0, 10, 99, 100, 102, 105, 130, 150, 400])
  want = [0.0, 2e-5,
          2e-6 + 18e-6 * 0.5 * (1 + np.cos(np.pi * 89 / 90)),  # last step of phase 1
          2e-6,             # phase 2 starts where phase 1 ended (re-warm from its end_lr)
          2e-6 + 8e-6 * 2 / 5, 1e-5,                            # re-warm to the new peak
          1e-5 - 9e-6 * 25 / 45, 1e-6, 1e-6]                    # linear decay, then hold
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  # Continuity: no jump bigger than the largest single warmup increment anywhere.
  all_vals = _vals(jax.jit(fn), range(0, 160))
  assert np.max(np.abs(np.diff(all_vals))) <= 2e-5 / 10 + 1e-12
  # The re-warm is a real rise after the phase-1 decay.
  assert all_vals[105] > all_vals[100] * 4


def test_multi_phase_explicit_init_lr_and_single_phase():
  fn = schedules.multi_phase([dict(steps=10, peak_lr=1.0, end_lr=0.5, decay='linear'),
                              dict(steps=10, warmup_steps=2, peak_lr=1.0, init_lr=0.0,
                                   decay='constant')])
  np.testing.assert_allclose(_vals(fn, [0, 5, 10, 11, 12, 19, 30]),
                             [1.0, 0.75, 0.0, 0.5, 1.0, 1.0, 1.0], rtol=1e-6, atol=1e-7)
  one = schedules.multi_phase([dict(steps=4, peak_lr=3.0)])
  np.testing.assert_allclose(_vals(one, [0, 4]), [3.0, 3.0])


@pytest.mark.parametrize('cfg, msg', [
    (dict(kind='warmup_cosine', peak_lr=1.0, total_steps=10, warmup_steps=20), 'warmup_steps'),
    (dict(kind='cosine', peak_lr=1.0), 'schedule.kind'),
    (dict(kind='warmup_linear', peak_lr=1.0, total_steps=10, decay_steps=3), 'unknown fields'),
    (dict(kind='multi_phase', phases=[dict(steps=5, peak_lr=1.0, decay='exp')]), 'phase 0'),
    (dict(kind='multi_phase', phases=[dict(steps=5)]), 'peak_lr'),
    (dict(kind='warmup_cosine', peak_lr=-1.0, total_steps=10), 'peak_lr'),
])
def test_bad_configs_name_the_problem(cfg, msg):
  with pytest.raises(ValueError, match=msg):
    schedules.make_schedule(ml_collections.ConfigDict(cfg))
