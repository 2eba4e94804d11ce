"""Needle-in-a-haystack cases and the registry of haystack kinds (Kimi-VL report Table 2).

A haystack kind builds, for a requested prompt length in tokens and a needle depth in [0, 1], one
`NeedleCase`: a chat (user turn only) hiding one needle, the answer the response must give, and
any in-memory images the chat references. Kinds size themselves with a `measure` callback (the
rendered prompt's token count, images included: evaluation/prompts.py), so the lengths are
exact for the model's own tokenizer and image preprocessing.

The kinds are listed by name in `niah.HAYSTACKS`, which `python -m kimi_vl_jax.eval niah
--haystacks=...` picks from (text, image, video). A new kind is a class with `name`, `make(...)`
and `is_hit(...)` plus one entry there.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Mapping, Protocol

from PIL import Image

Measure = Callable[[list[dict], Mapping[str, Image.Image]], int]


@dataclasses.dataclass
class NeedleCase:
  messages: list[dict]                 # the user turn(s) holding haystack, needle and question
  answer: str                          # what a correct response gives
  images: dict[str, Image.Image]       # in-memory images the messages reference by name
  depth: float                         # requested needle position, 0 = start, 1 = end
  length: int                          # the rendered prompt's length in tokens (<= requested)


class TooShort(ValueError):
  """The requested length cannot hold even the needle and the question."""


class Haystack(Protocol):
  name: str

  def make(self, length: int, depth: float, rng: random.Random, measure: Measure) -> NeedleCase:
    """A case whose prompt is as long as possible but at most `length` tokens."""

  def is_hit(self, case: NeedleCase, response: str) -> bool:
    """Whether `response` retrieves the needle."""


def largest_fitting(build: Callable[[int], int], limit: int, guess: int) -> int:
  """The largest n >= 0 with `build(n) <= limit`, for a `build` (the prompt length with n filler
  units) that grows with n; `guess` is a starting estimate. Raises TooShort if even n = 0 is
  too long."""
  if build(0) > limit:
    raise TooShort(f'the needle and question alone take {build(0)} tokens > {limit}')
  lo, hi = 0, max(1, guess)
  while build(hi) <= limit:          # grow until the upper bracket overflows
    lo, hi = hi, hi * 2
  while hi - lo > 1:                 # invariant: build(lo) <= limit < build(hi)
    mid = (lo + hi) // 2
    if build(mid) <= limit:
      lo = mid
    else:
      hi = mid
  return lo
