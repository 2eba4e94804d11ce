"""Useful FLOPs of one training step: the work the model needs, whatever the implementation.

    matmuls: 6 x (active matmul parameters) x tokens  (forward 2, backward 4 per parameter)
    attention: 3 x forward (2 x query-key pairs x heads x (qk head dim + v head dim))

The matmul parameters are the `kernel`s and the routed experts' weights; embedding tables,
position tables, norms and biases are not matmuls. Of each MoE layer's routed experts only
`num_experts_per_tok` of `n_routed_experts` are active per token (`model/summary.py`). The
projector runs on merged tokens (one per `merge_kernel` window of patches). Attention:

* decoder: causal inside each packed segment (`segment_len` tokens if known; else the whole row,
  full causal), T (T + 1) / 2 pairs per segment of T tokens, MLA's head dims (Kimi-VL report
  sec. 2.1; DeepSeek-V2 sec. 2.1);
* MoonViT: bidirectional inside each image, p^2 pairs per image of p patches, images of
  `image_patches` (the data config's per-image limit; else the whole row is one image).

These are the figures of full rows: every token and patch slot filled. Padding a pipeline
leaves in a row, or patch slots of text-only rows, are not useful work, so a run's useful
FLOPs are at most these; the ratio of compiled to useful FLOPs is a lower bound of the waste.
All parameters are assumed to train (a frozen parameter saves its weight gradient, 2 of the 6).
"""

from __future__ import annotations

import math

import jax

from kimi_vl_jax.model.config import KimiVLConfig


def matmul_params(config: KimiVLConfig, params=None) -> dict[str, float]:
  """{'vision', 'projector', 'text'} matmul parameters active per token / patch, from `params`
  (arrays or shape structs of the model's tree; default: the config's, by `jax.eval_shape`)."""
  if params is None:
    from kimi_vl_jax.model.summary import abstract_params
    params = abstract_params(config)
  t = config.text
  out = {'vision_tower': 0.0, 'projector': 0.0, 'language_model': 0.0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, 'key', str(k)) for k in path]
    n = float(math.prod(leaf.shape))
    if 'experts' in keys:                               # routed experts [L, E, ...]
      out[keys[0]] += n * t.num_experts_per_tok / t.n_routed_experts
    elif keys[-1] == 'kernel':
      out[keys[0]] += n
  return {'vision': out['vision_tower'], 'projector': out['projector'],
          'text': out['language_model']}


def useful_flops(config: KimiVLConfig, *, rows: int, seq_len: int, max_patches: int = 0,
                 image_patches: int | None = None, segment_len: int | None = None,
                 params=None) -> dict[str, float]:
  """Useful FLOPs of one optimizer step over `rows` rows of `seq_len` tokens and `max_patches`
  patch slots each: {'text_matmul', 'text_attention', 'vision_matmul', 'vision_attention',
  'total'} (global, all devices together). `params`: as in `matmul_params`."""
  t, v = config.text, config.vision
  p = matmul_params(config, params)
  tokens = rows * seq_len
  seg = min(segment_len or seq_len, seq_len)
  full, rest = divmod(seq_len, seg)
  pairs = full * seg * (seg + 1) / 2 + rest * (rest + 1) / 2
  text_attn = 3 * 2 * pairs * t.num_heads * (t.qk_head_dim + t.v_head_dim) * t.num_layers * rows
  patches = rows * max_patches
  merge = math.prod(v.merge_kernel)
  vision_mm = 6 * p['vision'] * patches + 6 * p['projector'] * patches / merge
  vision_attn = 0.0
  if max_patches:
    img = min(image_patches or max_patches, max_patches)
    n_full, rest = divmod(max_patches, img)
    vpairs = n_full * img * img + rest * rest
    vision_attn = 3 * 2 * vpairs * v.num_heads * 2 * v.head_dim * v.num_layers * rows
  out = {'text_matmul': 6 * p['text'] * tokens, 'text_attention': text_attn,
         'vision_matmul': vision_mm, 'vision_attention': vision_attn}
  out['total'] = sum(out.values())
  return out
