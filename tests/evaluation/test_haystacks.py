import random

import numpy as np
import pytest

from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.evaluation import haystacks, image_haystack, prompts, text_haystack

TOK = make_tokenizer()
MEASURE = prompts.make_measure(TOK, prompts.eval_image_config({'max_patches': 16}))


def test_largest_fitting():
  assert haystacks.largest_fitting(lambda n: 10 + 3 * n, 100, guess=1) == 30
  assert haystacks.largest_fitting(lambda n: 10 + 3 * n, 100, guess=1000) == 30
  assert haystacks.largest_fitting(lambda n: 10 + 3 * n, 10, guess=5) == 0
  with pytest.raises(haystacks.TooShort):
    haystacks.largest_fitting(lambda n: 10 + 3 * n, 9, guess=5)


@pytest.mark.parametrize('depth', [0.0, 0.5, 1.0])
def test_text_case(depth):
  hs = text_haystack.TextHaystack()
  case = hs.make(1000, depth, random.Random(0), MEASURE)
  text = case.messages[0]['content']
  assert 985 < case.length <= 1000                      # filled to within one sentence
  assert MEASURE(case.messages, {}) == case.length
  assert text.startswith(text_haystack.INTRO) and text.count('special magic numbers for') == 1
  body = text.split('\n')[1]
  sentences = [s + '.' for s in body.split('. ')]
  at = [i for i, s in enumerate(sentences) if 'magic' in s]
  assert len(sentences) > 80
  assert len(at) == 1 and abs(at[0] / (len(sentences) - 1) - depth) < 1 / len(sentences)
  assert len(case.answer) == 7 and case.answer in body and case.answer.isdigit()
  assert hs.is_hit(case, f'It is {case.answer}.') and not hs.is_hit(case, 'It is 1234567.')
  with pytest.raises(haystacks.TooShort):
    hs.make(40, depth, random.Random(0), MEASURE)


def test_text_case_is_seeded():
  hs = text_haystack.TextHaystack()
  a = hs.make(400, 0.3, random.Random('x'), MEASURE)
  b = hs.make(400, 0.3, random.Random('x'), MEASURE)
  c = hs.make(400, 0.3, random.Random('y'), MEASURE)
  assert a.messages == b.messages and a.messages != c.messages


def _colors(img):
  px = {tuple(p) for p in np.asarray(img).reshape(-1, 3)} - {(255, 255, 255)}
  return {name for name, rgb in image_haystack.COLORS.items() if rgb in px}


@pytest.mark.parametrize('depth', [0.0, 0.25, 1.0])
def test_image_case(depth):
  hs = image_haystack.ImageHaystack(image_size=56)
  case = hs.make(200, depth, random.Random(1), MEASURE)
  parts = case.messages[0]['content']
  names = [p['image'] for p in parts if p['type'] == 'image']
  assert parts[-1]['type'] == 'text' and 'What color is the' in parts[-1]['text']
  assert 190 < case.length <= 200 and MEASURE(case.messages, case.images) == case.length
  assert len(names) == len(case.images) > 10
  needle = names[round(depth * (len(names) - 1))]
  assert _colors(case.images[needle]) == {case.answer}
  # the needle is the only non-circle: a circle leaves the corners of its box white
  shape = parts[-1]['text'].split('which is a ')[1].split('.')[0]
  arr = np.asarray(case.images[needle])
  rows = np.where((arr != 255).any(-1).any(1))[0]
  bottom = arr[rows[-1]]
  assert (bottom != 255).any(-1).sum() > 20, shape       # rectangles and triangles: a flat base
  for name in names:
    if name != needle:
      a = np.asarray(case.images[name])
      r = np.where((a != 255).any(-1).any(1))[0]
      assert (a[r[-1]] != 255).any(-1).sum() < 20         # circles: a narrow bottom row
  assert hs.is_hit(case, f'The {shape} is {case.answer}.')
  other = next(c for c in image_haystack.COLORS if c != case.answer)
  assert not hs.is_hit(case, f'{other}, or maybe {case.answer}')
