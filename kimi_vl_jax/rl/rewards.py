r"""Answer-only rewards for RL (Kimi-VL report section 2.4: "online RL on answer only"; Kimi k1.5
section 2.3): the reasoning is never graded, only the final answer, with a verifier per task kind.

The final answer is what follows the thinking block (`◁think▷ ... ◁/think▷`, the released
Kimi-VL-Thinking chat template); a response whose thinking block never closes has no answer
(reward 0). Verifiers, each 0 or 1:

* `exact`: normalised exact match (case, surrounding space and punctuation, inner whitespace);
* `numeric`: the last number of the answer (or its last `\boxed{}`) equals the reference within
  `rel_tol` / `abs_tol` (thousands separators and LaTeX fractions understood);
* `boxed`: the last `\boxed{}` is equivalent to the reference (`evaluation/boxed.py`); no box,
  no reward;
* `choice`: the option letter parsed by MMMU's rules (`evaluation/multiple_choice.py`) equals the
  reference; unlike the evaluation, no random letter when nothing parses (a guess must not earn
  reward).

A repeated n-gram loop at the end of a response (the failure mode of long chains of thought,
k1.5 section 2.6.2) is detected on token ids and penalised (`loop_penalty`), whatever the answer.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Sequence

import numpy as np

from kimi_vl_jax.evaluation import boxed, multiple_choice

THINK_OPEN, THINK_CLOSE = '◁think▷', '◁/think▷'
KINDS = ('exact', 'numeric', 'boxed', 'choice')

_FRAC = re.compile(r'\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}')
_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+')


def final_answer(response: str) -> str | None:
  """The text after the thinking block; None when a thinking block is opened and never closed.
  A response without a thinking block is all answer."""
  if THINK_CLOSE in response:
    return response.rsplit(THINK_CLOSE, 1)[1].strip()
  if THINK_OPEN in response:
    return None
  return response.strip()


def _normalise_text(s: str) -> str:
  s = ' '.join(s.lower().split())
  return s.strip(string.punctuation + ' ')


def last_number(answer: str) -> float | None:
  """The value of the answer's last box if it has one, else of its last number."""
  box = boxed.last_boxed(answer)
  if box is not None:
    return boxed.to_number(boxed.normalise(box))
  found = _NUMBER.findall(_FRAC.sub(r'\1/\2', answer))   # LaTeX fractions -> a/b first
  if not found:
    return None
  return boxed.to_number(boxed.normalise(found[-1]))


def _strict_choice(answer: str, options: Sequence[str]) -> str | None:
  # parse_choice falls back to a seeded random letter; two different seeds agreeing on a letter
  # when no rule matched is impossible to tell apart, so check the rules' inputs directly.
  letters = multiple_choice.option_letters(len(options))
  padded = f' {answer.strip("".join(multiple_choice.EDGE_PUNCTUATION))} '
  hit = any(f'({c})' in padded or f'{c} ' in padded or f'{c}.' in padded for c in letters)
  if not hit and len(padded.split()) > 5:
    hit = any(o.lower() in padded.lower() for o in options)
  return multiple_choice.parse_choice(answer, options) if hit else None


def verify(response: str, reference: str, kind: str, *, options: Sequence[str] = (),
           rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
  """1.0 when the response's final answer matches `reference` under verifier `kind`, else 0.0."""
  answer = final_answer(response)
  if answer is None or not answer:
    return 0.0
  if kind == 'exact':
    return float(_normalise_text(answer) == _normalise_text(reference))
  if kind == 'numeric':
    got, want = last_number(answer), boxed.to_number(boxed.normalise(reference))
    if want is None:
      raise ValueError(f'numeric reference {reference!r} is not a number')
    return float(got is not None and math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol))
  if kind == 'boxed':
    box = boxed.last_boxed(answer)
    return float(box is not None and boxed.equivalent(box, reference, rel_tol=rel_tol))
  if kind == 'choice':
    if not options:
      raise ValueError('the choice verifier needs the options')
    letter = _strict_choice(answer, options)
    return float(letter is not None and
                 multiple_choice.score(letter, reference, options) == 1.0)
  raise ValueError(f'unknown verifier {kind!r}; one of {KINDS}')


@dataclasses.dataclass(frozen=True)
class LoopPenaltyConfig:
  """A response whose last `min_repeats` n-grams (n in [min_n, max_n]) are the same n-gram is a
  loop; it gets `penalty` (subtracted) on top of its answer reward. penalty 0 = off."""
  penalty: float = 0.0
  min_n: int = 1
  max_n: int = 20
  min_repeats: int = 8

  def __post_init__(self):
    if self.penalty < 0 or not 1 <= self.min_n <= self.max_n or self.min_repeats < 2:
      raise ValueError(f'bad loop penalty config {self}')


def ends_in_loop(tokens: Sequence[int], cfg: LoopPenaltyConfig) -> bool:
  """Whether the tokens end with an n-gram repeated `min_repeats` times back to back."""
  t = np.asarray(tokens)
  for n in range(cfg.min_n, cfg.max_n + 1):
    span = n * cfg.min_repeats
    if span > len(t):
      break
    tail = t[-span:].reshape(cfg.min_repeats, n)
    if np.all(tail == tail[-1]):
      return True
  return False
