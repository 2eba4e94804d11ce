"""The batch contract: the one definition of what the data pipeline yields and the model eats.

A batch is a dict of fixed-shape arrays whose sizes come from the config (`data` section, and
the model's `vision.patch_dim`), so one compiled step serves every batch of a phase:

| key               | shape     | dtype   | meaning                                               |
|-------------------|-----------|---------|-------------------------------------------------------|
| `input_ids`       | [B, T]    | int32   | tokens, `<|media_pad|>` per image token; pad id after |
| `targets`         | [B, T]    | int32   | next token in the segment (0 at its last token)       |
| `loss_mask`       | [B, T]    | float32 | 1 where `targets` is trained on (SFT: assistant only) |
| `segment_ids`     | [B, T]    | int32   | packed example 1, 2, ... of the row; 0 = padding      |
| `positions`       | [B, T]    | int32   | position inside the segment (restarts at 0)           |
| `patches`         | [B, P, D] | float32 | the row's image patches, merge order (`images.py`)    |
| `patch_coords`    | [B, P, 2] | int32   | (row, col) of each patch inside its image             |
| `patch_image_ids` | [B, P]    | int32   | image 1, 2, ... of the row per patch; 0 = padding     |
| `image_grid_hws`  | [B, I, 2] | int32   | (h, w) in patches per image of the row; 0 = padding   |

B = rows (per host as the pipeline yields them, `data.batch_size`; global when sharded over
the job), T = `data.seq_len`, P = `data.max_patches` (0 for text-only data: the image arrays
are then empty), I = `data.max_images`, D = the model's `vision.patch_dim` = 3 x 14 x 14 = 588.
Row b's merged image tokens (4 patches each) fill row b's `<|media_pad|>` tokens in order
(Kimi-VL report, arXiv 2504.07491, section 2.1).

A *prompt* batch (decoding, evaluation) has the same keys without the training targets
(`TARGET_KEYS`). Keys outside `KEYS` (e.g. the pipeline's `_stats`) are host-only extras: they
never reach the device (`BatchSpec.split`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from kimi_vl_jax.data import images as images_lib

# key -> (symbolic shape, dtype); the letters are BatchSpec's sizes.
LAYOUT: dict[str, tuple[tuple[str | int, ...], Any]] = {
    'input_ids': (('B', 'T'), np.int32),
    'targets': (('B', 'T'), np.int32),
    'loss_mask': (('B', 'T'), np.float32),
    'segment_ids': (('B', 'T'), np.int32),
    'positions': (('B', 'T'), np.int32),
    'patches': (('B', 'P', 'D'), np.float32),
    'patch_coords': (('B', 'P', 2), np.int32),
    'patch_image_ids': (('B', 'P'), np.int32),
    'image_grid_hws': (('B', 'I', 2), np.int32),
}
KEYS = tuple(LAYOUT)
# The sizes' config fields (`data` section) and the pipeline's defaults for them.
DEFAULT_SIZES = {'seq_len': 8192, 'max_patches': 16384, 'max_images': 64, 'batch_size': 8}
TARGET_KEYS = ('targets', 'loss_mask')
IMAGE_KEYS = ('patches', 'patch_coords', 'patch_image_ids', 'image_grid_hws')


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Sizes of one batch (see the module docstring): rows B, seq_len T, max_patches P,
  max_images I, patch_dim D; `targets=False` for a prompt batch."""
  rows: int
  seq_len: int
  max_patches: int
  max_images: int
  patch_dim: int = images_lib.PATCH_DIM
  targets: bool = True

  def __post_init__(self):
    for f in ('rows', 'seq_len', 'max_patches', 'max_images', 'patch_dim'):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or v < (1 if f in ('rows', 'seq_len') else 0):
        raise ValueError(f'BatchSpec.{f} must be an integer >= '
                         f'{1 if f in ("rows", "seq_len") else 0}, got {v!r}')
      object.__setattr__(self, f, int(v))

  @classmethod
  def from_config(cls, data_cfg: Any, model_cfg: Any = None, *, rows: int | None = None,
                  targets: bool = True) -> 'BatchSpec':
    """From a `data` config section (ConfigDict or dict; missing sizes take the pipeline's
    `DEFAULT_SIZES`); rows default to `data.batch_size` (rows per host) and the patch size to
    the model's `vision.patch_dim` (else 588)."""
    sizes = {k: data_cfg.get(k, v) for k, v in DEFAULT_SIZES.items()}
    if rows is not None:
      sizes['batch_size'] = rows
    unset = [k for k, v in sizes.items() if v is None]
    if unset:
      raise ValueError(f'data.{unset[0]} is None: the batch shape needs it')
    patch_dim = model_cfg.vision.patch_dim if model_cfg is not None else images_lib.PATCH_DIM
    return cls(rows=int(sizes['batch_size']), seq_len=int(sizes['seq_len']),
               max_patches=int(sizes['max_patches']), max_images=int(sizes['max_images']),
               patch_dim=patch_dim, targets=targets)

  def replace(self, **changes) -> 'BatchSpec':
    """A copy with some sizes changed, e.g. `spec.replace(rows=global_rows)`."""
    return dataclasses.replace(self, **changes)

  @property
  def keys(self) -> tuple[str, ...]:
    """The device keys, in `KEYS` order."""
    return tuple(k for k in KEYS if self.targets or k not in TARGET_KEYS)

  def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, numpy dtype)."""
    size = {'B': self.rows, 'T': self.seq_len, 'P': self.max_patches, 'I': self.max_images,
            'D': self.patch_dim}
    return {k: (tuple(size.get(d, d) for d in LAYOUT[k][0]), np.dtype(LAYOUT[k][1]))
            for k in self.keys}

  def zeros(self) -> dict[str, np.ndarray]:
    """An all-zero batch (host numpy): no segments, no images; a valid input to the model."""
    return {k: np.zeros(s, dt) for k, (s, dt) in self.shapes().items()}

  def abstract(self, sharding=None) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct`s of the batch (each with `sharding`, if given), for AOT lowering."""
    import jax
    return {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
            for k, (s, dt) in self.shapes().items()}

  def validate(self, batch: Mapping[str, Any], where: str = 'batch') -> None:
    """Raises ValueError naming the first key whose presence, shape or dtype is wrong.

    Host-only extras (keys outside `KEYS`) are allowed; a target key in a prompt batch is not.
    """
    want = self.shapes()
    missing = [k for k in want if k not in batch]
    if missing:
      raise ValueError(f'{where}: missing keys {missing} (expected {list(want)})')
    extra = [k for k in batch if k in KEYS and k not in want]
    if extra:
      raise ValueError(f'{where}: keys {extra} do not belong in a '
                       f'{"training" if self.targets else "prompt"} batch')
    for k, (shape, dt) in want.items():
      v = batch[k]
      got_shape = tuple(np.shape(v))
      got_dt = np.dtype(v.dtype) if hasattr(v, 'dtype') else np.asarray(v).dtype
      if got_shape != shape or got_dt != dt:
        raise ValueError(f'{where}[{k!r}]: expected {dt.name}{list(shape)}, got '
                         f'{got_dt.name}{list(got_shape)} ({self._sizes_hint(k)})')

  def _sizes_hint(self, key: str) -> str:
    fields = {'B': f'rows={self.rows}', 'T': f'data.seq_len={self.seq_len}',
              'P': f'data.max_patches={self.max_patches}',
              'I': f'data.max_images={self.max_images}', 'D': f'patch_dim={self.patch_dim}'}
    return ', '.join(fields[d] for d in LAYOUT[key][0] if isinstance(d, str))

  def split(self, batch: Mapping[str, Any], *, blank_images: bool = False
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(device part: this spec's keys as numpy arrays, host-only extras), after `validate`.

    blank_images: the ablation in which every image becomes the same constant (normalised 0 =
    the mean colour), so the model sees where images are but nothing of their content.
    """
    self.validate(batch)
    dev = {k: np.asarray(batch[k]) for k in self.keys}
    extra = {k: v for k, v in batch.items() if k not in KEYS}
    if blank_images:
      dev['patches'] = np.zeros_like(dev['patches'])
    return dev, extra
