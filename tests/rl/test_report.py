"""The held-out change an RL run prints at the end: paired by prompt, bootstrap interval."""

import json

import numpy as np
import pytest

from kimi_vl_jax.rl.report import format_change, heldout_change


def _write(path, records):
  with open(path / 'heldout.jsonl', 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def test_change_and_interval(tmp_path):
  rng = np.random.default_rng(0)
  start = (rng.random(200) < 0.3).astype(float)
  end = np.where(rng.random(200) < 0.5, 1.0, start)      # about +0.35 on the prompts it changes
  _write(tmp_path, [
      {'iteration': 0, 'greedy': start.tolist(), 'sampled_mean': start.tolist()},
      {'iteration': 5, 'greedy': start.tolist(), 'sampled_mean': (start * 0.5).tolist()},
      {'iteration': 10, 'greedy': start.tolist(), 'sampled_mean': end.tolist()}])
  c = heldout_change(str(tmp_path))
  assert (c['from_iteration'], c['to_iteration']) == (0, 10)
  m = c['mean_reward']
  assert m['change'] == pytest.approx(end.mean() - start.mean())
  assert 0 < m['ci95'][0] < m['change'] < m['ci95'][1]
  g = c['greedy_accuracy']                               # unchanged: a zero-width interval at 0
  assert g['change'] == 0 and g['ci95'] == [0.0, 0.0]
  assert 'mean_reward' in format_change(c)


def test_noise_interval_contains_zero(tmp_path):
  rng = np.random.default_rng(1)
  a, b = (rng.random(100) < 0.4).astype(float), (rng.random(100) < 0.4).astype(float)
  _write(tmp_path, [{'iteration': 0, 'greedy': a.tolist(), 'sampled_mean': a.tolist()},
                    {'iteration': 3, 'greedy': b.tolist(), 'sampled_mean': b.tolist()}])
  lo, hi = heldout_change(str(tmp_path))['mean_reward']['ci95']
  assert lo < 0 < hi


def test_a_rerun_iteration_counts_once_and_mismatched_sets_are_refused(tmp_path):
  _write(tmp_path, [{'iteration': 0, 'greedy': [0, 0], 'sampled_mean': [0, 0]},
                    {'iteration': 2, 'greedy': [0, 0], 'sampled_mean': [0, 0]},
                    {'iteration': 2, 'greedy': [1, 1], 'sampled_mean': [1, 1]}])
  assert heldout_change(str(tmp_path))['greedy_accuracy']['end'] == 1.0
  _write(tmp_path, [{'iteration': 0, 'greedy': [0], 'sampled_mean': [0]}])
  assert heldout_change(str(tmp_path)) is None
  _write(tmp_path, [{'iteration': 0, 'greedy': [0], 'sampled_mean': [0]},
                    {'iteration': 1, 'greedy': [0, 1], 'sampled_mean': [0, 1]}])
  with pytest.raises(ValueError, match='different prompts'):
    heldout_change(str(tmp_path))
