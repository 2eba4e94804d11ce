"""Chat messages -> the sampler's prompt arrays, exactly as training renders a conversation.

`build_prompt` renders the turns (data/chat.py) plus the generation prompt
`<|im_assistant|>assistant<|im_middle|>`, preprocesses each image (data/images.py, no
augmentation) and lays its patches out as HF `pixel_values` (row-major 14x14 patches per image,
`[L, 3, 14, 14]`), the form the sampler's `Prompt` takes. Image references are looked up in an
in-memory `images` mapping first (generated haystack images), then as files under `root` (which
they must not leave).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from PIL import Image

from kimi_vl_jax.data import chat, images as images_lib, sources
from kimi_vl_jax.sampling.prompts import parse_messages


@dataclasses.dataclass
class PromptArrays:
  """The fields of `sampling.Prompt`: input_ids [T] int32 (placeholders expanded),
  pixel_values [L, 3, 14, 14] float32 or None, image_grid_hws [N, 2] int32 or None."""
  input_ids: np.ndarray
  pixel_values: np.ndarray | None
  image_grid_hws: np.ndarray | None


def eval_image_config(image_cfg) -> images_lib.ImageConfig:
  """The data config's image settings (a ConfigDict / dict / ImageConfig) without augmentation."""
  if not isinstance(image_cfg, images_lib.ImageConfig):
    image_cfg = images_lib.ImageConfig.from_config(image_cfg)
  return dataclasses.replace(image_cfg, augment=False)


def hf_pixel_values(patches: np.ndarray, grid_hw) -> np.ndarray:
  """One image's patches in merge order [h*w, 588] -> row-major `[h*w, 3, 14, 14]`."""
  h, w = int(grid_hw[0]), int(grid_hw[1])
  row_major = patches[np.argsort(images_lib.merge_order_permutation(h, w))]
  return row_major.reshape(h * w, 3, images_lib.PATCH, images_lib.PATCH)


def build_prompt(messages: list[dict], tok, image_cfg: images_lib.ImageConfig, *,
                 images: Mapping[str, Image.Image] | None = None, root: str = '.',
                 system_prompt: str | None = None) -> PromptArrays:
  """A conversation ending in a user turn (or whose assistant turns are all context) as prompt
  arrays; the generation prompt is appended."""
  turns = parse_messages(messages)
  images = images or {}
  pixel_values, grids, ntok = [], [], []
  for ref in chat.image_refs(turns):
    if ref in images:
      patches, _, hw = images_lib.preprocess(images[ref], image_cfg)
    else:
      patches, _, hws, _ = sources.load_images([ref], root, image_cfg)
      hw = tuple(hws[0])
    pixel_values.append(hf_pixel_values(patches, hw))
    grids.append(hw)
    ntok.append(images_lib.num_image_tokens(hw))
  ids, _ = chat.render_chat(turns, tok, ntok, default_system_prompt=system_prompt,
                            add_generation_prompt=True)
  if not grids:
    return PromptArrays(ids.astype(np.int32), None, None)
  return PromptArrays(ids.astype(np.int32), np.concatenate(pixel_values).astype(np.float32),
                      np.asarray(grids, np.int32).reshape(-1, 2))



def make_measure(tok, image_cfg: images_lib.ImageConfig, *, system_prompt: str | None = None):
  """`measure(messages, images) -> prompt length in tokens` as `build_prompt` would render it,
  without building the pixel arrays (an image's token count is cached per image object, so a
  haystack search over thousands of images preprocesses each once)."""
  cache: dict[int, tuple[Image.Image, int]] = {}

  def image_tokens(img: Image.Image) -> int:
    hit = cache.get(id(img))
    if hit is None or hit[0] is not img:
      _, _, hw = images_lib.preprocess(img, image_cfg)
      hit = cache[id(img)] = (img, images_lib.num_image_tokens(hw))
    return hit[1]

  def measure(messages: list[dict], images: Mapping[str, Image.Image]) -> int:
    turns = parse_messages(messages)
    ntok = []
    for ref in chat.image_refs(turns):
      if ref in images:
        ntok.append(image_tokens(images[ref]))
      else:
        raise ValueError(f'measure: image {ref!r} is not in the in-memory images')
    ids, _ = chat.render_chat(turns, tok, ntok, default_system_prompt=system_prompt,
                              add_generation_prompt=True)
    return len(ids)

  return measure
