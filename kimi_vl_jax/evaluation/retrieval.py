"""Image <-> text retrieval recall@k from embeddings (the MoonViT pre-training evaluators,
Kimi-VL report section 2.3; the COCO / Flickr30k protocol that SigLIP-style models report).

Pure functions on already computed embeddings: the image tower's `zimg [N_img, D]` and the text
tower's `ztxt [N_txt, D]`, plus `text_image [N_txt]`, the index of the image each text describes
(an image may have several texts, e.g. COCO's five captions). Scores are cosine similarities
(embeddings are L2-normalised here), higher = more similar; SigLIP's `logits = s * exp(t') + b`
orders candidates the same way for any temperature, so the learned scalars do not matter.

* image -> text: an image is a hit at k when any of its texts is among the k best-scored texts;
* text -> image: a text is a hit at k when its image is among the k best-scored images.

Rank of a query's positive = the number of non-positive candidates scoring at least as high
(ties count against the query, so constant embeddings score 0, not 100%). Queries are scored in
chunks, so no [N_img, N_txt] matrix is held at once for large sets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5)


def normalize(x) -> np.ndarray:
  """Rows scaled to unit L2 norm (fp32; zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be [N, D]; got shape {x.shape}')
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def positive_ranks(queries, candidates, positives: Sequence[np.ndarray],
                   chunk: int = 1024) -> np.ndarray:
  """The best rank (0 = first) of a positive for each query.

  queries [Q, D], candidates [C, D] (normalised here); positives[q]: candidate indices that are
  correct for query q (at least one). Rank = number of non-positive candidates whose score is >=
  the query's best positive score.
  """
  q, c = normalize(queries), normalize(candidates)
  if q.shape[1] != c.shape[1]:
    raise ValueError(f'queries have dimension {q.shape[1]}, candidates {c.shape[1]}')
  if len(positives) != len(q):
    raise ValueError(f'{len(positives)} positive sets for {len(q)} queries')
  ranks = np.empty(len(q), np.int64)
  for start in range(0, len(q), chunk):
    scores = q[start:start + chunk] @ c.T                                      # [q, C]
    for row, s in enumerate(scores):
      pos = np.asarray(positives[start + row], np.int64)
      if pos.size == 0:
        raise ValueError(f'query {start + row} has no correct candidate')
      is_pos = np.zeros(len(c), bool)
      is_pos[pos] = True
      best = s[is_pos].max()
      ranks[start + row] = int(np.count_nonzero((s >= best) & ~is_pos))
  return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """{k: fraction of queries whose positive rank is < k}."""
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    raise ValueError('no queries')
  return {int(k): float(np.mean(ranks < k)) for k in ks}


def image_text_retrieval(zimg, ztxt, text_image, ks: Sequence[int] = DEFAULT_KS
                         ) -> dict[str, float]:
  """Both directions' recall@k: {'i2t_recall@k': ..., 't2i_recall@k': ...} for each k.

  zimg [N_img, D], ztxt [N_txt, D]; text_image int [N_txt], the image index (0..N_img-1) each
  text describes. Every image needs at least one text.
  """
  zimg, ztxt = np.asarray(zimg), np.asarray(ztxt)
  text_image = np.asarray(text_image, np.int64)
  if text_image.shape != (len(ztxt),):
    raise ValueError(f'text_image must be [N_txt={len(ztxt)}]; got {text_image.shape}')
  if text_image.size and (text_image.min() < 0 or text_image.max() >= len(zimg)):
    raise ValueError(f'text_image holds indices outside 0..{len(zimg) - 1}')
  texts_of = [np.flatnonzero(text_image == i) for i in range(len(zimg))]
  missing = [i for i, t in enumerate(texts_of) if t.size == 0]
  if missing:
    raise ValueError(f'images {missing[:10]} have no text')
  i2t = recall_at_k(positive_ranks(zimg, ztxt, texts_of), ks)
  t2i = recall_at_k(positive_ranks(ztxt, zimg, [np.array([i]) for i in text_image]), ks)
  out = {f'i2t_recall@{k}': v for k, v in i2t.items()}
  out.update({f't2i_recall@{k}': v for k, v in t2i.items()})
  return out
