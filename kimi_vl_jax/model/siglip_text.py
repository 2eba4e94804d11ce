"""SigLIP's text tower: the text encoder of MoonViT's contrastive pre-training (Kimi-VL report,
arXiv 2504.07491, sec. 2.3: "both encoders start from SigLIP-SO400M", loss L_siglip + 2 L_caption).

The function of HF's `SiglipTextModel` (a `SiglipModel`'s `text_model`):

    x = token_embedding[ids] + position_embedding[0 .. T-1]
    x = L pre-LayerNorm blocks: x += wo(attn(LN(x))); x += fc1(gelu_tanh(fc0(LN(x))))
    h = final_layernorm(x)
    z = head(h[:, -1])                    # the LAST position, whatever token is there

Attention is bidirectional (no causal mask). SigLIP pads every text to `max_position_embeddings`
tokens without an attention mask, so the last position is a padding token whose state has seen
the whole text: that is what `z` reads (not an EOS position). An optional `attention_mask`
(1 = real token) hides padding *keys* from every query, as HF does with one; queries are never
masked, so the last position still has an output. `z` is not normalised (the SigLIP loss
L2-normalises both towers' embeddings).

Parameters (`checkpoint/siglip.py` fills them from an HF SigLIP checkpoint), with the vision
tower's logical axis names, since the tower has MoonViT's width (docs/param_tree.md):

    token_embedding [V, D]   position_embedding [Tmax, D]
    layers/ (nn.scan over L)  norm0, norm1 {scale, bias} [L, D]
                              wqkv/kernel [L, D, 3, N, H]  wqkv/bias [L, 3, N, H]  (q | k | v)
                              wo/kernel [L, N, H, D]       wo/bias [L, D]
                              mlp/fc0/{kernel [L, D, F], bias}  mlp/fc1/{kernel [L, F, D], bias}
    final_layernorm/{scale, bias} [D]   head/{kernel [D, P], bias [P]}
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.model import attention
from kimi_vl_jax.model.config import SiglipTextConfig
from kimi_vl_jax.model.layers import (ACTIVATIONS, DenseGeneral, LayerNorm, constrain,
                                      layer_stack, param_with_axes)

Array = jax.Array

_ACT_AXES = ('act_batch', 'act_len', 'act_embed')


class SiglipTextBlock(nn.Module):
  """Pre-LN encoder block without positional rotation. Call signature fits `nn.scan`:
  (x [B, T, D], key_ids [B, T]) -> (x, None); keys with id 0 are hidden from every query."""
  config: SiglipTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel: Callable = attention.AttentionKernel()

  @nn.compact
  def __call__(self, x: Array, key_ids: Array) -> tuple[Array, None]:
    cfg = self.config
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    norm = functools.partial(LayerNorm, d, eps=cfg.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype)

    y = norm(name='norm0')(x)
    qkv = dense((d,), (3, n, h), ('vit_embed', 'vit_qkv', 'vit_heads', 'vit_kv'),
                name='wqkv')(y)  # [B, T, 3, N, H]
    # Every query is "segment 1"; keys of segment 1 (real) are visible, 0 (masked) are not.
    query_ids = jnp.ones_like(key_ids)
    o = self.kernel(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], query_ids, key_ids,
                    causal=False, scale=h ** -0.5)
    x = constrain(x + dense((n, h), (d,), ('vit_heads', 'vit_kv', 'vit_embed'), name='wo')(o),
                  _ACT_AXES)

    y = norm(name='norm1')(x)
    y = SiglipTextMlp(cfg, self.dtype, self.param_dtype, name='mlp')(y)
    return constrain(x + y, _ACT_AXES), None


class SiglipTextMlp(nn.Module):
  """fc1(act(fc0(x))), act = config.hidden_act (gelu tanh for SigLIP). Params `mlp/fc{0,1}`."""
  config: SiglipTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dense = functools.partial(DenseGeneral, use_bias=True, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    y = dense((cfg.hidden_size,), (cfg.intermediate_size,), ('vit_embed', 'vit_mlp'),
              name='fc0')(x)
    y = constrain(ACTIVATIONS[cfg.hidden_act](y), ('act_batch', 'act_len', 'act_mlp'))
    return dense((cfg.intermediate_size,), (cfg.hidden_size,), ('vit_mlp', 'vit_embed'),
                 name='fc1')(y)


class SiglipTextTower(nn.Module):
  """__call__(input_ids int [B, T], attention_mask [B, T] | None, return_hidden=False) ->
  text embeddings [B, P] (fp32; the head of the last position), or with `return_hidden` also
  the final-LayerNorm states [B, T, D]. T <= max_position_embeddings."""
  config: SiglipTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = 'none'
  kernel: Callable = attention.AttentionKernel()

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               return_hidden: bool = False):
    cfg = self.config
    if cfg.hidden_act not in ACTIVATIONS:
      raise ValueError(f'SigLIP text hidden_act {cfg.hidden_act!r} unknown; use one of '
                       f'{sorted(ACTIVATIONS)}')
    if input_ids.ndim != 2:
      raise ValueError(f'input_ids must be [B, T]; got {input_ids.shape}')
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(f'texts have {t} tokens but the SigLIP text tower has '
                       f'{cfg.max_position_embeddings} positions')
    if attention_mask is not None and attention_mask.shape != (b, t):
      raise ValueError(f'attention_mask {attention_mask.shape} does not match input_ids '
                       f'{input_ids.shape}')
    d = cfg.hidden_size
    init = nn.initializers.normal(stddev=0.02)
    table = param_with_axes(self, 'token_embedding', init, (cfg.vocab_size, d),
                            self.param_dtype, ('vocab', 'vit_embed'))
    positions = param_with_axes(self, 'position_embedding', init,
                                (cfg.max_position_embeddings, d), self.param_dtype,
                                (None, 'vit_embed'))
    x = jnp.take(table, input_ids, axis=0) + positions[:t]
    x = constrain(x.astype(self.dtype), _ACT_AXES)

    key_ids = (jnp.ones((b, t), jnp.int32) if attention_mask is None
               else (attention_mask > 0).astype(jnp.int32))
    args = (cfg, self.dtype, self.param_dtype, self.kernel)
    layers = layer_stack(SiglipTextBlock, args, length=cfg.num_layers, scan=self.scan_layers,
                         remat=self.remat_policy, broadcast=1, name='layers')
    for layer in layers if isinstance(layers, list) else [layers]:
      x, _ = layer(x, key_ids)

    hidden = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='final_layernorm')(x)
    z = DenseGeneral((d,), (cfg.projection_size,), ('vit_embed', None), use_bias=True,
                     dtype=self.dtype, param_dtype=self.param_dtype, name='head')(hidden[:, -1])
    z = z.astype(jnp.float32)
    return (z, hidden) if return_hidden else z
