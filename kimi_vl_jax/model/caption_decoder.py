"""The small caption decoder of MoonViT pre-training (Kimi-VL report, section 2.3).

Kimi-VL pre-trains MoonViT with a SigLIP loss plus a CoCa-style caption loss: "a text decoder
performs next-token prediction conditioned on the features from the image encoder", initialised
from "a tiny decoder-only language model" (the report gives no size). This is that decoder: a
pre-norm transformer over caption tokens whose every block has causal self-attention within the
caption, cross-attention to the caption's image's MoonViT patch features, and a GELU MLP; learned
absolute positions, a final LayerNorm and an LM head tied to the token embedding.

Packing. MoonViT runs on packed rows (`model/vision.py`): row b holds the patches of several
images, `patch_image_ids [B, P]` naming the image (1..I, 0 = padding). The captions of a row are
packed the same way in their own token array: `caption_image_ids [B, T]` names, for each token,
the image of the same row it describes (0 = padding), and each caption is one contiguous span
with `positions` restarting at 0. Both attentions are segment-masked attention
(`model/attention.py`):

* self-attention: query and key segment = `caption_image_ids`, causal (a caption is contiguous,
  so sequence order is caption order); a caption never sees another caption of its row;
* cross-attention: query segment = `caption_image_ids`, key segment = `patch_image_ids`, not
  causal: a caption attends to exactly the patches of its own image, whatever else the row holds.

So the batch a pre-training step needs is the MoonViT batch plus three [B, T] arrays, and one
image has one caption. Padding tokens attend to nothing (output 0 before the residual).

Presets (`CAPTION_PRESETS`): `tiny` for tests; `so400m`, the size used with the SO400M-shaped
MoonViT (vision width 1152): 6 layers of width 768, 12 heads, MLP 3072, vocabulary 32000 (the
SigLIP text tokenizer's size; set `vocab_size` to the caption tokenizer's), max 64 caption
tokens: 82.2M parameters (24.6M of them the tied embedding), small against MoonViT's ~413M. Our
choice of "tiny"; the report does not give one.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.model import attention
from kimi_vl_jax.model.layers import (DenseGeneral, LayerNorm, constrain, gelu_erf,
                                      param_with_axes)

Array = jax.Array

_ACT = ('act_batch', 'act_len', 'act_embed')


@dataclasses.dataclass(frozen=True)
class CaptionDecoderConfig:
  """Sizes of the caption decoder (module docstring). `vision_dim` is MoonViT's width."""
  vocab_size: int = 32000
  hidden_size: int = 768
  num_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 3072
  max_len: int = 64
  vision_dim: int = 1152
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'caption decoder: hidden_size {self.hidden_size} is not divisible by '
                       f'num_heads {self.num_heads}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


CAPTION_PRESETS = {
    'tiny': CaptionDecoderConfig(vocab_size=1024, hidden_size=32, num_layers=2, num_heads=2,
                                 mlp_dim=64, max_len=32, vision_dim=64),
    'so400m': CaptionDecoderConfig(),
}


def get_caption_preset(name: str, **overrides) -> CaptionDecoderConfig:
  if name not in CAPTION_PRESETS:
    raise ValueError(f'caption decoder preset {name!r} unknown; choose one of '
                     f'{sorted(CAPTION_PRESETS)}')
  return dataclasses.replace(CAPTION_PRESETS[name], **overrides)


class _Attention(nn.Module):
  """Multi-head attention of `x` over `kv` (self when kv is x) with a segment mask."""
  config: CaptionDecoderConfig
  kv_dim: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  kernel: attention.AttentionKernel

  @nn.compact
  def __call__(self, x, kv, q_segment_ids, kv_segment_ids, *, causal: bool):
    cfg = self.config
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    q = dense((d,), (n, h), ('embed', 'heads', 'kv'), name='query')(x)
    k = dense((self.kv_dim,), (n, h), ('embed', 'heads', 'kv'), name='key')(kv)
    v = dense((self.kv_dim,), (n, h), ('embed', 'heads', 'kv'), name='value')(kv)
    o = self.kernel(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=h ** -0.5)
    return dense((n, h), (d,), ('heads', 'kv', 'embed'), name='out')(o)


class CaptionBlock(nn.Module):
  """x += self_attn(LN x); x += cross_attn(LN x, image features); x += mlp(LN x)."""
  config: CaptionDecoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel: attention.AttentionKernel = attention.AttentionKernel()

  @nn.compact
  def __call__(self, x, image, caption_image_ids, patch_image_ids):
    cfg = self.config
    d = cfg.hidden_size
    norm = functools.partial(LayerNorm, d, eps=cfg.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    attn = functools.partial(_Attention, cfg, d, self.dtype, self.param_dtype, self.kernel)
    y = norm(name='self_attn_norm')(x)
    x = x + attn(name='self_attn')(y, y, caption_image_ids, caption_image_ids, causal=True)
    y = norm(name='cross_attn_norm')(x)
    x = x + attn(name='cross_attn')(y, image, caption_image_ids, patch_image_ids, causal=False)
    y = norm(name='mlp_norm')(x)
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    y = gelu_erf(dense((d,), (cfg.mlp_dim,), ('embed', 'mlp'), name='fc0')(y))
    y = dense((cfg.mlp_dim,), (d,), ('mlp', 'embed'), name='fc1')(y)
    return constrain(x + y, _ACT)


class CaptionDecoder(nn.Module):
  """__call__(tokens int [B, T], positions int [B, T], caption_image_ids int [B, T],
  image_features [B, P, vision_dim] (MoonViT's output), patch_image_ids int [B, P])
  -> logits fp32 [B, T, vocab]: position t predicts the caption's token t + 1."""
  config: CaptionDecoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel: attention.AttentionKernel = attention.AttentionKernel()

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, caption_image_ids: Array,
               image_features: Array, patch_image_ids: Array) -> Array:
    cfg = self.config
    d = cfg.hidden_size
    b, t = tokens.shape
    if positions.shape != (b, t) or caption_image_ids.shape != (b, t):
      raise ValueError(f'positions {positions.shape} and caption_image_ids '
                       f'{caption_image_ids.shape} must match tokens {tokens.shape}')
    if (image_features.ndim != 3 or image_features.shape[0] != b
        or image_features.shape[2] != cfg.vision_dim
        or patch_image_ids.shape != image_features.shape[:2]):
      raise ValueError(f'image_features must be [B={b}, P, {cfg.vision_dim}] with '
                       f'patch_image_ids [B, P]; got {image_features.shape} and '
                       f'{patch_image_ids.shape}')
    embed = param_with_axes(self, 'token_embed', nn.initializers.normal(stddev=0.02),
                            (cfg.vocab_size, d), self.param_dtype, ('vocab', 'embed'))
    pos_embed = param_with_axes(self, 'pos_embed', nn.initializers.normal(stddev=0.02),
                                (cfg.max_len, d), self.param_dtype, (None, 'embed'))
    pos = jnp.clip(positions, 0, cfg.max_len - 1)
    x = (jnp.take(embed, tokens, axis=0) + jnp.take(pos_embed, pos, axis=0)).astype(self.dtype)
    x = constrain(x, _ACT)
    # MoonViT features -> decoder keys / values' input, normalised once for every layer.
    image = LayerNorm(cfg.vision_dim, eps=cfg.layer_norm_eps, dtype=self.dtype,
                      param_dtype=self.param_dtype, name='image_norm')(image_features)
    image = DenseGeneral((cfg.vision_dim,), (d,), ('vit_embed', 'embed'), use_bias=True,
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         name='image_proj')(image)
    for i in range(cfg.num_layers):
      x = CaptionBlock(cfg, self.dtype, self.param_dtype, self.kernel,
                       name=f'blocks_{i}')(x, image, caption_image_ids, patch_image_ids)
    x = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='final_norm')(x)
    return jnp.einsum('btd,vd->btv', x.astype(jnp.float32), embed.astype(jnp.float32))


def caption_targets(tokens, caption_image_ids):
  """Next-token targets and loss mask of packed captions: target t = token t + 1 of the same
  caption; the last token of each caption and padding get target 0, mask 0. int [B, T] ->
  (targets int32 [B, T], loss_mask float32 [B, T])."""
  tokens = jnp.asarray(tokens)
  ids = jnp.asarray(caption_image_ids)
  nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  nxt_ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
  mask = (ids > 0) & (nxt_ids == ids)
  return jnp.where(mask, nxt, 0).astype(jnp.int32), mask.astype(jnp.float32)
