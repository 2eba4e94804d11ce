"""Image <-> text recall@k and zero-shot accuracy (evaluation/retrieval.py, zero_shot.py) on
constructed embeddings whose answers are known."""

import numpy as np
import pytest

from kimi_vl_jax.evaluation import retrieval, zero_shot


def _basis(n, d=16):
  return np.eye(d, dtype=np.float32)[:n]


def test_perfect_pairs_and_reversed_ranking():
  """Texts equal to their images: every recall is 1. Negated texts put the true pair last, so
  a ranking sorted the wrong way (ascending) would score 1 here and 0 above."""
  zimg = _basis(6) + 0.1
  out = retrieval.image_text_retrieval(zimg, zimg, np.arange(6), ks=(1, 5))
  assert out == {'i2t_recall@1': 1.0, 'i2t_recall@5': 1.0, 't2i_recall@1': 1.0,
                 't2i_recall@5': 1.0}
  rev = retrieval.image_text_retrieval(zimg, -zimg, np.arange(6), ks=(1, 5))
  assert rev == {'i2t_recall@1': 0.0, 'i2t_recall@5': 0.0, 't2i_recall@1': 0.0,
                 't2i_recall@5': 0.0}


def test_known_ranks_with_several_texts_per_image():
  """Image 0 has texts 0 and 1, image 1 has text 2, image 2 has text 3. Text 1 matches image 0
  (so image 0 is an i2t hit at 1 through it although text 0 is off); text 3 points at image 1
  first and image 2 second."""
  zimg = _basis(3)
  e = np.eye(16, dtype=np.float32)
  ztxt = np.stack([e[5], e[0], e[1], e[1] + 0.5 * e[2]])
  text_image = np.array([0, 0, 1, 2])
  np.testing.assert_array_equal(retrieval.positive_ranks(ztxt, zimg, [[0], [0], [1], [2]]),
                                [2, 0, 0, 1])   # text 0 is orthogonal to all: ties count against
  out = retrieval.image_text_retrieval(zimg, ztxt, text_image, ks=(1, 2))
  # i2t: image 0 -> text 1 first (hit@1); image 1 -> texts 2 and 3 score 1 and 0.89: text 2 first
  # (hit@1); image 2 -> text 3 (0.45) is its only positive, first among the texts (hit@1).
  assert out['i2t_recall@1'] == 1.0
  assert out['t2i_recall@1'] == pytest.approx(2 / 4) and out['t2i_recall@2'] == pytest.approx(3 / 4)


def test_constant_embeddings_score_nothing():
  z = np.ones((4, 8), np.float32)
  out = retrieval.image_text_retrieval(z, z, np.arange(4), ks=(1, 3))
  assert out['i2t_recall@1'] == 0.0 and out['t2i_recall@3'] == 0.0


def test_chunking_does_not_change_ranks():
  r = np.random.default_rng(0)
  q, c = r.normal(size=(37, 8)), r.normal(size=(11, 8))
  pos = [np.array([i % 11]) for i in range(37)]
  np.testing.assert_array_equal(retrieval.positive_ranks(q, c, pos, chunk=5),
                                retrieval.positive_ranks(q, c, pos))


def test_retrieval_input_errors():
  z = _basis(3)
  with pytest.raises(ValueError, match='no text'):
    retrieval.image_text_retrieval(z, z[:2], np.array([0, 1]))
  with pytest.raises(ValueError, match='outside'):
    retrieval.image_text_retrieval(z, z, np.array([0, 1, 3]))
  with pytest.raises(ValueError, match='dimension'):
    retrieval.positive_ranks(z, z[:, :4], [[0], [1], [2]])


def test_zero_shot_prompts_embeddings_and_accuracy():
  prompts = zero_shot.class_prompts(['cat', 'dog'], ('a {}', 'the {} here'))
  assert prompts == [['a cat', 'the cat here'], ['a dog', 'the dog here']]
  e = np.eye(8, dtype=np.float32)
  # Class c's two prompts: e[c] with a template direction e[6] or e[7] of different lengths.
  per_prompt = np.stack([np.stack([e[c] + e[6], 3 * (e[c] + e[7])]) for c in range(3)])
  classes = zero_shot.class_embeddings(per_prompt)
  np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0, rtol=1e-6)
  images = np.stack([e[2], e[0], e[1], e[1]])
  labels = np.array([2, 0, 1, 0])
  acc = zero_shot.zero_shot_accuracy(images, classes, labels, ks=(1, 2))
  assert acc['top1'] == pytest.approx(0.75)
  assert acc['top2'] == pytest.approx(0.75)     # image 3 (class 1's direction) ties classes 0, 2
  flipped = zero_shot.zero_shot_accuracy(-images, classes, labels, ks=(1,))
  assert flipped['top1'] == 0.0                 # the wrong ranking direction scores nothing
  with pytest.raises(ValueError, match='exactly one'):
    zero_shot.class_prompts(['cat'], ('no slot',))
  with pytest.raises(ValueError, match='labels'):
    zero_shot.zero_shot_accuracy(images, classes, np.array([0, 1, 2, 3]))
