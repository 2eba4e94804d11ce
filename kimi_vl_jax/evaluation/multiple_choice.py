"""MMMU-style multiple-choice answer parsing (the MMMU benchmark's rules, as lmms-eval runs them).

The response is stripped of edge punctuation and padded with spaces, then searched for each option
letter as "(A)", else "A " , else "A."; only when none matched and the response is longer than five
words, for the option texts themselves (case-insensitive). Several candidates: the one that occurs
last; none: a random letter from a generator seeded per question, so a rerun gives the same score.
"""

from __future__ import annotations

import random
from typing import Sequence

EDGE_PUNCTUATION = (',', '.', '!', '?', ';', ':', "'")


def option_letters(n: int) -> list[str]:
  """'A', 'B', ... for `n` options."""
  if not 0 < n <= 26:
    raise ValueError(f'multiple choice needs 1..26 options, got {n}')
  return [chr(ord('A') + i) for i in range(n)]


def parse_choice(response: str, options: Sequence[str], *, seed: int = 42) -> str:
  """The option letter a free-text `response` picks among `options` (their texts, in order)."""
  letters = option_letters(len(options))
  index2ans = dict(zip(letters, options))
  for ch in EDGE_PUNCTUATION:
    response = response.strip(ch)
  response = f' {response} '  # so "A " matches a final A and "(A)" a leading one

  candidates = [c for c in letters if f'({c})' in response]
  bracketed = bool(candidates)
  if not candidates:
    candidates = [c for c in letters if f'{c} ' in response]
  if not candidates:
    candidates = [c for c in letters if f'{c}.' in response]
  by_text = False
  if not candidates and len(response.split()) > 5:
    candidates = [c for c in letters if index2ans[c].lower() in response.lower()]
    by_text = bool(candidates)

  if not candidates:
    return random.Random(seed).choice(letters)
  if len(candidates) == 1:
    return candidates[0]
  if by_text:
    starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
  elif bracketed:
    starts = [response.rfind(f'({c})') for c in candidates]
  else:
    starts = [response.rfind(f' {c} ') for c in candidates]
  # The last occurrence wins; ties (e.g. every rfind is -1) keep the earliest letter.
  best = max(range(len(candidates)), key=lambda i: (starts[i], -i))
  return candidates[best]


def score(response: str, answer: str, options: Sequence[str], *, seed: int = 42) -> float:
  """1.0 when the parsed letter is `answer` (a letter, or the text of the right option)."""
  letters = option_letters(len(options))
  gold = answer.strip()
  if gold not in letters:
    stripped = gold.strip('()').strip()
    if stripped in letters:
      gold = stripped
    elif gold in options:
      gold = letters[list(options).index(gold)]
    else:
      raise ValueError(f'multiple-choice reference {answer!r} is neither a letter of {letters} '
                       f'nor one of the options')
  return float(parse_choice(response, options, seed=seed) == gold)
