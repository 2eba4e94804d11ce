"""Prompts for the sampler: the HF-style `Prompt`, chat messages rendered into one, and a batch
of ragged prompts packed into fixed (bucketed) shapes for the prefill.

A `Prompt` is what `KimiVL`'s HF entry point takes for one sequence: `input_ids [T]` with each
image's `<|media_pad|>` run already expanded, `pixel_values [L, 3, 14, 14]` (each image's patches
row-major) and `image_grid_hws [N, 2]`. `render_messages` builds one from chat messages the way
training renders them (`data/chat.py`, Kimi-VL report section 2.4) plus the generation prompt
`<|im_assistant|>assistant<|im_middle|>`. `prefill_batch` left-aligns the prompts in rows of a
bucketed length (segment 1 = prompt, 0 = padding, positions 0..T-1) with each row's images
packed in merge order (`docs/architecture.md`, contract 1), so MoonViT runs once per prompt.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from kimi_vl_jax.data import chat, images as images_lib, sources
from kimi_vl_jax.model.vision import pack_hf_images
from kimi_vl_jax.storage import paths as storage_paths


@dataclasses.dataclass
class Prompt:
  """One prompt in the HF layout (see the module docstring)."""
  input_ids: np.ndarray
  pixel_values: np.ndarray | None = None
  image_grid_hws: np.ndarray | None = None

  def __post_init__(self):
    self.input_ids = np.asarray(self.input_ids, np.int32).reshape(-1)
    if self.input_ids.size == 0:
      raise ValueError('Prompt: input_ids is empty')
    if (self.pixel_values is None) != (self.image_grid_hws is None):
      raise ValueError('Prompt: give both pixel_values and image_grid_hws, or neither')
    if self.pixel_values is not None:
      self.pixel_values = np.asarray(self.pixel_values, np.float32)
      self.image_grid_hws = np.asarray(self.image_grid_hws, np.int32).reshape(-1, 2)


def parse_messages(messages: Sequence[dict]) -> list[chat.Turn]:
  """Chat messages (`data/chat.py` format, no assistant turn needed at the end) -> turns."""
  # parse_conversation validates a training record, which must hold an assistant turn: check
  # the messages with a placeholder answer appended, then drop it.
  turns = chat.parse_conversation({'messages': list(messages) + [
      {'role': 'assistant', 'content': '-'}]})
  return turns[:-1]


def render_messages(messages: Sequence[dict], tokenizer, *, image_root: str | None = None,
                    image_config: images_lib.ImageConfig | None = None,
                    default_system_prompt: str | None = None) -> Prompt:
  """Chat messages -> a `Prompt` ending in the generation prompt.

  Image parts name files (relative paths resolve against `image_root`, default the working
  directory; a remote root, `s3://` / `gs://`, is read through the read cache and its paths
  must stay under it), loaded and preprocessed by `data/images.py` with `image_config` (default
  `ImageConfig()`, no augmentation). `default_system_prompt` as in `chat.render_chat`.
  """
  turns = parse_messages(messages)
  cfg = image_config or images_lib.ImageConfig()
  pixel_values, grids, ntok = [], [], []
  for ref in chat.image_refs(turns):
    if image_root is not None and storage_paths.is_remote(image_root):
      patches, _, (h, w) = sources.load_image_patches(ref, image_root, cfg)
    else:
      path = ref if os.path.isabs(ref) or image_root is None else os.path.join(image_root, ref)
      patches, _, (h, w) = images_lib.preprocess(
          images_lib.load_image(path, draft_limit=cfg.max_patches), cfg)
    row_major = np.empty_like(patches)
    row_major[images_lib.merge_order_permutation(h, w)] = patches   # merge order -> row-major
    pixel_values.append(row_major.reshape(-1, 3, images_lib.PATCH, images_lib.PATCH))
    grids.append((h, w))
    ntok.append(images_lib.num_image_tokens((h, w)))
  ids, _ = chat.render_chat(turns, tokenizer, ntok, default_system_prompt=default_system_prompt,
                            add_generation_prompt=True)
  if not grids:
    return Prompt(ids)
  return Prompt(ids, np.concatenate(pixel_values), np.asarray(grids, np.int32))


def bucket(n: int, buckets: Sequence[int], *, multiple: int = 1, what: str = 'size') -> int:
  """The smallest bucket >= n, rounded up to a multiple of `multiple`; past the largest bucket,
  n rounded up to a multiple of the largest bucket."""
  fits = [b for b in sorted(buckets) if b >= n]
  b = fits[0] if fits else -(-n // max(buckets)) * max(buckets)
  if b < 1:
    raise ValueError(f'no {what} bucket for {n} (buckets {tuple(buckets)})')
  return -(-b // multiple) * multiple


def _pow2(n: int, least: int) -> int:
  return max(least, 1 << max(0, int(n - 1).bit_length()))


def prefill_batch(prompts: Sequence[Prompt], rows: int, seq_len: int, config,
                  ) -> dict[str, np.ndarray]:
  """Packs `prompts` into `rows` rows of `seq_len` tokens (rows past the prompts repeat the last
  one, so every row is a real sequence). Returns input_ids, positions, segment_ids, lengths [rows]
  and, when any prompt has images, patches [rows, P, 588], patch_coords, patch_image_ids,
  image_grid_hws [rows, I, 2] with P, I powers of two (a few shapes compile)."""
  if not prompts or len(prompts) > rows:
    raise ValueError(f'prefill_batch: {len(prompts)} prompts for {rows} rows')
  prompts = list(prompts) + [prompts[-1]] * (rows - len(prompts))
  out = {'input_ids': np.zeros((rows, seq_len), np.int32),
         'segment_ids': np.zeros((rows, seq_len), np.int32),
         'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
         'lengths': np.zeros((rows,), np.int32)}
  packed = []
  for b, p in enumerate(prompts):
    n = len(p.input_ids)
    if n > seq_len:
      raise ValueError(f'prompt of {n} tokens does not fit the prefill length {seq_len}')
    out['input_ids'][b, :n] = p.input_ids
    out['segment_ids'][b, :n] = 1
    out['lengths'][b] = n
    placeholders = int((p.input_ids == config.media_placeholder_token_id).sum())
    if p.pixel_values is None:
      if placeholders:
        raise ValueError(f'prompt {b} holds {placeholders} media placeholders but no images')
      packed.append(None)
      continue
    mk = config.vision.merge_kernel
    pk = pack_hf_images(p.pixel_values, p.image_grid_hws, mk, config.vision.patch_size)
    tokens = pk['patches'].shape[1] // (mk[0] * mk[1])
    if tokens != placeholders:
      raise ValueError(f'prompt {b}: {placeholders} media placeholders (id '
                       f'{config.media_placeholder_token_id}) but its images give {tokens} tokens')
    packed.append(pk)
  if all(pk is None for pk in packed):
    return out
  P = _pow2(max(pk['patches'].shape[1] for pk in packed if pk is not None), 16)
  I = _pow2(max(pk['image_grid_hws'].shape[1] for pk in packed if pk is not None), 1)
  out.update(patches=np.zeros((rows, P, config.vision.patch_dim), np.float32),
             patch_coords=np.zeros((rows, P, 2), np.int32),
             patch_image_ids=np.zeros((rows, P), np.int32),
             image_grid_hws=np.zeros((rows, I, 2), np.int32))
  for b, pk in enumerate(packed):
    if pk is None:
      continue
    L, n = pk['patches'].shape[1], pk['image_grid_hws'].shape[1]
    for key in ('patches', 'patch_coords', 'patch_image_ids'):
      out[key][b, :L] = pk[key][0]
    out['image_grid_hws'][b, :n] = pk['image_grid_hws'][0]
  return out


def as_prompt(p: Any, tokenizer, **render_kw) -> Prompt:
  """A `Prompt`, a dict of its fields, or a list of chat messages (needs `tokenizer`)."""
  if isinstance(p, Prompt):
    return p
  if isinstance(p, dict) and 'input_ids' in p:
    return Prompt(**p)
  if isinstance(p, (list, tuple)) and all(isinstance(m, dict) and 'role' in m for m in p):
    if tokenizer is None:
      raise ValueError('chat-message prompts need the Sampler to have a tokenizer')
    return render_messages(p, tokenizer, **render_kw)
  raise ValueError(f'a prompt is a Prompt, a dict with input_ids, or a list of chat messages; '
                   f'got {type(p).__name__}')
