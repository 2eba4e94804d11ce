"""Offline answer scorers by name, and how a benchmark record feeds them.

A benchmark record is a chat in the messages format (data/chat.py) whose last turn is the
assistant's reference answer, plus the fields its scorer needs:

  scorer / task   which scorer (a `--scorer` flag overrides); one of SCORERS
  options         mmmu: the option texts, in letter order (the reference is a letter or a text)
  answers         ocrbench: optional list of accepted strings (default: the reference alone)
  category        ocrbench: 'HME100k' compares without spaces (handwritten formulas)
  question_type, answer_type, choices, precision   mathvista (evaluation/math_answer.py)
  id              mmmu: seeds the random pick for unparseable responses (default: the line number)

Every scorer returns 1.0 or 0.0 for one response.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

from kimi_vl_jax.evaluation import boxed, math_answer, multiple_choice, ocr_match

Scorer = Callable[[str, str, dict], float]


def exact(prediction: str, reference: str, record: dict) -> float:
  """Whitespace-stripped, case-insensitive equality (the trainer's answer accuracy)."""
  del record
  return float(prediction.strip().lower() == reference.strip().lower())


def mmmu(prediction: str, reference: str, record: dict) -> float:
  options = _field(record, 'options', list)
  seed = zlib.crc32(str(record.get('id', record.get('_line', 0))).encode()) ^ 42
  return multiple_choice.score(prediction, reference, [str(o) for o in options], seed=seed)


def ocrbench(prediction: str, reference: str, record: dict) -> float:
  answers = record.get('answers') or [reference]
  return ocr_match.score(prediction, answers, drop_spaces=record.get('category') == 'HME100k')


def mathvista(prediction: str, reference: str, record: dict) -> float:
  question_type = _field(record, 'question_type', str)
  return math_answer.score(
      prediction, reference, question_type=question_type,
      answer_type=_field(record, 'answer_type', str),
      choices=[str(c) for c in record.get('choices') or []],
      precision=int(record.get('precision', 2)))


def boxed_answer(prediction: str, reference: str, record: dict) -> float:
  del record
  return boxed.score(prediction, reference)


SCORERS: dict[str, Scorer] = {
    'exact': exact,
    'mmmu': mmmu,
    'ocrbench': ocrbench,
    'mathvista': mathvista,
    'boxed': boxed_answer,
}


def scorer_name(record: dict, override: str | None = None) -> str:
  """The scorer a record asks for (`scorer`, else `task`), unless `override` is given."""
  name = override or record.get('scorer') or record.get('task')
  if not name:
    raise ValueError('the record names no scorer ("scorer" or "task" field) and no --scorer '
                     f'was given; known: {sorted(SCORERS)}')
  if name not in SCORERS:
    raise ValueError(f'unknown scorer {name!r}; known: {sorted(SCORERS)}')
  return name


def score(record: dict, reference: str, prediction: str, override: str | None = None) -> float:
  return SCORERS[scorer_name(record, override)](prediction, reference, record)


def _field(record: dict, key: str, kind: type) -> Any:
  v = record.get(key)
  if not isinstance(v, kind) or not v:
    raise ValueError(f'the record needs a non-empty {kind.__name__} field {key!r}')
  return v
