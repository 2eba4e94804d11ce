import random

import numpy as np
import pytest

from kimi_vl_jax.data import build_demo
from kimi_vl_jax.data import chat
from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.evaluation import haystacks, niah, prompts, video_haystack

TOK = make_tokenizer()
IMAGE_CFG = prompts.eval_image_config({'max_patches': 16})
MEASURE = prompts.make_measure(TOK, IMAGE_CFG)


def _colors(img):
  px = {tuple(p) for p in np.asarray(img).reshape(-1, 3)} - {(255, 255, 255)}
  return {name for name, rgb in build_demo.RGB.items() if rgb in px}


def test_registered():
  assert niah.HAYSTACKS['video'] is video_haystack.VideoHaystack
  hs = niah.make_haystack('video', frame_size=28, fps=2)
  assert (hs.frame_size, hs.fps) == (28, 2.0)
  with pytest.raises(ValueError, match='fps'):
    video_haystack.VideoHaystack(fps=0)


@pytest.mark.parametrize('depth', [0.0, 0.4, 1.0])
def test_video_case(depth):
  hs = video_haystack.VideoHaystack(frame_size=56, fps=2)
  case = hs.make(600, depth, random.Random(3), MEASURE)
  video, question = case.messages[0]['content']
  names = video['frames']
  assert video['type'] == 'video' and video['fps'] == 2 and question['type'] == 'text'
  assert 560 < case.length <= 600 and MEASURE(case.messages, case.images) == case.length
  assert len(names) == len(case.images) > 20
  needle = names[round(depth * (len(names) - 1))]
  assert _colors(case.images[needle]) == {case.answer}
  others = {c for n in names if n != needle for c in _colors(case.images[n])}
  assert len(others) == 1 and case.answer not in others  # one circle colour throughout
  # The circle moves: consecutive distractor frames differ.
  arrs = [np.asarray(case.images[n]) for n in names if n != needle]
  assert sum(not np.array_equal(a, b) for a, b in zip(arrs, arrs[1:])) > len(arrs) // 2
  shape = question['text'].split('which shows a ')[1].split(' ')[0]
  assert hs.is_hit(case, f'The {shape} is {case.answer}.')
  assert not hs.is_hit(case, f'{others.pop()}, or maybe {case.answer}')


def test_video_prompt_has_every_frame_after_its_timestamp():
  hs = video_haystack.VideoHaystack(frame_size=28, fps=4)
  case = hs.make(300, 0.5, random.Random(0), MEASURE)
  arrays = prompts.build_prompt(case.messages, TOK, IMAGE_CFG, images=case.images)
  n = len(case.messages[0]['content'][0]['frames'])
  assert len(arrays.image_grid_hws) == n == (arrays.input_ids == TOK.special['<|media_start|>']).sum()
  text = TOK.decode(arrays.input_ids).replace(' ', '')
  for k in (0, 1, n - 1):
    assert f'{chat.video_lib.format_timestamp(k / 4)}<|media_start|>' in text
  with pytest.raises(haystacks.TooShort):
    hs.make(20, 0.5, random.Random(0), MEASURE)
