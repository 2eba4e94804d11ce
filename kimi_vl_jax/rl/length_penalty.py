"""The length reward of Kimi k1.5 (section 2.3.3), which Kimi-VL-Thinking's RL uses to keep long
chains of thought from growing without bound ("length penalty", Kimi-VL report section 2.4).

Over the k responses of one prompt, with lengths len_j, min_len and max_len:

    lam_j = 0.5 - (len_j - min_len) / (max_len - min_len)      (0 when all lengths are equal)

a correct response gets `lam_j` (the shortest +0.5, the longest -0.5), a wrong one `min(0, lam_j)`
(long wrong answers are penalised, short wrong answers are not rewarded). The term is scaled by a
weight that is 0 during a warm-up, so the policy first learns to solve, then to be brief.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LengthPenaltyConfig:
  """weight: the scale after the ramp (0 = off); warmup_iterations: iterations with weight 0;
  ramp_iterations: a linear rise from 0 to `weight` after the warm-up (0 = a step)."""
  weight: float = 0.0
  warmup_iterations: int = 0
  ramp_iterations: int = 0

  def __post_init__(self):
    if self.weight < 0 or self.warmup_iterations < 0 or self.ramp_iterations < 0:
      raise ValueError(f'length penalty fields must be >= 0: {self}')

  def weight_at(self, iteration: int) -> float:
    """The weight at (0-based) RL iteration `iteration`."""
    if self.weight == 0 or iteration < self.warmup_iterations:
      return 0.0
    if self.ramp_iterations == 0:
      return float(self.weight)
    frac = min(1.0, (iteration - self.warmup_iterations + 1) / self.ramp_iterations)
    return float(self.weight) * frac


def length_rewards(lengths: np.ndarray, correct: np.ndarray, k: int) -> np.ndarray:
  """lengths [R] (response tokens), correct [R] bool, groups of k consecutive rows -> [R] float64
  length reward (unweighted)."""
  lengths = np.asarray(lengths, np.float64)
  correct = np.asarray(correct, bool)
  if lengths.shape != correct.shape or lengths.ndim != 1 or lengths.shape[0] % k:
    raise ValueError(f'lengths {lengths.shape} and correct {correct.shape} must be [G * k], k={k}')
  ln = lengths.reshape(-1, k)
  lo, hi = ln.min(axis=1, keepdims=True), ln.max(axis=1, keepdims=True)
  span = hi - lo
  lam = np.where(span > 0, 0.5 - (ln - lo) / np.where(span > 0, span, 1.0), 0.0).reshape(-1)
  return np.where(correct, lam, np.minimum(0.0, lam))
