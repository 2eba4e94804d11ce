"""The MoonViT pre-training model: both SigLIP towers plus the caption decoder (Kimi-VL report,
arXiv 2504.07491, sec. 2.3: MoonViT trains on image-text pairs with `L = L_siglip + 2 L_caption`).

One Linen module holding everything the stage trains, with the parameter names
`checkpoint/siglip.py` fills from an HF SigLIP checkpoint:

    vision_tower/     MoonViT (model/vision.py), the tower the later stages keep
    image_pooling/    the attention-pooling head: one embedding per image (model/image_pooling.py)
    text_tower/       SigLIP's text encoder (model/siglip_text.py)
    caption_decoder/  the small CoCa-style decoder on MoonViT's packed patch features
                      (model/caption_decoder.py); SigLIP has none, so it starts from scratch
    siglip_loss/      {log_temperature, bias}: the SigLIP loss's learned t' and b
                      (model/siglip_loss.py; log 10 and -10 at init)

`__call__` takes a caption batch (`data/caption_pairs.py`: packed rows of images, one text-tower
text per image slot, the row's captions packed for the decoder) and returns the image and text
embeddings per slot (not normalised) and the decoder's logits; `train/vit_pretrain.py` turns them
into the loss. `embed_images` / `embed_texts` are the two towers alone (the evaluators).

`VitPretrainConfig.model` is a `KimiVLConfig`: its `vision` is MoonViT's shape, and its numerics
fields (dtype, param_dtype, scan_layers, remat_policy, attention_impl) apply to the towers, so
the MoonViT trained here has exactly the shape and parameter layout of the Kimi-VL preset that
later stages load it into (`vision_tower/`, docs/param_tree.md). Its `text` (the language model)
is not used here.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.model import siglip_loss as siglip_loss_lib
from kimi_vl_jax.model.caption_decoder import CaptionDecoder, CaptionDecoderConfig
from kimi_vl_jax.model.config import KimiVLConfig, SiglipTextConfig
from kimi_vl_jax.model.image_pooling import AttentionPoolingHead
from kimi_vl_jax.model.kernels import Kernels
from kimi_vl_jax.model.layers import param_with_axes
from kimi_vl_jax.model.siglip_text import SiglipTextTower
from kimi_vl_jax.model.vision import MoonViT

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VitPretrainConfig:
  """MoonViT (`model.vision`, with `model`'s numerics), the SigLIP text tower and the caption
  decoder. The text tower projects to MoonViT's width (the pooled image embedding's) and the
  decoder reads features of MoonViT's width."""
  model: KimiVLConfig
  text_tower: SiglipTextConfig
  caption: CaptionDecoderConfig

  def __post_init__(self):
    d = self.model.vision.hidden_size
    if self.text_tower.projection_size != d:
      raise ValueError(f'the text tower projects to {self.text_tower.projection_size} but the '
                       f'image embeddings have MoonViT\'s width {d}: set the text config\'s '
                       f'projection_size to {d}')
    if self.caption.vision_dim != d:
      raise ValueError(f'the caption decoder reads features of width {self.caption.vision_dim}'
                       f' but MoonViT has width {d}: set its vision_dim to {d}')

  @property
  def vision(self):
    return self.model.vision

  @property
  def param_dtype(self) -> str:
    return self.model.param_dtype


class SiglipLossScalars(nn.Module):
  """The SigLIP loss's learned log-temperature t' and bias b (fp32 scalars)."""

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    init = siglip_loss_lib.init_params()
    t = param_with_axes(self, 'log_temperature', lambda *_: init['log_temperature'], (),
                        jnp.float32, ())
    b = param_with_axes(self, 'bias', lambda *_: init['bias'], (), jnp.float32, ())
    return t, b


class VitPretrain(nn.Module):
  """See the module docstring. `kernels`: MoonViT's attention (`parallel.build_kernels` of
  `config.model`); the text tower and decoder use the dense default."""
  config: VitPretrainConfig
  kernels: Kernels = Kernels()

  def setup(self):
    mc = self.config.model
    dt, pdt = mc.jnp_dtype, mc.jnp_param_dtype
    self.vision_tower = MoonViT(mc.vision, dtype=dt, param_dtype=pdt,
                                scan_layers=mc.scan_layers, remat_policy=mc.remat_policy,
                                kernels=self.kernels)
    self.image_pooling = AttentionPoolingHead(mc.vision, dtype=dt, param_dtype=pdt)
    self.text_tower = SiglipTextTower(self.config.text_tower, dtype=dt, param_dtype=pdt,
                                      scan_layers=mc.scan_layers, remat_policy=mc.remat_policy)
    self.caption_decoder = CaptionDecoder(self.config.caption, dtype=dt, param_dtype=pdt)
    self.siglip_loss = SiglipLossScalars()

  def embed_images(self, patches, patch_coords, patch_image_ids, image_grid_hws,
                   return_features: bool = False):
    """[B, I, Dv] fp32 embedding per image slot (zeros for empty slots); with
    `return_features` also MoonViT's patch features [B, P, Dv]."""
    feats = self.vision_tower(patches, patch_coords, patch_image_ids, image_grid_hws)
    z = self.image_pooling(feats, patch_image_ids, image_grid_hws)
    return (z, feats) if return_features else z

  def embed_texts(self, text_tokens: Array) -> Array:
    """int [..., L] -> [..., Dv] fp32 (SigLIP: no attention mask, the last position's head)."""
    lead = text_tokens.shape[:-1]
    z = self.text_tower(text_tokens.reshape(-1, text_tokens.shape[-1]))
    return z.reshape(lead + z.shape[-1:])

  def scalars(self) -> tuple[Array, Array]:
    return self.siglip_loss()

  def __call__(self, batch: dict[str, Array]) -> dict[str, Array]:
    """A caption batch (`data/caption_pairs.py` keys) -> {'zimg' [B, I, Dv], 'ztxt' [B, I, Dv]
    (fp32, not normalised), 'caption_logits' [B, T, V] fp32, 'log_temperature', 'bias'}."""
    zimg, feats = self.embed_images(batch['patches'], batch['patch_coords'],
                                    batch['patch_image_ids'], batch['image_grid_hws'],
                                    return_features=True)
    ztxt = self.embed_texts(batch['text_tokens'])
    logits = self.caption_decoder(batch['caption_tokens'], batch['caption_positions'],
                                  batch['caption_image_ids'], feats, batch['patch_image_ids'])
    t, b = self.siglip_loss()
    return {'zimg': zimg, 'ztxt': ztxt, 'caption_logits': logits, 'log_temperature': t,
            'bias': b}


def dummy_batch(config: VitPretrainConfig, rows: int = 1, max_patches: int = 4,
                max_images: int = 1, caption_len: int = 2, text_len: int = 2
                ) -> dict[str, Array]:
  """An all-zero caption batch of the given sizes (shapes for `init` / `eval_shape`)."""
  z = lambda shape, dt=jnp.int32: jnp.zeros(shape, dt)
  return {
      'patches': z((rows, max_patches, config.vision.patch_dim), jnp.float32),
      'patch_coords': z((rows, max_patches, 2)),
      'patch_image_ids': z((rows, max_patches)),
      'image_grid_hws': z((rows, max_images, 2)),
      'text_tokens': z((rows, max_images, text_len)),
      'caption_tokens': z((rows, caption_len)),
      'caption_positions': z((rows, caption_len)),
      'caption_image_ids': z((rows, caption_len)),
  }


def init_params(config: VitPretrainConfig, rng) -> dict:
  """Boxed (logically partitioned) parameters of the whole model (shapes do not depend on the
  batch sizes)."""
  return VitPretrain(config).init(rng, dummy_batch(config))['params']
