"""Kimi-VL image preprocessing: native resolution, padded to the merge grid, patchified.

Follows the released Kimi-VL-A3B image processor: if `(W//14)*(H//14)` exceeds the patch
limit, scale both sides by `sqrt(limit / that)` (bicubic); zero-pad bottom/right to a multiple of
28 (= patch 14 x merge 2); scale to [0, 1]; normalise with mean/std; cut into 14x14 patches.
The pixel padding happens before normalisation, as in the reference (padded pixels are
`(0 - mean) / std`).

Patches come out in **merge order** (the batch contract, docs/architecture.md): the four patches
of each 2x2 merge window consecutive (top-left, top-right, bottom-left, bottom-right), windows
row-major; each patch flattened in (channel, y, x) order -> `[h*w, 3*14*14]`, plus
`patch_coords [h*w, 2]` (row, col) and the grid `(h, w)` in patches.

Unusual images are converted, not rejected: grayscale, palette, RGBA / LA (composited on white),
CMYK, 16-bit and float images, EXIF orientation, tiny images (padded up to one 28x28 window) and huge
ones (downscaled; JPEG decoded at reduced size). Missing, corrupt and truncated files raise
`BadImage` with a reason the pipeline counts.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from kimi_vl_jax.config_dict import as_dict

PATCH = 14
MERGE = 2
PATCH_DIM = 3 * PATCH * PATCH  # 588
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BadImage(Exception):
  """An image that cannot be used; `reason` is one of the pipeline's skip reasons."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """Preprocessing settings (config fields under `data.image`).

  max_patches: the reference's `in_token_limit` in 14x14 patches before padding (4096 for
    Kimi-VL, i.e. at most ~1024 merged tokens); small values shrink images for the tiny configs.
  max_side_patches: a side must stay below this many patches (the reference rejects >= 512, the
    size of what the position grid is interpolated from); longer sides are downscaled instead.
  max_video_frames: a longer video is subsampled to this many frames, uniformly over time,
    keeping its first and last frame, before any frame is read (video.py; docs/video.md).
  augment: random scale jitter in [scale_min, scale_max] (before the limit above), brightness and
    contrast jitter (multiplicative, +-brightness / +-contrast) and horizontal flips with
    probability hflip_prob; deterministic given the per-example rng.
  """
  max_patches: int = 4096
  max_side_patches: int = 512
  max_video_frames: int = 64
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  augment: bool = False
  scale_min: float = 0.8
  scale_max: float = 1.2
  brightness: float = 0.1
  contrast: float = 0.1
  hflip_prob: float = 0.0

  @classmethod
  def from_config(cls, cfg: Any) -> 'ImageConfig':
    """From a ConfigDict / dict (missing fields keep their defaults)."""
    if cfg is None:
      return cls()
    d = as_dict(cfg)
    aug = d.pop('augment', None)
    if isinstance(aug, dict):
      d['augment'] = bool(aug.get('enabled', True))
      for k in ('scale_min', 'scale_max', 'brightness', 'contrast', 'hflip_prob'):
        if k in aug:
          d[k] = aug[k]
    elif aug is not None:
      d['augment'] = bool(aug)
    for k in ('mean', 'std'):
      if k in d:
        d[k] = tuple(float(v) for v in d[k])
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'data.image: unknown fields {sorted(unknown)}')
    out = cls(**d)
    if out.max_patches < 1 or out.max_side_patches < 2:
      raise ValueError(f'data.image: max_patches must be >= 1 and max_side_patches >= 2, got {out}')
    if out.max_video_frames < 2:
      raise ValueError(f'data.image.max_video_frames must be >= 2 (a video keeps its first and '
                       f'last frame), got {out.max_video_frames}')
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB (alpha composited on white, high bit depths rescaled)."""
  mode = img.mode
  if mode == 'RGB':
    return img
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
    a = np.asarray(img, dtype=np.float64)
    if mode == 'F':
      hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
    elif mode == 'I' and a.size and a.max() <= 255:
      hi = 255.0
    else:
      hi = 65535.0
    a = np.clip(np.nan_to_num(a) / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(a, mode='L').convert('RGB')
  if mode == 'P':
    img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    mode = img.mode
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  return img.convert('RGB')  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: str, draft_limit: int | None = None) -> Image.Image:
  """Opens, decodes fully, applies EXIF orientation and converts to RGB; raises BadImage.

  draft_limit: a patch limit; JPEGs much larger than it are decoded at a reduced scale.
  """
  if not os.path.isfile(path):
    raise BadImage('missing_image', f'no file {path!r}')
  return _decode(path, path, draft_limit)


def decode_image(data: bytes, name: str, draft_limit: int | None = None) -> Image.Image:
  """`load_image` of an image's bytes (read from remote storage); `name` is for messages."""
  return _decode(io.BytesIO(data), name, draft_limit)


def _decode(source, path: str, draft_limit: int | None) -> Image.Image:
  try:
    with Image.open(source) as im:
      if draft_limit and im.format == 'JPEG':
        side = int(math.sqrt(draft_limit)) * PATCH * 2
        im.draft('RGB', (side, side))
      im.load()
      img = ImageOps.exif_transpose(im)
      img = _to_rgb(img)
      img.load()
  except Image.DecompressionBombError as e:
    raise BadImage('corrupt_image', f'{path!r}: refused as a decompression bomb ({e})') from e
  except (OSError, SyntaxError, ValueError) as e:
    reason = 'truncated_image' if 'truncated' in str(e).lower() else 'corrupt_image'
    raise BadImage(reason, f'{path!r}: {e}') from e
  if img.width < 1 or img.height < 1:
    raise BadImage('corrupt_image', f'{path!r}: empty image {img.size}')
  return img


def _resize_for_limits(img: Image.Image, cfg: ImageConfig) -> Image.Image:
  """The reference's token-limit resize, plus a guard for extreme aspect ratios."""
  w, h = img.size
  n = (w // PATCH) * (h // PATCH)
  if n > cfg.max_patches:
    scale = math.sqrt(cfg.max_patches / n)
    w, h = max(1, int(w * scale)), max(1, int(h * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
  # After padding, a side has ceil(side / 28) * 2 patches; keep it below max_side_patches.
  win = PATCH * MERGE
  max_windows = (cfg.max_side_patches - 1) // MERGE
  if math.ceil(w / win) > max_windows or math.ceil(h / win) > max_windows:
    scale = min(max_windows * win / w, max_windows * win / h)
    w, h = max(1, int(w * scale)), max(1, int(h * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
  return img


def patchify(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[H, W, 3] (H, W multiples of 28) -> patches [h*w, 588] and coords [h*w, 2], merge order.

  Window (i, j) of the 2x2 merge holds patches (2i+dy, 2j+dx) for (dy, dx) in
  ((0,0), (0,1), (1,0), (1,1)), i.e. the reference's `[h/2, 2, w/2, 2] -> [h/2, w/2, (2, 2)]`.
  """
  hh, ww, c = x.shape
  h, w = hh // PATCH, ww // PATCH
  # (wi, dy, py, wj, dx, px, c) -> (wi, wj, dy, dx, c, py, px)
  x = x.reshape(h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH, c)
  patches = x.transpose(0, 3, 1, 4, 6, 2, 5).reshape(h * w, c * PATCH * PATCH)
  return np.ascontiguousarray(patches), merge_order_coords(h, w)


def merge_order_coords(h: int, w: int) -> np.ndarray:
  """(row, col) of each patch of an h x w grid, in merge order: [h*w, 2] int32."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  rc = np.stack([rows, cols], -1).reshape(h // MERGE, MERGE, w // MERGE, MERGE, 2)
  return rc.transpose(0, 2, 1, 3, 4).reshape(h * w, 2).astype(np.int32)


def merge_order_permutation(h: int, w: int) -> np.ndarray:
  """Index array `perm` with `merge_order = row_major[perm]` (HF pixel_values -> this layout)."""
  rc = merge_order_coords(h, w)
  return (rc[:, 0] * w + rc[:, 1]).astype(np.int32)


def preprocess(img: Image.Image, cfg: ImageConfig,
               rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """RGB PIL image -> (patches [N, 588] float32, coords [N, 2] int32, (h, w) grid in patches).

  Augmentation runs only when `cfg.augment` and an rng is given (same rng state, same output).
  """
  img = _to_rgb(img)
  flip = False
  jitter = None
  if cfg.augment and rng is not None:
    s = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    if abs(s - 1.0) > 1e-6:
      w, h = img.size
      img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
    flip = bool(rng.random() < cfg.hflip_prob)
    jitter = (float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)),
              float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)))
  img = _resize_for_limits(img, cfg)
  x = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
  if flip:
    x = x[:, ::-1]
  if jitter is not None:
    bright, contrast = jitter
    mean = x.mean()
    x = np.clip((x - mean) * contrast + mean * bright, 0.0, 1.0)
  hh, ww = x.shape[:2]
  win = PATCH * MERGE
  ph, pw = (-hh) % win, (-ww) % win
  if ph or pw:
    x = np.pad(x, ((0, ph), (0, pw), (0, 0)))
  mean = np.asarray(cfg.mean, np.float32)
  std = np.asarray(cfg.std, np.float32)
  x = (x - mean) / std
  patches, coords = patchify(x)
  return patches.astype(np.float32), coords, (x.shape[0] // PATCH, x.shape[1] // PATCH)


def num_image_tokens(grid_hw: tuple[int, int]) -> int:
  """Merged tokens of an image: (h/2) * (w/2) `<|media_pad|>` placeholders."""
  return (grid_hw[0] // MERGE) * (grid_hw[1] // MERGE)
