"""Which prompts an RL iteration samples (Kimi k1.5 section 2.3.4, "sampling strategies"; Kimi-VL
report section 2.4, "difficulty control").

* Curriculum: prompts carry a difficulty label (an int, 0 = easiest); a schedule admits harder
  labels as iterations pass, so early iterations train where the policy can earn reward.
* Prioritized sampling: a prompt is drawn with probability proportional to `1 - success_rate`,
  its success rate tracked across iterations (`PromptStats`, saved in the checkpoint). Prompts
  never tried count as success rate 0 (maximal priority) until they are.
* Too-easy prompts: those the starting model solves in all N of its samples are dropped before
  training (`solved_by_start`); they carry no learning signal under a group baseline.

Everything is host-side numpy with an explicit `np.random.Generator`, so a restored run draws the
same prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class PromptStats:
  """Per-prompt attempts and successes (a success is a reward above the correctness threshold),
  accumulated over every iteration of the run, and the prompts dropped as too easy."""
  attempts: np.ndarray     # int64 [num_prompts]
  successes: np.ndarray    # int64 [num_prompts]
  dropped: np.ndarray      # bool [num_prompts]

  @classmethod
  def zeros(cls, num_prompts: int) -> 'PromptStats':
    return cls(np.zeros(num_prompts, np.int64), np.zeros(num_prompts, np.int64),
               np.zeros(num_prompts, bool))

  def update(self, prompt_ids: Sequence[int], solved: Sequence[bool]) -> None:
    """One entry per response: the prompt it answered and whether it was correct."""
    ids = np.asarray(prompt_ids, np.int64)
    np.add.at(self.attempts, ids, 1)
    np.add.at(self.successes, ids, np.asarray(solved, bool).astype(np.int64))

  def success_rate(self) -> np.ndarray:
    """[num_prompts] float64; 0 for prompts never attempted."""
    return np.where(self.attempts > 0, self.successes / np.maximum(self.attempts, 1), 0.0)

  def state(self) -> dict[str, np.ndarray]:
    return {'attempts': self.attempts.copy(), 'successes': self.successes.copy(),
            'dropped': self.dropped.copy()}

  @classmethod
  def from_state(cls, state: dict) -> 'PromptStats':
    return cls(np.asarray(state['attempts'], np.int64), np.asarray(state['successes'], np.int64),
               np.asarray(state['dropped'], bool))


def solved_by_start(prompt_ids: Sequence[int], solved: Sequence[bool], num_prompts: int,
                    samples_per_prompt: int) -> np.ndarray:
  """[num_prompts] bool: prompts whose `samples_per_prompt` samples from the starting model were
  all correct. A prompt with a different number of samples is an error (a partial evaluation
  must not drop prompts it did not fully see)."""
  stats = PromptStats.zeros(num_prompts)
  stats.update(prompt_ids, solved)
  seen = stats.attempts > 0
  if np.any(seen & (stats.attempts != samples_per_prompt)):
    bad = np.flatnonzero(seen & (stats.attempts != samples_per_prompt))[:5]
    raise ValueError(f'prompts {bad.tolist()} have {stats.attempts[bad].tolist()} samples, '
                     f'expected {samples_per_prompt}')
  return seen & (stats.successes == samples_per_prompt)


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """stages: ((first_iteration, max_difficulty), ...) in increasing order of first_iteration;
  from `first_iteration` on, prompts with difficulty <= max_difficulty are eligible. Empty: no
  curriculum (every prompt eligible)."""
  stages: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    starts = [s for s, _ in self.stages]
    if starts and (starts[0] != 0 or starts != sorted(set(starts))):
      raise ValueError(f'curriculum stages must start at iteration 0 and increase: {self.stages}')

  def max_difficulty(self, iteration: int) -> int | None:
    if not self.stages:
      return None
    return [d for s, d in self.stages if s <= iteration][-1]

  def eligible(self, difficulty: np.ndarray, iteration: int) -> np.ndarray:
    top = self.max_difficulty(iteration)
    return np.ones(len(difficulty), bool) if top is None else np.asarray(difficulty) <= top


def priorities(stats: PromptStats, eligible: np.ndarray, *, floor: float = 0.0) -> np.ndarray:
  """Unnormalised sampling weights: `max(1 - success_rate, floor)` on eligible, not-dropped
  prompts, 0 elsewhere. `floor` > 0 keeps solved prompts in rotation (k1.5: 0)."""
  w = np.maximum(1.0 - stats.success_rate(), floor)
  return np.where(eligible & ~stats.dropped, w, 0.0)


def sample_prompts(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
  """n distinct prompt indices, drawn one after another with probability proportional to
  `weights` among those not yet drawn (Efraimidis-Spirakis keys `u^(1/w)`: the first draw is
  exactly `w / sum(w)`). Fewer than n prompts with positive weight is an error, not a short batch.
  """
  weights = np.asarray(weights, np.float64)
  live = np.flatnonzero(weights > 0)
  if len(live) < n:
    raise ValueError(f'{len(live)} prompts have positive sampling weight; {n} are needed '
                     '(all solved, dropped or outside the curriculum)')
  u = rng.random(len(live))
  keys = np.log(u) / weights[live]              # log of u^(1/w): larger is drawn first
  return live[np.argsort(-keys, kind='stable')[:n]]
