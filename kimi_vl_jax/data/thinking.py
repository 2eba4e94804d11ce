"""The long-thinking part of a Kimi-VL-Thinking reply: `◁think▷ ... ◁/think▷ answer`.

Kimi-VL-A3B-Thinking (Kimi-VL report section 2.4, long-CoT SFT and RL) writes its reasoning
between the markers `◁think▷` and `◁/think▷` (plain text in the tokenizer, not special tokens)
and the answer after them. A chat client shows the thinking apart from the answer and keeps only
the answer in the conversation history it sends back.

`split_thinking(text)` splits a whole reply; `ThinkingSplitter` does it on a stream of text
deltas (markers may arrive split across deltas: a tail that could begin a marker is held back
until the next delta decides).
"""

from __future__ import annotations

THINK_START = '◁think▷'
THINK_END = '◁/think▷'


def split_thinking(text: str) -> tuple[str, str]:
  """(thinking, answer) of a reply. No start marker: ('', text). A start marker without an end
  (a reply cut by the token limit): everything after it is thinking, the answer is ''."""
  head, start, rest = text.partition(THINK_START)
  if not start:
    return '', text
  thinking, end, answer = rest.partition(THINK_END)
  if not end:
    return thinking, head
  return thinking, head + answer


class ThinkingSplitter:
  """`feed(delta) -> [(kind, text)]` with kind 'thinking' or 'answer'; `finish()` flushes.

  The markers themselves are not emitted. Joining every 'answer' piece gives the answer of
  `split_thinking` on the whole text, joining every 'thinking' piece its thinking.
  """

  def __init__(self):
    self.in_thinking = False
    self.seen_start = False
    self._held = ''

  def _marker(self) -> str:
    if self.in_thinking:
      return THINK_END
    return '' if self.seen_start else THINK_START

  def feed(self, delta: str) -> list[tuple[str, str]]:
    text, self._held = self._held + delta, ''
    out = []
    while text:
      kind = 'thinking' if self.in_thinking else 'answer'
      marker = self._marker()
      if not marker:                     # after the thinking block: all answer
        out.append((kind, text))
        break
      i = text.find(marker)
      if i >= 0:
        if i:
          out.append((kind, text[:i]))
        text = text[i + len(marker):]
        self.seen_start = True
        self.in_thinking = not self.in_thinking
        continue
      # Hold back the longest tail that is a proper prefix of the marker.
      keep = next((k for k in range(min(len(marker) - 1, len(text)), 0, -1)
                   if marker.startswith(text[-k:])), 0)
      if len(text) > keep:
        out.append((kind, text[:len(text) - keep]))
      self._held = text[len(text) - keep:]
      break
    return out

  def finish(self) -> list[tuple[str, str]]:
    held, self._held = self._held, ''
    return [('thinking' if self.in_thinking else 'answer', held)] if held else []
