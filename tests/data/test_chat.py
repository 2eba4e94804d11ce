"""Chat rendering: Kimi format, loss mask on assistant content only, one pad run per image."""

import numpy as np
import pytest

from kimi_vl_jax.data import chat


def _segments(tok, ids, mask):
  """Splits a rendered sequence into (text, trained) runs for readable assertions."""
  out, cur, cur_m = [], [], None
  for i, m in zip(ids, mask):
    if cur and m != cur_m:
      out.append((tok.decode(cur), bool(cur_m)))
      cur = []
    cur.append(int(i))
    cur_m = m
  out.append((tok.decode(cur), bool(cur_m)))
  return out


CONV = {'messages': [
    {'role': 'system', 'content': 'Be brief.'},
    {'role': 'user', 'content': [{'type': 'image', 'image': 'a.png'},
                                 {'type': 'text', 'text': 'and'},
                                 {'type': 'image', 'image': 'b.png'},
                                 {'type': 'text', 'text': 'what differs?'}]},
    {'role': 'assistant', 'content': 'The color.'},
    {'role': 'user', 'content': [{'type': 'text', 'text': 'and this?'},
                                 {'type': 'image_url', 'image_url': {'url': 'c.png'}}]},
    {'role': 'assistant', 'content': [{'type': 'text', 'text': 'A circle.'}]},
]}


def test_multi_turn_multi_image_mask_and_placeholders(tok):
  turns = chat.parse_conversation(CONV)
  assert chat.image_refs(turns) == ['a.png', 'b.png', 'c.png']
  n_tok = [4, 6, 1]  # (h/2)*(w/2) for grids (4,4), (4,6), (2,2)
  ids, mask = chat.render_chat(turns, tok, n_tok)
  assert ids.dtype == np.int32 and ids.shape == mask.shape
  # Exactly the assistant content and its <|im_end|> are trained.
  trained = [ids[s:e].tolist() for s, e in _runs(mask == 1)]
  assert trained == [tok.encode('The color.') + [tok.im_end_id],
                     tok.encode('A circle.') + [tok.im_end_id]]
  # Role tags are not trained; every <|im_assistant|> is followed by untrained "assistant<|im_middle|>".
  for k in np.nonzero(ids == tok.im_assistant_id)[0]:
    assert mask[k] == 0 and mask[k + 1] == 0 and ids[k + 2] == tok.im_middle_id and mask[k + 2] == 0
  # One <|media_pad|> run per image, of the right length, inside media_start/content/end.
  pad_runs = _runs(ids == tok.media_pad_id)
  assert [e - s for s, e in pad_runs] == n_tok
  for s, e in pad_runs:
    assert ids[s - 1] == tok.media_content_id and ids[e] == tok.media_end_id
    assert not mask[s:e].any()
  # The whole text, in the Kimi chat format (SentencePiece puts a space before each text span).
  text = tok.decode(ids).replace(' ', '')
  expect = ('<|im_system|>system<|im_middle|>Bebrief.<|im_end|>'
            '<|im_user|>user<|im_middle|><|media_start|>image<|media_content|>'
            + '<|media_pad|>' * 4 + '<|media_end|>and<|media_start|>image<|media_content|>'
            + '<|media_pad|>' * 6 + '<|media_end|>whatdiffers?<|im_end|>'
            '<|im_assistant|>assistant<|im_middle|>Thecolor.<|im_end|>'
            '<|im_user|>user<|im_middle|>andthis?<|media_start|>image<|media_content|><|media_pad|>'
            '<|media_end|><|im_end|><|im_assistant|>assistant<|im_middle|>Acircle.<|im_end|>')
  assert text == expect


def _runs(b):
  b = np.concatenate([[False], np.asarray(b, bool), [False]])
  d = np.diff(b.astype(int))
  return list(zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]))


def test_system_prompt_and_generation_prompt(tok):
  turns = chat.parse_conversation({'messages': [{'role': 'user', 'content': 'hi'},
                                                {'role': 'assistant', 'content': 'yo'}]})
  ids, mask = chat.render_chat(turns, tok, [], default_system_prompt='You are a helpful assistant',
                               add_generation_prompt=True)
  assert ids[0] == tok.im_system_id
  assert ids[-1] == tok.im_middle_id and ids[-3] == tok.im_assistant_id and mask[-3:].sum() == 0
  ids2, _ = chat.render_chat(turns, tok, [])
  assert ids2[0] == tok.im_user_id
  with pytest.raises(ValueError, match='images'):
    chat.render_chat(turns, tok, [4])


@pytest.mark.parametrize('record,reason', [
    ({'messages': [{'role': 'tool', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]},
     'unknown_role'),
    ({'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': '  '}]},
     'empty_assistant'),
    ({'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': []}]},
     'empty_assistant'),
    ({'messages': [{'role': 'user', 'content': 'x'},
                   {'role': 'assistant', 'content': [{'type': 'image', 'image': 'a.png'}]}]},
     'image_only_assistant'),
    ({'messages': [{'role': 'user', 'content': 'x'}]}, 'no_assistant'),
    ({'msgs': []}, 'bad_schema'),
    ([1, 2], 'bad_schema'),
    ({'messages': [{'role': 'user', 'content': 3}, {'role': 'assistant', 'content': 'y'}]},
     'bad_schema'),
    ({'messages': [{'role': 'user', 'content': [{'type': 'video', 'video': 'v'}]},
                   {'role': 'assistant', 'content': 'y'}]}, 'bad_schema'),
])
def test_bad_conversations_name_their_reason(record, reason):
  with pytest.raises(chat.SkipExample) as e:
    chat.parse_conversation(record)
  assert e.value.reason == reason


def test_caption_and_text_rendering(tok):
  ids, mask = chat.render_caption('A red circle.', tok, 9)
  assert (ids == tok.media_pad_id).sum() == 9 and ids[-1] == tok.eos_id
  assert tok.decode(ids[mask == 1]).strip() == 'A red circle.[EOS]'
  ids, mask = chat.render_text('one two', tok)
  assert mask.all() and ids[-1] == tok.eos_id
  with pytest.raises(chat.SkipExample, match='empty_text'):
    chat.render_text('   ', tok)
