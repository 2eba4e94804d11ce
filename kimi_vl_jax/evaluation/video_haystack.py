"""The video haystack: one needle frame among the distractor frames of a video.

The video (a `{"type": "video", "frames": [...], "fps": F}` message part, docs/video.md) shows a
circle bouncing across the frame, one frame per 1 / F seconds; one frame, inserted at the
requested depth, shows a rectangle or a triangle instead, in another colour. The question names
the needle's shape and asks for its colour, which only that frame shows. The prompt renders
every frame after its `hh:mm:ss.fff` timestamp, as training does (Kimi-VL report Table 2 has a
video haystack beside the text one). A response is a hit when the first colour word it names is
the needle's colour (as in the image haystack).
"""

from __future__ import annotations

import random

from kimi_vl_jax.data import build_demo
from kimi_vl_jax.evaluation import haystacks
from kimi_vl_jax.evaluation import image_haystack

NEEDLE_SHAPES = ('rectangle', 'triangle')
QUESTION = ('In this video a circle moves around, except in one frame, which shows a {shape} '
            'instead. What color is the {shape}?')


class VideoHaystack:
  name = 'video'

  def __init__(self, frame_size: int = 56, fps: float = 1.0):
    if frame_size < 28:
      raise ValueError(f'frame_size {frame_size} < 28 (one 2x2 window of 14-pixel patches)')
    if not fps > 0:
      raise ValueError(f'fps must be > 0, got {fps}')
    self.frame_size, self.fps = frame_size, float(fps)

  def _center(self, k: int, phase: float, period: int) -> tuple[float, float]:
    """Where the bouncing circle is in frame k (a triangle wave in x and y)."""
    r = self.frame_size / 7
    span = self.frame_size - 2 * r

    def tri(t):
      t = t % 1.0
      return 2 * t if t < 0.5 else 2 - 2 * t
    return (r + span * tri(k / period + phase), r + span * tri(k / (1.7 * period) + phase / 2))

  def make(self, length: int, depth: float, rng: random.Random,
           measure: haystacks.Measure) -> haystacks.NeedleCase:
    shape, color = rng.choice(NEEDLE_SHAPES), rng.choice(sorted(build_demo.RGB))
    circle = rng.choice(sorted(c for c in build_demo.RGB if c != color))
    phase, period = rng.random(), rng.randint(8, 24)
    radius = self.frame_size / 7
    pool = []                                    # distractor frames, drawn once, reused by prefix
    needle = build_demo.draw_shape(shape, color, (self.frame_size / 2, self.frame_size / 2),
                                   size=self.frame_size, radius=radius)

    def case(n_distractors):
      while len(pool) < n_distractors:
        pool.append(build_demo.draw_shape('circle', circle, self._center(len(pool), phase, period),
                                          size=self.frame_size, radius=radius))
      frames = list(pool[:n_distractors])
      frames.insert(round(depth * n_distractors), needle)
      names = [f'frame_{i}' for i in range(len(frames))]
      content = [{'type': 'video', 'frames': names, 'fps': self.fps},
                 {'type': 'text', 'text': QUESTION.format(shape=shape)}]
      return [{'role': 'user', 'content': content}], dict(zip(names, frames))

    # Each frame costs its image tokens plus ~10 timestamp / marker tokens.
    n = haystacks.largest_fitting(lambda k: measure(*case(k)), length, guess=max(1, length // 16))
    msgs, frames = case(n)
    return haystacks.NeedleCase(msgs, color, frames, depth, measure(msgs, frames))

  def is_hit(self, case: haystacks.NeedleCase, response: str) -> bool:
    return image_haystack.ImageHaystack().is_hit(case, response)

