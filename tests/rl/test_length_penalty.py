"""k1.5's length reward: the formula per group and the warm-up schedule."""

import numpy as np
import pytest

from kimi_vl_jax.rl.length_penalty import LengthPenaltyConfig, length_rewards


def test_formula_per_group():
  lengths = [10, 20, 30, 40, 5, 5, 5, 5]
  correct = [True, True, False, False, True, False, True, False]
  out = length_rewards(np.array(lengths), np.array(correct), k=4)
  lam = [0.5 - (10 - 10) / 30, 0.5 - 10 / 30, 0.5 - 20 / 30, 0.5 - 30 / 30]
  np.testing.assert_allclose(out[:4], [lam[0], lam[1], min(0, lam[2]), min(0, lam[3])])
  np.testing.assert_array_equal(out[4:], 0.0)   # equal lengths: no length reward


def test_shortest_correct_gets_half_longest_wrong_minus_half():
  out = length_rewards(np.array([3, 9]), np.array([True, False]), k=2)
  np.testing.assert_allclose(out, [0.5, -0.5])


def test_schedule_warms_up_then_ramps():
  cfg = LengthPenaltyConfig(weight=0.2, warmup_iterations=3, ramp_iterations=2)
  assert [cfg.weight_at(i) for i in range(6)] == [0, 0, 0, pytest.approx(0.1), 0.2, 0.2]
  assert LengthPenaltyConfig().weight_at(100) == 0.0


def test_bad_input():
  with pytest.raises(ValueError):
    length_rewards(np.array([1, 2, 3]), np.array([True, False, True]), k=2)
  with pytest.raises(ValueError):
    LengthPenaltyConfig(weight=-1.0)
