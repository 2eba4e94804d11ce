"""Video records: a video is its frames, each a native-resolution image after a timestamp text.

A chat message part (docs/video.md)::

  {"type": "video", "frames": ["clip/0.png", "clip/1.png", ...], "timestamps": [0.0, 0.5, ...]}
  {"type": "video", "frames": [...], "fps": 2}          # timestamps k / fps

renders, frame after frame, as `hh:mm:ss.fff` then the frame's image block (chat.py), e.g.
`00:00:01.500<|media_start|>image<|media_content|><|media_pad|>*n<|media_end|>` (the timestamp
text of Kimi-K2.5; the Kimi-VL report, section 2.3, trains on long video as frame sequences).

Two reductions, both uniform over time and both keeping the first and the last frame (so the
video's start and duration stay visible):
  1. `data.image.max_video_frames`: a longer video is subsampled before any frame is read.
  2. The row budget (`data.seq_len` tokens, `data.max_patches` patches, `data.max_images`
     images): an example that does not fit a row is subsampled further, down to its first and
     last frame (`fit_frames`). One that still does not fit is dropped and counted as
     `too_long` / `too_many_patches` / `too_many_images`, like any oversize example. Every frame
     removed is counted (`frames_subsampled`, `frames_over_budget` in the pipeline stats); no
     video is silently truncated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

# An example's `video_stats` vector (and kept counts per source, packing.py): videos, frames
# kept, frames removed by max_video_frames, frames removed to fit the row budget.
VIDEO_STATS = ('videos', 'frames', 'frames_subsampled', 'frames_over_budget')


@dataclasses.dataclass(frozen=True)
class Video:
  """Frame references (paths under the dataset root) and their times in seconds."""
  frames: tuple[str, ...]
  timestamps: tuple[float, ...]

  def __len__(self) -> int:
    return len(self.frames)

  def select(self, indices: Sequence[int]) -> 'Video':
    return Video(tuple(self.frames[i] for i in indices),
                 tuple(self.timestamps[i] for i in indices))


def _number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_video(part: dict) -> Video:
  """A `{"type": "video", ...}` part -> Video; ValueError (the reason) if malformed.

  `frames`: a non-empty list of image paths. Exactly one of `timestamps` (seconds, >= 0,
  strictly increasing, one per frame) or `fps` (> 0; frame k at k / fps seconds).
  """
  frames = part.get('frames')
  if not isinstance(frames, list) or not frames:
    raise ValueError('a video part needs a non-empty "frames" list of image paths (decode the '
                     'video into frames first)')
  if not all(isinstance(f, str) and f for f in frames):
    raise ValueError('video "frames" must all be non-empty path strings')
  has_ts, has_fps = 'timestamps' in part, 'fps' in part
  if has_ts == has_fps:
    raise ValueError('a video part needs exactly one of "timestamps" and "fps"')
  if has_fps:
    fps = part['fps']
    if not _number(fps) or fps <= 0:
      raise ValueError(f'video "fps" must be a number > 0, got {fps!r}')
    return Video(tuple(frames), tuple(k / float(fps) for k in range(len(frames))))
  ts = part['timestamps']
  if not isinstance(ts, list) or len(ts) != len(frames):
    raise ValueError(f'video "timestamps" must be a list with one entry per frame '
                     f'({len(frames)} frames)')
  if not all(_number(t) and t >= 0 for t in ts):
    raise ValueError('video "timestamps" must be finite numbers >= 0 (seconds)')
  if any(b <= a for a, b in zip(ts, ts[1:])):
    raise ValueError('video "timestamps" must be strictly increasing')
  return Video(tuple(frames), tuple(float(t) for t in ts))


def format_timestamp(seconds: float) -> str:
  """Seconds -> `hh:mm:ss.fff` (milliseconds rounded; hours grow past 99 if they must)."""
  ms = int(round(float(seconds) * 1000))
  h, ms = divmod(ms, 3_600_000)
  m, ms = divmod(ms, 60_000)
  s, ms = divmod(ms, 1000)
  return f'{h:02d}:{m:02d}:{s:02d}.{ms:03d}'


def subsample_indices(timestamps: Sequence[float], m: int) -> np.ndarray:
  """`m` frame indices (increasing, distinct) spread uniformly over time: the first and the last
  frame always, in between the frame nearest each of the m evenly spaced times (each pick limited
  so that the remaining picks still fit). All frames when m >= len; the first when m == 1."""
  n = len(timestamps)
  if m >= n:
    return np.arange(n)
  if m < 1:
    raise ValueError(f'subsample_indices: m must be >= 1, got {m}')
  if m == 1:
    return np.zeros(1, np.int64)
  ts = np.asarray(timestamps, np.float64)
  targets = np.linspace(ts[0], ts[-1], m)
  out = np.empty(m, np.int64)
  prev = -1
  for k, t in enumerate(targets):
    lo, hi = prev + 1, n - (m - k)
    j = int(np.searchsorted(ts, t))
    j = min(max(j, lo), hi)
    if j > lo and abs(ts[j - 1] - t) <= abs(ts[j] - t):
      j -= 1
    out[k] = prev = j
  return out


def fit_frames(frame_costs: Sequence[np.ndarray], timestamps: Sequence[Sequence[float]],
               fixed: np.ndarray, limits: np.ndarray) -> tuple[list[np.ndarray], bool]:
  """Chooses how many frames of each video an example keeps so that it fits a row.

  frame_costs[v]: [n_v, K] cost of each frame of video v (K = tokens, patches, images);
  timestamps[v]: its frame times; fixed: [K] cost of everything else in the example;
  limits: [K] the row budget. Every video keeps min(n_v, C) frames, subsampled uniformly over
  time (`subsample_indices`), with the largest cap C that fits, but never fewer than
  min(n_v, 2) (its first and last frame). Returns (kept indices per video, whether it fits).
  """
  fixed = np.asarray(fixed, np.int64)
  limits = np.asarray(limits, np.int64)
  lens = [len(c) for c in frame_costs]

  def choose(cap: int) -> list[np.ndarray]:
    return [subsample_indices(ts, max(min(n, 2), min(n, cap)))
            for n, ts in zip(lens, timestamps)]

  def total(sel: list[np.ndarray]) -> np.ndarray:
    out = fixed.copy()
    for c, idx in zip(frame_costs, sel):
      out += np.asarray(c, np.int64)[idx].sum(axis=0)
    return out

  def fits(cap: int) -> bool:
    return bool((total(choose(cap)) <= limits).all())

  hi = max(lens, default=0)
  if fits(hi):
    return choose(hi), True
  if not fits(2):
    return choose(2), False
  lo = 2  # fits(lo) holds, fits(hi) does not
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return choose(lo), True
