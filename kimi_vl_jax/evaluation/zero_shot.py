"""Zero-shot classification from embeddings (a MoonViT pre-training evaluator, Kimi-VL report
section 2.3, in the CLIP / SigLIP protocol).

Each class is described by prompts, its name in several templates ("a photo of a {}.");
the text tower embeds every prompt, `class_embeddings` averages a class's normalised prompt
embeddings and renormalises, and an image is classified as the class of highest cosine
similarity with its embedding. Top-k accuracy uses the tie rule of `retrieval.positive_ranks`
(ties count against the image). Pure functions on embeddings: the towers run elsewhere.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kimi_vl_jax.evaluation import retrieval

TEMPLATES = ('a photo of a {}.', 'a picture of a {}.', 'an image of a {}.')


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES
                  ) -> list[list[str]]:
  """[C][M] prompts: every template filled with every class name."""
  if not class_names or not templates:
    raise ValueError('need at least one class name and one template')
  bad = [t for t in templates if t.count('{}') != 1]
  if bad:
    raise ValueError(f'templates must hold exactly one "{{}}": {bad}')
  return [[t.format(name) for t in templates] for name in class_names]


def class_embeddings(prompt_embeddings) -> np.ndarray:
  """[C, M, D] embeddings of each class's M prompts -> [C, D]: mean of the normalised prompt
  embeddings, renormalised."""
  e = np.asarray(prompt_embeddings, np.float32)
  if e.ndim != 3:
    raise ValueError(f'prompt embeddings must be [C, M, D]; got shape {e.shape}')
  c, m, d = e.shape
  return retrieval.normalize(retrieval.normalize(e.reshape(c * m, d)).reshape(c, m, d).mean(1))


def zero_shot_accuracy(zimg, class_emb, labels, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """{'top{k}': accuracy} of images zimg [N, D] against classes class_emb [C, D] for labels
  int [N] (0..C-1)."""
  labels = np.asarray(labels, np.int64)
  class_emb = np.asarray(class_emb)
  if labels.shape != (len(np.asarray(zimg)),):
    raise ValueError(f'labels must be [N={len(np.asarray(zimg))}]; got {labels.shape}')
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_emb)):
    raise ValueError(f'labels outside 0..{len(class_emb) - 1}')
  ranks = retrieval.positive_ranks(zimg, class_emb, [np.array([y]) for y in labels])
  return {f'top{k}': v for k, v in retrieval.recall_at_k(ranks, ks).items()}
