"""Kimi-VL: MoonViT -> patch-merge projector -> features scattered into the token embeddings at
`<|media_pad|>` positions -> DeepSeek-V3-style MLA + MoE decoder (Kimi-VL report, section 2.1).

Two ways to call it, one code path:

* HF style: `KimiVL(config).apply({'params': p}, input_ids, pixel_values=pv, image_grid_hws=g)`
  with `input_ids [B, T]` (placeholders already expanded), `pixel_values [L, 3, 14, 14]` (each
  image's patches row-major) and `image_grid_hws [N, 2]`. Images fill the placeholders of the
  flattened batch in order. The grid must be concrete (host) data.
* Packed batches (the data pipeline's): `input_ids [B, T]` plus `patches [B, P, 588]` in merge
  order, `patch_coords [B, P, 2]`, `patch_image_ids [B, P]`, `image_grid_hws [B, I, 2]`; row b's
  merged image tokens fill row b's placeholders in order. Fully jittable with static shapes.

KV-cache decoding (`docs/sampling.md`): `KimiVL(config, mode='prefill')` takes the same inputs
and returns `(logits, cache)` with every layer's cache entries of the sequence; `mode='decode'`
takes `input_ids [B, T]` (new tokens), `positions` (their cache slots) and `cache` (stacked
`[L, B, S, ...]`, see `decoder.LanguageModel`) and returns `(logits, new entries)`; images only
at prefill. `logit_index` [B] narrows the logits to one token per row ([B, V]).

`KimiVL(config, kernels=...)` takes the `Kernels` (`model/kernels.py`) that compute attention,
routed experts, the MoE stack's schedule and the decoder's row order; the default is the
single-device computation of the config. A run on a mesh passes
`parallel.kernels.build_kernels(config, mesh, rules)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.decoder import LanguageModel
from kimi_vl_jax.model.kernels import Kernels, default_kernels
from kimi_vl_jax.model.projector import Projector
from kimi_vl_jax.model.vision import MoonViT, pack_hf_images

Array = jax.Array


def scatter_image_features(embeds: Array, input_ids: Array, features: Array,
                           placeholder_id: int) -> Array:
  """Replaces, row by row, the embeddings at placeholder positions by `features` in order.

  embeds [B, T, D], input_ids [B, T], features [B, M, D] (M merged image tokens per row; rows
  with fewer placeholders than M leave the rest unused, padding features are never read when
  the counts match). Placeholders beyond M keep their token embedding (the data pipeline never
  produces that; the HF entry point checks counts on the host).
  """
  is_pad = input_ids == placeholder_id                                  # [B, T]
  slot = jnp.cumsum(is_pad, axis=1) - 1                                 # k-th placeholder -> k
  valid = is_pad & (slot < features.shape[1])
  gathered = jnp.take_along_axis(features, jnp.clip(slot, 0, features.shape[1] - 1)[..., None],
                                 axis=1)                                # [B, T, D]
  return jnp.where(valid[..., None], gathered.astype(embeds.dtype), embeds)


class KimiVL(nn.Module):
  """The whole vision-language model; see the module docstring for the two input forms."""
  config: KimiVLConfig
  kernels: Kernels | None = None   # None: `default_kernels(config)` (one device)
  mode: str = 'train'              # 'train' | 'prefill' | 'decode' (module docstring)
  absorb: bool = True              # decode: weight-absorbed MLA over the latent cache

  def setup(self):
    c = self.config
    k = default_kernels(c) if self.kernels is None else self.kernels
    self.sequence_layout = k.sequence_layout
    self.vision_tower = MoonViT(c.vision, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                                scan_layers=c.scan_layers, remat_policy=c.remat_policy,
                                kernels=k)
    self.projector = Projector(c)
    self.language_model = LanguageModel(c, kernels=k, layout=k.layout, mode=self.mode,
                                        absorb=self.absorb)

  def encode_images(self, patches: Array, patch_coords: Array, patch_image_ids: Array,
                    image_grid_hws: Array) -> Array:
    """[B, P, 588] packed patches -> [B, P/4, D] image tokens for the language model."""
    feats = self.vision_tower(patches, patch_coords, patch_image_ids, image_grid_hws)
    return self.projector(feats)

  def __call__(self, input_ids: Array, pixel_values: Array | None = None,
               image_grid_hws: Array | None = None, *, positions: Array | None = None,
               segment_ids: Array | None = None, patches: Array | None = None,
               patch_coords: Array | None = None, patch_image_ids: Array | None = None,
               return_aux: bool = False, cache: dict[str, Array] | None = None,
               logit_index: Array | None = None) -> Array | tuple:
    if self.mode != 'train':
      return self._cached(input_ids, pixel_values, image_grid_hws, positions=positions,
                          segment_ids=segment_ids, patches=patches, patch_coords=patch_coords,
                          patch_image_ids=patch_image_ids, return_aux=return_aux, cache=cache,
                          logit_index=logit_index)
    if cache is not None or logit_index is not None:
      raise ValueError("cache / logit_index are for mode='prefill' / 'decode'")
    B, T = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    embeds = self._embed(input_ids, pixel_values, image_grid_hws, patches=patches,
                         patch_coords=patch_coords, patch_image_ids=patch_image_ids)
    if self.sequence_layout is not None:
      # E.g. load-balanced context parallelism: permute the rows after the image scatter (it fills
      # placeholders in sequence order), run the decoder in that order, restore the logits' order.
      embeds, positions, segment_ids = (self.sequence_layout.to_layout(a)
                                        for a in (embeds, positions, segment_ids))
      logits, aux = self.language_model(embeds, positions, segment_ids)
      logits = self.sequence_layout.from_layout(logits)
    else:
      logits, aux = self.language_model(embeds, positions, segment_ids)
    return (logits, aux) if return_aux else logits

  def _cached(self, input_ids, pixel_values, image_grid_hws, *, positions, segment_ids, patches,
              patch_coords, patch_image_ids, return_aux, cache, logit_index):
    """'prefill' / 'decode': (logits, cache entries), with aux in the middle if return_aux."""
    B, T = input_ids.shape
    if positions is None:
      if self.mode == 'decode':
        raise ValueError("mode='decode' needs the positions (cache slots) of the new tokens")
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    if self.mode == 'decode' and (pixel_values is not None or patches is not None):
      raise ValueError('images enter at prefill; decode takes only new text tokens')
    embeds = self._embed(input_ids, pixel_values, image_grid_hws, patches=patches,
                         patch_coords=patch_coords, patch_image_ids=patch_image_ids)
    logits, aux, entries = self.language_model(embeds, positions, segment_ids, cache,
                                               logit_index)
    return (logits, aux, entries) if return_aux else (logits, entries)

  def _embed(self, input_ids, pixel_values, image_grid_hws, *, patches, patch_coords,
             patch_image_ids) -> Array:
    """Token embeddings with the image features scattered into the placeholders: [B, T, D]."""
    c = self.config
    B, T = input_ids.shape
    embeds = self.language_model.embed(input_ids)                       # [B, T, D]

    if pixel_values is not None:
      if patches is not None:
        raise ValueError('pass either HF-style pixel_values or packed patches, not both')
      if image_grid_hws is None:
        raise ValueError('pixel_values needs image_grid_hws [N, 2]')
      packed = pack_hf_images(pixel_values, image_grid_hws, c.vision.merge_kernel,
                              c.vision.patch_size)
      n_tokens = int(packed['patches'].shape[1]) // (c.vision.merge_kernel[0] *
                                                      c.vision.merge_kernel[1])
      ids = np.asarray(input_ids) if not isinstance(input_ids, jax.core.Tracer) else None
      if ids is not None and int((ids == c.media_placeholder_token_id).sum()) != n_tokens:
        raise ValueError(
            f'input_ids hold {int((ids == c.media_placeholder_token_id).sum())} media '
            f'placeholders (id {c.media_placeholder_token_id}) but the images give {n_tokens} '
            'tokens (sum of h*w/4 over image_grid_hws)')
      feats = self.encode_images(packed['patches'], packed['patch_coords'],
                                 packed['patch_image_ids'], packed['image_grid_hws'])
      # One vision "row" serves the whole batch: scatter over the flattened batch.
      flat = scatter_image_features(embeds.reshape(1, B * T, -1), input_ids.reshape(1, B * T),
                                    feats, c.media_placeholder_token_id)
      embeds = flat.reshape(B, T, -1)
    elif patches is not None and patches.shape[1] > 0:
      if patch_coords is None or patch_image_ids is None or image_grid_hws is None:
        raise ValueError('packed patches need patch_coords, patch_image_ids and image_grid_hws')
      feats = self.encode_images(patches, patch_coords, patch_image_ids, image_grid_hws)
      embeds = scatter_image_features(embeds, input_ids, feats, c.media_placeholder_token_id)
    return embeds


def init_params(config: KimiVLConfig, rng: Array, *, with_images: bool = True) -> dict:
  """Random parameters (boxed with logical axis metadata) from small dummy inputs."""
  model = KimiVL(config)
  return model.init(rng, **dummy_inputs(config, with_images=with_images))['params']


def dummy_inputs(config: KimiVLConfig, batch: int = 1, seq_len: int = 8,
                 with_images: bool = True) -> dict:
  """Minimal packed-batch inputs (one 2x2 image) that trace every parameter."""
  ids = jnp.zeros((batch, seq_len), jnp.int32)
  out = {'input_ids': ids}
  if with_images:
    out.update(
        patches=jnp.zeros((batch, 4, config.vision.patch_dim), jnp.float32),
        patch_coords=jnp.array([[[0, 0], [0, 1], [1, 0], [1, 1]]] * batch, jnp.int32),
        patch_image_ids=jnp.ones((batch, 4), jnp.int32),
        image_grid_hws=jnp.array([[[2, 2]]] * batch, jnp.int32))
  return out
