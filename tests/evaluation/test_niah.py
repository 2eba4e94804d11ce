import re

import pytest

from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.evaluation import image_haystack, niah, prompts, text_haystack

MEASURE = prompts.make_measure(make_tokenizer(), prompts.eval_image_config({'max_patches': 16}))


def test_haystack_kinds():
  assert {'text', 'image'} <= set(niah.HAYSTACKS)
  assert niah.make_haystack('image', image_size=28).image_size == 28
  with pytest.raises(ValueError, match='unknown haystack'):
    niah.make_haystack('audio')


def test_buckets_depths_lengths():
  assert niah.length_buckets(131072) == [(0, 2048), (2048, 4096), (4096, 8192), (8192, 16384),
                                         (16384, 32768), (32768, 65536), (65536, 131072)]
  assert niah.length_buckets(5000) == [(0, 2048), (2048, 4096), (4096, 5000)]
  assert niah.length_buckets(512, first=256) == [(0, 256), (256, 512)]
  assert [niah.bucket_label(b) for b in niah.length_buckets(5000)] == ['(0,2K]', '(2K,4K]',
                                                                       '(4K,5000]']
  assert niah.depths(5) == [0, 0.25, 0.5, 0.75, 1.0] and niah.depths(1) == [0.5]
  assert niah.requested_lengths((256, 512), 4) == [320, 384, 448, 512]
  assert niah.requested_lengths((0, 256), 1) == [256]
  assert niah.requested_lengths((256, 512), 2, max_length=496) == [376, 496]
  assert niah.requested_lengths((512, 1024), 2, max_length=496) == []
  with pytest.raises(ValueError):
    niah.depths(0)


def _reader(case):
  """A perfect reader of the text haystack: the number after the needle's key."""
  text = case.messages[0]['content']
  key = re.search(r'magic number for (\S+) mentioned', text).group(1)
  return re.search(rf'numbers for {re.escape(key)} is: (\d+)', text).group(1)


def test_run_scores_each_case():
  hs = text_haystack.TextHaystack()
  buckets = [(0, 256), (256, 512)]
  seen = []

  def generate(cases):
    seen.extend(cases)
    return [_reader(c) if c.depth <= 0.5 else 'no idea' for c in cases]

  results = niah.run(hs, generate, buckets, per_bucket=2, n_depths=3, measure=MEASURE, seed=0)
  # (0, 256]: 128 is shorter than the needle + question (skipped), 256 fits
  assert sorted({r.requested for r in results}) == [256, 384, 512]
  assert len(results) == 9 == len(seen)
  assert all(r.length <= r.requested for r in results)
  assert [r.hit for r in results] == [r.depth <= 0.5 for r in results]
  again = niah.run(hs, lambda cs: ['x'] * len(cs), buckets, per_bucket=2, n_depths=3,
                   measure=MEASURE, seed=0)
  assert [r.answer for r in again] == [r.answer for r in results]     # seeded
  with pytest.raises(ValueError, match='responses for'):
    niah.run(hs, lambda cs: [], buckets, per_bucket=1, n_depths=1, measure=MEASURE)


def test_image_haystack_runs_through_the_same_sweep():
  hs = image_haystack.ImageHaystack(image_size=28)
  results = niah.run(hs, lambda cs: [c.answer for c in cs], [(0, 128), (128, 256)], per_bucket=1,
                     n_depths=2, measure=MEASURE)
  assert len(results) == 4 and all(r.hit for r in results)
