"""Progressive resolution for MoonViT pre-training: the per-image patch budget over steps.

The Kimi-VL report (section 2.3) trains MoonViT with "a progressive resolution sampling strategy
[that] gradually allows larger sizes". Here that is a step schedule of the image preprocessor's
`max_patches` (`data/images.py`: an image with more 14x14 patches is scaled down to fit, smaller
ones keep their native size): `[(0, 256), (10000, 1024), (50000, 4096)]` means at most 256
patches per image from step 0, 1024 from step 10000, 4096 (Kimi-VL's limit) from step 50000.
The row's patch budget (`data.max_patches`, a compiled shape) does not change: larger images
just leave room for fewer of them per row. The caption pipeline (`data/caption_pairs.py`)
applies the schedule to the step each batch is for.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence


class ResolutionSchedule:
  """Piecewise-constant `step -> max_patches_per_image` (module docstring)."""

  def __init__(self, stages: Sequence[tuple[int, int]]):
    stages = [(int(s), int(p)) for s, p in stages]
    if not stages or stages[0][0] != 0:
      raise ValueError(f'a resolution schedule starts at step 0; got {stages}')
    steps = [s for s, _ in stages]
    if any(b <= a for a, b in zip(steps, steps[1:])):
      raise ValueError(f'resolution schedule steps must increase strictly; got {steps}')
    if any(p < 4 for _, p in stages):
      raise ValueError(f'max patches per image must be >= 4 (one 2x2 merge window); got {stages}')
    self.stages = tuple(stages)
    self._steps = steps

  @classmethod
  def from_config(cls, value: Any) -> 'ResolutionSchedule':
    """From an int (constant), a list of (step, max_patches) pairs or a string
    'STEP:PATCHES,STEP:PATCHES' such as '0:256,10000:1024'."""
    if isinstance(value, ResolutionSchedule):
      return value
    if isinstance(value, int):
      return cls([(0, value)])
    if isinstance(value, str):
      try:
        pairs = [tuple(int(x) for x in part.split(':')) for part in value.split(',') if part]
      except ValueError as e:
        raise ValueError(f'resolution schedule {value!r}: expected "STEP:PATCHES,..."') from e
      if any(len(p) != 2 for p in pairs):
        raise ValueError(f'resolution schedule {value!r}: expected "STEP:PATCHES,..."')
      return cls(pairs)
    return cls([tuple(p) for p in value])

  def __call__(self, step: int) -> int:
    if step < 0:
      raise ValueError(f'step must be >= 0; got {step}')
    return self.stages[bisect.bisect_right(self._steps, int(step)) - 1][1]

  def __repr__(self) -> str:
    return f'ResolutionSchedule({list(self.stages)})'
