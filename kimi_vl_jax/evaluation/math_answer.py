"""MathVista-style answer extraction and scoring (MathVista's rules, as lmms-eval runs them, with
the LLM answer extractor replaced by offline rules).

Extraction, first that applies:
  1. a multiple-choice response that is exactly one of the choices;
  2. an integer / float question whose response parses as one;
  3. `The answer is "..."` (MathVista's quick extraction);
  4. offline, instead of the LLM judge: the last `\\boxed{}` (evaluation/boxed.py), else for
     numeric questions the last number in the response, else for multiple choice the response.
Normalisation: multiple choice maps "(B)" / "B" to the choice text, anything else to the most
similar choice (Levenshtein distance, MathVista's `get_most_similar`); integers as
`str(int(float(x)))`, floats rounded to the question's `precision`; then an exact string match.
Numbers go through `boxed.normalise` first, so `1,000`, `\\frac{1}{2}` and `5 cm` are read as
numbers (MathVista's own rules would drop them to the judge).
"""

from __future__ import annotations

import re
from typing import Sequence

from kimi_vl_jax.evaluation import boxed

QUESTION_TYPES = ('multi_choice', 'free_form')
ANSWER_TYPES = ('text', 'integer', 'float', 'list')
_NUMBER = re.compile(r'-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+')


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions of one character each)."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, start=1):
    cur = [i]
    for j, cb in enumerate(b, start=1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def _check(question_type: str, answer_type: str, choices) -> None:
  if question_type not in QUESTION_TYPES:
    raise ValueError(f'question_type {question_type!r}; known: {QUESTION_TYPES}')
  if answer_type not in ANSWER_TYPES:
    raise ValueError(f'answer_type {answer_type!r}; known: {ANSWER_TYPES}')
  if question_type == 'multi_choice' and not choices:
    raise ValueError('a multi_choice question needs its choices')


def extract(response: str, *, question_type: str, answer_type: str,
            choices: Sequence[str] = ()) -> str:
  """The answer part of a free-text response (rules 1-4 of the module docstring)."""
  _check(question_type, answer_type, choices)
  response = response.strip()
  if not response:
    return ''
  if question_type == 'multi_choice' and response in choices:
    return response
  if answer_type == 'integer':
    try:
      return str(int(response))
    except ValueError:
      pass
  if answer_type == 'float':
    try:
      return str(float(response))
    except ValueError:
      pass
  quoted = re.search(r'The answer is "(.*)"', response)
  if quoted:
    return quoted.group(1)
  box = boxed.last_boxed(response)
  if box is not None:
    return box
  if answer_type in ('integer', 'float'):
    numbers = _NUMBER.findall(response)
    if numbers:
      return numbers[-1]
  return response


def normalise(extraction: str, *, question_type: str, answer_type: str,
              choices: Sequence[str] = (), precision: int = 2) -> str | None:
  """MathVista's `normalize_extracted_answer`; None when a number was expected and not found."""
  _check(question_type, answer_type, choices)
  extraction = extraction.strip()
  if question_type == 'multi_choice':
    letter = re.findall(r'\(([a-zA-Z])\)', extraction)
    if letter:
      extraction = letter[0].upper()
    letters = [chr(ord('A') + i) for i in range(len(choices))]
    if extraction in letters:
      return choices[letters.index(extraction)]
    return min(choices, key=lambda c: levenshtein(extraction, c))
  if answer_type in ('integer', 'float'):
    value = boxed.to_number(boxed.normalise(extraction))
    if value is None:
      return None
    return str(int(value)) if answer_type == 'integer' else str(round(value, precision))
  return extraction


def score(response: str, answer: str, *, question_type: str, answer_type: str,
          choices: Sequence[str] = (), precision: int = 2) -> float:
  """1.0 when the normalised extraction equals the (equally normalised) reference."""
  kw = dict(question_type=question_type, answer_type=answer_type, choices=choices,
            precision=precision)
  pred = normalise(extract(response, question_type=question_type, answer_type=answer_type,
                           choices=choices), **kw)
  gold = normalise(answer, **kw)
  if gold is None:
    raise ValueError(f'MathVista reference {answer!r} is not a {answer_type}')
  return float(pred == gold)
