"""OCRBench-style scoring: a hit when a normalised reference is a substring of the normalised
prediction (OCRBench's rule, as lmms-eval runs it).

Normalisation: lower case, surrounding whitespace stripped, newlines as spaces. Handwritten
mathematical expressions (OCRBench's HME100k) compare with every space removed, since the same
formula is spaced in many ways.
"""

from __future__ import annotations

from typing import Sequence


def normalise(text: str, *, drop_spaces: bool = False) -> str:
  text = text.lower().strip().replace('\n', ' ')
  return text.replace(' ', '') if drop_spaces else text


def score(prediction: str, answers: str | Sequence[str], *, drop_spaces: bool = False) -> float:
  """1.0 if any reference (one string or a list of accepted strings) occurs in the prediction."""
  refs = [answers] if isinstance(answers, str) else list(answers)
  if not refs:
    raise ValueError('OCR scoring needs at least one reference answer')
  pred = normalise(prediction, drop_spaces=drop_spaces)
  return float(any(normalise(a, drop_spaces=drop_spaces) in pred for a in refs))
