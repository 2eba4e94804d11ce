"""Prompt selection: prioritized-sampling frequencies follow 1 - success rate (chi-square), the
curriculum admits harder prompts on schedule, too-easy prompts are dropped, stats round-trip."""

import numpy as np
import pytest

from kimi_vl_jax.rl import prompt_selection as ps


def test_first_draw_frequencies_follow_one_minus_success_rate():
  stats = ps.PromptStats.zeros(5)
  # success rates 0, 1/4, 1/2, 3/4, 1 -> weights 1, .75, .5, .25, 0
  for i, s in enumerate([0, 1, 2, 3, 4]):
    stats.update([i] * 4, [True] * s + [False] * (4 - s))
  w = ps.priorities(stats, np.ones(5, bool))
  np.testing.assert_allclose(w, [1, .75, .5, .25, 0])
  rng = np.random.default_rng(0)
  draws = 20_000
  counts = np.bincount([ps.sample_prompts(rng, w, 1)[0] for _ in range(draws)], minlength=5)
  assert counts[4] == 0
  expected = draws * w[:4] / w.sum()
  chi2 = float(np.sum((counts[:4] - expected) ** 2 / expected))
  assert chi2 < 16.27, (counts, expected, chi2)   # 3 dof, p = 0.001


def test_batches_are_distinct_and_reproducible():
  w = np.arange(1, 11, dtype=float)
  a = ps.sample_prompts(np.random.default_rng(7), w, 6)
  b = ps.sample_prompts(np.random.default_rng(7), w, 6)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 6
  with pytest.raises(ValueError, match='positive sampling weight'):
    ps.sample_prompts(np.random.default_rng(0), np.array([1.0, 0, 0]), 2)


def test_curriculum_and_drops():
  cur = ps.Curriculum(((0, 0), (5, 1), (9, 2)))
  diff = np.array([0, 1, 2, 0])
  np.testing.assert_array_equal(cur.eligible(diff, 0), [1, 0, 0, 1])
  np.testing.assert_array_equal(cur.eligible(diff, 6), [1, 1, 0, 1])
  np.testing.assert_array_equal(cur.eligible(diff, 9), [1, 1, 1, 1])
  with pytest.raises(ValueError):
    ps.Curriculum(((1, 0),))
  stats = ps.PromptStats.zeros(4)
  stats.dropped = ps.solved_by_start([0, 0, 1, 1, 3, 3], [1, 1, 1, 0, 0, 0], 4, 2)
  np.testing.assert_array_equal(stats.dropped, [1, 0, 0, 0])
  assert ps.priorities(stats, np.ones(4, bool))[0] == 0
  with pytest.raises(ValueError, match='samples'):
    ps.solved_by_start([0, 0, 1], [1, 1, 1], 4, 2)


def test_stats_round_trip():
  stats = ps.PromptStats.zeros(3)
  stats.update([0, 2, 2], [True, False, True])
  back = ps.PromptStats.from_state(stats.state())
  np.testing.assert_array_equal(back.success_rate(), [1.0, 0.0, 0.5])
