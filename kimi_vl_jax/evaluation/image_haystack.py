"""The image haystack: one distinct image among many look-alikes.

Every image shows one coloured shape on a white background (drawn here, easy-vqa's style: no
files needed). The distractors are circles; the needle, at the requested depth, is a rectangle or
a triangle. The question names the needle's shape and asks for its colour, which only that image
shows (the distractors' colours are random too). A response is a hit when the first colour word
it names is the needle's colour.
"""

from __future__ import annotations

import random
import re

from PIL import Image, ImageDraw

from kimi_vl_jax.evaluation import haystacks

COLORS = {'red': (220, 30, 30), 'green': (30, 160, 60), 'blue': (40, 70, 220),
          'yellow': (240, 210, 20), 'black': (0, 0, 0), 'gray': (128, 128, 128),
          'teal': (0, 128, 128), 'brown': (130, 80, 30)}
NEEDLE_SHAPES = ('rectangle', 'triangle')
QUESTION = ('Each image shows one shape. All of them are circles except one, which is a {shape}. '
            'What color is the {shape}?')
_COLOR_WORD = re.compile(r'\b(' + '|'.join(COLORS) + r'|grey)\b', re.IGNORECASE)


def draw_shape(shape: str, color: str, size: int, rng: random.Random) -> Image.Image:
  """A `size` x `size` RGB image of one filled shape at a random place and scale."""
  img = Image.new('RGB', (size, size), (255, 255, 255))
  d = ImageDraw.Draw(img)
  s = rng.randint(size // 3, size * 3 // 4)
  x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
  box, fill = (x0, y0, x0 + s - 1, y0 + s - 1), COLORS[color]
  if shape == 'circle':
    d.ellipse(box, fill=fill)
  elif shape == 'rectangle':
    d.rectangle((x0, y0 + s // 5, x0 + s - 1, y0 + s - 1 - s // 5), fill=fill)
  elif shape == 'triangle':
    d.polygon([(x0 + s // 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
  else:
    raise ValueError(f'unknown shape {shape!r}')
  return img


class ImageHaystack:
  name = 'image'

  def __init__(self, image_size: int = 56):
    if image_size < 28:
      raise ValueError(f'image_size {image_size} < 28 (one 2x2 window of 14-pixel patches)')
    self.image_size = image_size

  def make(self, length: int, depth: float, rng: random.Random,
           measure: haystacks.Measure) -> haystacks.NeedleCase:
    shape, color = rng.choice(NEEDLE_SHAPES), rng.choice(sorted(COLORS))
    pool: list[Image.Image] = []                 # distractors, drawn once and reused by prefix

    def case(n_distractors):
      while len(pool) < n_distractors:
        pool.append(draw_shape('circle', rng.choice(sorted(COLORS)), self.image_size, rng))
      at = round(depth * n_distractors)
      names = [f'haystack_{i}' for i in range(n_distractors + 1)]
      imgs = list(pool[:n_distractors])
      imgs.insert(at, needle)
      content = [{'type': 'image', 'image': name} for name in names]
      content.append({'type': 'text', 'text': QUESTION.format(shape=shape)})
      return [{'role': 'user', 'content': content}], dict(zip(names, imgs))

    needle = draw_shape(shape, color, self.image_size, rng)
    n = haystacks.largest_fitting(lambda k: measure(*case(k)), length, guess=max(1, length // 8))
    msgs, imgs = case(n)
    return haystacks.NeedleCase(msgs, color, imgs, depth, measure(msgs, imgs))

  def is_hit(self, case: haystacks.NeedleCase, response: str) -> bool:
    m = _COLOR_WORD.search(response)
    return bool(m) and m.group(1).lower().replace('grey', 'gray') == case.answer

