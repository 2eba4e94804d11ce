"""Needle-in-a-haystack sweep: cases over length buckets x needle depths, generation, recall.

Kimi-VL report Table 2 reports recall per haystack length bucket (0,2K], (2K,4K], ... with the
needles spread uniformly in depth. Here each bucket holds `per_bucket` requested prompt lengths,
evenly spaced up to the bucket's upper edge, and each length `n_depths` needle depths from 0
(start) to 1 (end); the last bucket ends at the model's context minus the generation budget.
Every case has its own seeded generator, so a sweep is reproducible and a case does not change
when others are added.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Callable, Sequence

from kimi_vl_jax.evaluation import haystacks, image_haystack, text_haystack, video_haystack

# The haystack kinds by name (`--haystacks`): a class taking keyword options, see haystacks.py.
HAYSTACKS: dict[str, Callable[..., haystacks.Haystack]] = {
    'text': text_haystack.TextHaystack,
    'image': image_haystack.ImageHaystack,
    'video': video_haystack.VideoHaystack,
}


@dataclasses.dataclass
class Result:
  haystack: str
  bucket: tuple[int, int]
  requested: int                 # the requested prompt length in tokens
  length: int                    # the built prompt's length (<= requested)
  depth: float
  answer: str
  response: str
  hit: bool


def make_haystack(name: str, **options) -> haystacks.Haystack:
  if name not in HAYSTACKS:
    raise ValueError(f'unknown haystack {name!r}; known: {sorted(HAYSTACKS)}')
  return HAYSTACKS[name](**options)


def length_buckets(max_len: int, first: int = 2048) -> list[tuple[int, int]]:
  """(0, first], (first, 2 first], ... doubling, the last one ending at `max_len`."""
  if first < 1 or max_len < 1:
    raise ValueError(f'length buckets need first >= 1 and max_len >= 1, got {first}, {max_len}')
  out, lo, hi = [], 0, first
  while lo < max_len:
    out.append((lo, min(hi, max_len)))
    lo, hi = hi, hi * 2
  return out


def bucket_label(bucket: tuple[int, int]) -> str:
  """'(2K,4K]' (K = 1024 when it divides evenly, else the plain number)."""
  def fmt(n):
    return f'{n // 1024}K' if n and n % 1024 == 0 else str(n)
  return f'({fmt(bucket[0])},{fmt(bucket[1])}]'


def depths(n: int) -> list[float]:
  """n needle depths spread uniformly over [0, 1] (one: the middle)."""
  if n < 1:
    raise ValueError(f'need at least one depth, got {n}')
  return [0.5] if n == 1 else [i / (n - 1) for i in range(n)]


def requested_lengths(bucket: tuple[int, int], per_bucket: int,
                      max_length: int | None = None) -> list[int]:
  """`per_bucket` lengths evenly spaced in (lo, hi], the last one hi; with `max_length` (the
  context minus the generation budget) the bucket ends there instead."""
  lo, hi = bucket
  if max_length is not None:
    hi = min(hi, max_length)
  if hi <= lo:
    return []
  return sorted({lo + max(1, round((hi - lo) * (j + 1) / per_bucket)) for j in range(per_bucket)})


def build_cases(haystack: haystacks.Haystack, buckets: Sequence[tuple[int, int]],
                per_bucket: int, n_depths: int, measure: haystacks.Measure, seed: int = 0,
                max_length: int | None = None):
  """[(bucket, requested length, NeedleCase)] over the grid; lengths too short for the needle
  and question are skipped and logged."""
  out, skipped = [], 0
  for bucket in buckets:
    for length in requested_lengths(bucket, per_bucket, max_length):
      for depth in depths(n_depths):
        rng = random.Random(f'{seed}/{haystack.name}/{length}/{depth:.6f}')
        try:
          out.append((bucket, length, haystack.make(length, depth, rng, measure)))
        except haystacks.TooShort as e:
          skipped += 1
          logging.warning('niah %s: length %d skipped: %s', haystack.name, length, e)
  if skipped:
    logging.warning('niah %s: %d of %d cases skipped (too short)', haystack.name, skipped,
                    skipped + len(out))
  return out


def run(haystack: haystacks.Haystack, generate: Callable[[list[haystacks.NeedleCase]], list[str]],
        buckets: Sequence[tuple[int, int]], *, per_bucket: int, n_depths: int,
        measure: haystacks.Measure, seed: int = 0, max_length: int | None = None
        ) -> list[Result]:
  """Builds every case of the grid, generates one response per case (`generate` maps a list of
  cases to their responses, in order) and scores it with the haystack's `is_hit`."""
  cases = build_cases(haystack, buckets, per_bucket, n_depths, measure, seed, max_length)
  responses = generate([c for _, _, c in cases])
  if len(responses) != len(cases):
    raise ValueError(f'generate returned {len(responses)} responses for {len(cases)} cases')
  return [Result(haystack.name, bucket, length, case.length, case.depth, case.answer, resp,
                 haystack.is_hit(case, resp))
          for (bucket, length, case), resp in zip(cases, responses)]
