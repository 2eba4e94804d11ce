"""Partial rollouts (Kimi k1.5 section 2.6.2): long chains of thought must not idle an iteration.

Each iteration has a budget of new tokens per response (`segment_tokens`). A response that has not
stopped when its segment ends is kept here and continued by a later iteration, whose policy
appends the next segment after it (prompt + tokens so far become the continuation's prompt). A
prompt's group of k responses is trained on only once all k have finished, so the group baseline
(`rl/mirror_descent.py`) always compares complete answers.

Tokens written by an older policy than the one that finishes the group are **excluded from the
loss** (mask 0): the mirror-descent residual compares log pi_theta with the log-probs of the policy
that sampled them, and only the current iteration's pi_i has log-probs computed for this
iteration. Their log-probs are kept for diagnostics (the age of each token is recorded).
`max_segments` bounds how many iterations a response may span; a response still unfinished after
it ends with finish reason 'length' (and is scored as such), so nothing waits forever.

The buffer is plain data (lists of ints and floats) and round-trips through `state()` /
`from_state()`, which the RL checkpoint stores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Response:
  """One sampled response as it grows: its tokens, the log-prob of each under the policy that
  sampled it, and the iteration that sampled it."""
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  iterations: list[int] = dataclasses.field(default_factory=list)
  segments: int = 0
  finish_reason: str | None = None    # None while unfinished; 'stop' | 'length' | 'invalid'

  @property
  def done(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass
class Group:
  prompt_id: int
  responses: list[Response]

  @property
  def done(self) -> bool:
    return all(r.done for r in self.responses)


class RolloutBuffer:
  """Groups of k responses by prompt, some unfinished; see the module docstring."""

  def __init__(self, k: int, segment_tokens: int, max_segments: int):
    if k < 1 or segment_tokens < 1 or max_segments < 1:
      raise ValueError(f'k={k}, segment_tokens={segment_tokens}, max_segments={max_segments} '
                       'must all be >= 1')
    self.k, self.segment_tokens, self.max_segments = k, segment_tokens, max_segments
    self.groups: dict[int, Group] = {}
    self._next_id = 0

  def add(self, prompt_id: int) -> int:
    """A new group for `prompt_id` (k empty responses); returns its id."""
    gid = self._next_id
    self._next_id += 1
    self.groups[gid] = Group(int(prompt_id), [Response() for _ in range(self.k)])
    return gid

  def pending(self) -> list[tuple[int, int]]:
    """(group id, response index) of every unfinished response, oldest group first."""
    return [(g, j) for g in sorted(self.groups) for j, r in enumerate(self.groups[g].responses)
            if not r.done]

  def extend(self, gid: int, j: int, tokens, logprobs, iteration: int, stopped: bool,
             invalid: bool = False) -> None:
    """Appends one segment sampled at `iteration`; `stopped`: the sampler hit a stop token;
    `invalid`: the response was cut at a token a response may not hold (it ends here, scored
    0)."""
    r = self.groups[gid].responses[j]
    if r.done:
      raise ValueError(f'response {gid}/{j} is finished; it cannot be extended')
    tokens, logprobs = list(map(int, tokens)), list(map(float, logprobs))
    if len(tokens) != len(logprobs) or len(tokens) > self.segment_tokens:
      raise ValueError(f'a segment has {len(tokens)} tokens and {len(logprobs)} log-probs; at '
                       f'most segment_tokens={self.segment_tokens}, one log-prob per token')
    r.tokens += tokens
    r.logprobs += logprobs
    r.iterations += [int(iteration)] * len(tokens)
    r.segments += 1
    if invalid:
      r.finish_reason = 'invalid'
    elif stopped:
      r.finish_reason = 'stop'
    elif r.segments >= self.max_segments:
      r.finish_reason = 'length'

  def pop_done(self) -> list[Group]:
    """Removes and returns the groups whose k responses have all finished, oldest first."""
    done = [g for g in sorted(self.groups) if self.groups[g].done]
    return [self.groups.pop(g) for g in done]

  def state(self) -> dict[str, Any]:
    return {'k': self.k, 'segment_tokens': self.segment_tokens,
            'max_segments': self.max_segments, 'next_id': self._next_id,
            'groups': {str(g): {'prompt_id': v.prompt_id,
                                'responses': [dataclasses.asdict(r) for r in v.responses]}
                       for g, v in self.groups.items()}}

  @classmethod
  def from_state(cls, state: dict[str, Any]) -> 'RolloutBuffer':
    buf = cls(int(state['k']), int(state['segment_tokens']), int(state['max_segments']))
    buf._next_id = int(state['next_id'])
    buf.groups = {int(g): Group(int(v['prompt_id']), [Response(**r) for r in v['responses']])
                  for g, v in state['groups'].items()}
    return buf


def loss_mask(response: Response, iteration: int) -> np.ndarray:
  """[len(tokens)] float32: 1 on tokens sampled at `iteration` (the policy pi_i whose log-probs
  the loss compares with), 0 on tokens an older policy wrote."""
  return (np.asarray(response.iterations, np.int64) == iteration).astype(np.float32)
