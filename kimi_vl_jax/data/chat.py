"""Kimi chat format (ChatML, Kimi-VL report section 2.4) rendering with the SFT loss mask.

A conversation in the common `messages` form::

  {"messages": [
     {"role": "system", "content": "..."},
     {"role": "user", "content": [{"type": "image", "image": "imgs/a.png"},
                                  {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": "A cat."}]}

renders to::

  <|im_system|>system<|im_middle|>...<|im_end|>
  <|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|>*n<|media_end|>What is this?<|im_end|>
  <|im_assistant|>assistant<|im_middle|>A cat.<|im_end|>

(no newlines), with one `<|media_pad|>` run of n = (h/2)*(w/2) per image. Text spans are encoded
separately and joined with special ids, as the HF tokenizer does when it splits on special tokens.

A video part `{"type": "video", "frames": [...], "timestamps": [...] | "fps": F}` (video.py,
docs/video.md) renders as its frames, each an image block preceded by its `hh:mm:ss.fff`
timestamp text; its frames count as images everywhere (`image_refs`, `image_tokens`).

`token_mask[t]` is 1 when token t is trained on as a target: assistant content and the assistant's
`<|im_end|>`; 0 on system / user turns, the role tags (`<|im_assistant|>assistant<|im_middle|>`) and
any image placeholder block. The packer turns it into the batch's shifted `loss_mask`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from kimi_vl_jax.data import video as video_lib

ROLES = ('system', 'user', 'assistant')


class SkipExample(Exception):
  """A record that is skipped and counted under `reason` (see pipeline.SKIP_REASONS)."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass
class Turn:
  role: str
  parts: list[tuple[str, Any]]  # ('text', str), ('image', reference), ('video', video.Video)


def _image_ref(part: dict) -> str | None:
  """The path of an image part: {"type": "image", "image"|"path"|"url": ...} or image_url form."""
  for key in ('image', 'path', 'url', 'image_path'):
    v = part.get(key)
    if isinstance(v, str) and v:
      return v
  v = part.get('image_url')
  if isinstance(v, dict) and isinstance(v.get('url'), str):
    return v['url']
  if isinstance(v, str):
    return v
  return None


def parse_conversation(record: Any) -> list[Turn]:
  """Validates a `{"messages": [...]}` record; raises SkipExample with the reason otherwise."""
  if not isinstance(record, dict) or not isinstance(record.get('messages'), list):
    raise SkipExample('bad_schema', 'expected an object with a "messages" list')
  turns = []
  for k, m in enumerate(record['messages']):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise SkipExample('bad_schema', f'message {k} needs "role" and "content"')
    role = m['role']
    if role not in ROLES:
      raise SkipExample('unknown_role', f'message {k} has role {role!r}; known: {ROLES}')
    content = m['content']
    parts: list[tuple[str, Any]] = []
    if isinstance(content, str):
      parts.append(('text', content))
    elif isinstance(content, list):
      for j, p in enumerate(content):
        if isinstance(p, str):
          parts.append(('text', p))
          continue
        if not isinstance(p, dict):
          raise SkipExample('bad_schema', f'message {k} part {j} is not an object')
        kind = p.get('type', 'image' if _image_ref(p) else 'video' if 'frames' in p else 'text')
        if kind == 'text':
          if not isinstance(p.get('text'), str):
            raise SkipExample('bad_schema', f'message {k} part {j}: text part without a "text" string')
          parts.append(('text', p['text']))
        elif kind in ('image', 'image_url'):
          ref = _image_ref(p)
          if ref is None:
            raise SkipExample('bad_schema', f'message {k} part {j}: image part without a path')
          parts.append(('image', ref))
        elif kind == 'video':
          try:
            parts.append(('video', video_lib.parse_video(p)))
          except ValueError as e:
            raise SkipExample('bad_schema', f'message {k} part {j}: {e}') from e
        else:
          raise SkipExample('bad_schema', f'message {k} part {j} has unknown type {kind!r}')
    else:
      raise SkipExample('bad_schema', f'message {k} content is neither a string nor a list')
    if role == 'assistant':
      has_text = any(t == 'text' and v.strip() for t, v in parts)
      if not has_text:
        if any(t in ('image', 'video') for t, _ in parts):
          raise SkipExample('image_only_assistant',
                            f'assistant message {k} has images or video but no text')
        raise SkipExample('empty_assistant', f'assistant message {k} is empty')
    if role == 'system' and any(t in ('image', 'video') for t, _ in parts):
      raise SkipExample('bad_schema', f'system message {k} contains an image or video')
    turns.append(Turn(role, parts))
  if not any(t.role == 'assistant' for t in turns):
    raise SkipExample('no_assistant', 'conversation has no assistant turn to train on')
  return turns


def image_refs(turns: Sequence[Turn]) -> list[str]:
  """Image references in order of appearance, a video's frames in its place."""
  out = []
  for t in turns:
    for kind, v in t.parts:
      if kind == 'image':
        out.append(v)
      elif kind == 'video':
        out.extend(v.frames)
  return out


def videos(turns: Sequence[Turn]) -> list[video_lib.Video]:
  """The videos in order of appearance."""
  return [v for t in turns for kind, v in t.parts if kind == 'video']


def replace_videos(turns: Sequence[Turn], new: Sequence[video_lib.Video]) -> list[Turn]:
  """The turns with their videos replaced, in order, by `new` (e.g. subsampled ones)."""
  it = iter(new)
  out = [Turn(t.role, [(kind, next(it) if kind == 'video' else v) for kind, v in t.parts])
         for t in turns]
  if next(it, None) is not None:
    raise ValueError('replace_videos: more videos given than the turns hold')
  return out


class _Builder:
  """Accumulates ids and the per-token target mask."""

  def __init__(self, tok):
    self.tok = tok
    self.ids: list[int] = []
    self.mask: list[int] = []

  def special(self, name: str, trained: bool) -> None:
    self.ids.append(self.tok.special[name])
    self.mask.append(int(trained))

  def text(self, s: str, trained: bool) -> None:
    if s:
      ids = self.tok.encode(s)
      self.ids.extend(ids)
      self.mask.extend([int(trained)] * len(ids))

  def image(self, n_tokens: int) -> None:
    """`<|media_start|>image<|media_content|><|media_pad|>*n<|media_end|>`, never trained."""
    self.special('<|media_start|>', False)
    self.text('image', False)
    self.special('<|media_content|>', False)
    self.ids.extend([self.tok.media_pad_id] * n_tokens)
    self.mask.extend([0] * n_tokens)
    self.special('<|media_end|>', False)

  def frame(self, seconds: float, n_tokens: int) -> None:
    """A video frame: its `hh:mm:ss.fff` timestamp text, then its image block; never trained."""
    self.text(video_lib.format_timestamp(seconds), False)
    self.image(n_tokens)

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(self.ids, np.int32), np.asarray(self.mask, np.int32)


_ROLE_TAG = {'system': '<|im_system|>', 'user': '<|im_user|>', 'assistant': '<|im_assistant|>'}


def render_chat(turns: Sequence[Turn], tok, image_tokens: Sequence[int], *,
                default_system_prompt: str | None = None,
                add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Renders parsed turns; `image_tokens[k]` is the placeholder count of the k-th image.

  default_system_prompt: inserted as a system turn when the conversation has none (the Moonlight /
    Kimi templates use "You are a helpful assistant"); None inserts nothing.
  add_generation_prompt: append `<|im_assistant|>assistant<|im_middle|>` (for sampling).
  Returns (ids [n] int32, token_mask [n] int32).
  """
  b = _Builder(tok)
  if default_system_prompt is not None and (not turns or turns[0].role != 'system'):
    turns = [Turn('system', [('text', default_system_prompt)])] + list(turns)
  k = 0
  for turn in turns:
    trained = turn.role == 'assistant'
    b.special(_ROLE_TAG[turn.role], False)
    b.text(turn.role, False)
    b.special('<|im_middle|>', False)
    for kind, v in turn.parts:
      if kind == 'text':
        b.text(v, trained)
        continue
      n = 1 if kind == 'image' else len(v)
      if k + n > len(image_tokens):
        raise ValueError(f'render_chat: {k + n} images in the conversation, '
                         f'{len(image_tokens)} placeholder counts given')
      if kind == 'image':
        b.image(int(image_tokens[k]))
      else:
        for f, seconds in enumerate(v.timestamps):
          b.frame(seconds, int(image_tokens[k + f]))
      k += n
    b.special('<|im_end|>', trained)
  if k != len(image_tokens):
    raise ValueError(f'render_chat: {k} images in the conversation, {len(image_tokens)} counts given')
  if add_generation_prompt:
    b.special('<|im_assistant|>', False)
    b.text('assistant', False)
    b.special('<|im_middle|>', False)
  return b.arrays()


def frame_tokens(tok, seconds: float, n_tokens: int) -> int:
  """Tokens one video frame adds to a rendered chat (timestamp text + image block)."""
  b = _Builder(tok)
  b.frame(seconds, n_tokens)
  return len(b.ids)


def render_caption(caption: str, tok, image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Pretraining image-caption pair: image block, caption, `[EOS]`; trained on caption + EOS."""
  if not isinstance(caption, str) or not caption.strip():
    raise SkipExample('empty_text', 'caption is empty')
  b = _Builder(tok)
  b.image(image_tokens)
  b.text(caption, True)
  b.special('[EOS]', True)
  return b.arrays()


def render_text(text: str, tok) -> tuple[np.ndarray, np.ndarray]:
  """Pretraining text document: tokens then `[EOS]`, all trained."""
  if not isinstance(text, str) or not text.strip():
    raise SkipExample('empty_text', 'text document is empty')
  b = _Builder(tok)
  b.text(text, True)
  b.special('[EOS]', True)
  return b.arrays()
