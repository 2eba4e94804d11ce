"""`◁think▷ ... ◁/think▷` splitting (`data/thinking.py`), whole and streamed in any split."""

import pytest

from kimi_vl_jax.data.thinking import ThinkingSplitter, split_thinking

CASES = [
    ('◁think▷Two circles.◁/think▷The answer is 2.', ('Two circles.', 'The answer is 2.')),
    ('No thinking here.', ('', 'No thinking here.')),
    ('◁think▷cut by the token limit', ('cut by the token limit', '')),
    ('◁think▷◁/think▷', ('', '')),
    ('◁think▷a ◁ b◁/think▷x ◁think▷ y', ('a ◁ b', 'x ◁think▷ y')),   # one block only
]


@pytest.mark.parametrize('text,want', CASES)
def test_split_thinking(text, want):
  assert split_thinking(text) == want


@pytest.mark.parametrize('text,want', CASES)
@pytest.mark.parametrize('step', [1, 2, 3, 5, 100])
def test_streamed_split_equals_whole(text, want, step):
  s = ThinkingSplitter()
  pieces = []
  for i in range(0, len(text), step):
    pieces += s.feed(text[i:i + step])
  pieces += s.finish()
  got = (''.join(t for k, t in pieces if k == 'thinking'),
         ''.join(t for k, t in pieces if k == 'answer'))
  assert got == want
  assert all(t for _, t in pieces)
  # No piece of a marker ever leaks into the output.
  assert not any('think▷' in t for k, t in pieces if k == 'thinking')


def test_partial_marker_is_held_then_released():
  s = ThinkingSplitter()
  assert s.feed('so ◁th') == [('answer', 'so ')]
  assert s.feed('ree') == [('answer', '◁three')]
