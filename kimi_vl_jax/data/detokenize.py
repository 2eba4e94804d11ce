"""Streaming detokenization: text deltas as token ids arrive, one at a time.

Decoding each token alone is wrong in two ways: a byte-level BPE token (the Kimi tiktoken) may
hold part of a multi-byte UTF-8 character, which decodes to U+FFFD until the rest arrives, and a
SentencePiece token's leading-space marker is dropped when it starts the decoded span. So the
decoder keeps two offsets into the ids (the scheme of vLLM's `detokenize_incrementally`):

  prefix_offset  start of a short context window, decoded again each time so leading-space and
                 merge rules see the token before the new ones;
  read_offset    end of what has already been emitted.

A delta is `decode(ids[prefix:]) - decode(ids[prefix:read])`, held back while it ends with
U+FFFD (an incomplete character). `flush()` emits whatever is held at the end of the stream. The
concatenated deltas equal `tok.decode(ids)` (tested on both tokenizers).
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = '\ufffd'


class IncrementalDetokenizer:
  """`push(token_id) -> str` (possibly empty), `flush() -> str`; `text` is everything emitted."""

  def __init__(self, tok, skip_ids: Sequence[int] = ()):
    self.tok = tok
    self.skip_ids = frozenset(int(i) for i in skip_ids)
    self.ids: list[int] = []
    self.prefix_offset = 0
    self.read_offset = 0
    self.text = ''

  def _delta(self, final: bool) -> str:
    prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
    full = self.tok.decode(self.ids[self.prefix_offset:])
    if len(full) <= len(prefix) or (full.endswith(REPLACEMENT) and not final):
      return ''
    delta = full[len(prefix):]
    self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
    self.text += delta
    return delta

  def push(self, token_id: int) -> str:
    """The text this token completes ('' while a character or the context is incomplete)."""
    token_id = int(token_id)
    if token_id in self.skip_ids:
      return ''
    self.ids.append(token_id)
    return self._delta(final=False)

  def flush(self) -> str:
    """The held-back tail at the end of the stream (a truncated character decodes to U+FFFD)."""
    if self.read_offset == len(self.ids):
      return ''
    return self._delta(final=True)
