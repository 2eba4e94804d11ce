"""Shared fixtures for the data tests: the tiny tokenizer and small on-disk datasets."""

import pytest

from kimi_vl_jax.data import tokenizer as tok_lib

from data_helpers import vqa_record, write_jsonl, write_png


@pytest.fixture(scope='session')
def tok():
  return tok_lib.SentencePieceTokenizer()


@pytest.fixture
def small_chat_dataset(tmp_path):
  """A directory with 6 images of various sizes and 40 valid conversations about them."""
  sizes = [(28, 28), (56, 28), (56, 56), (84, 56), (30, 70), (64, 64)]
  for k, s in enumerate(sizes):
    write_png(str(tmp_path / 'img' / f'{k}.png'), s, seed=k)
  recs = []
  for i in range(40):
    if i % 3 == 0:
      recs.append({'messages': [{'role': 'user', 'content': f'What is {i} plus {i}?'},
                                {'role': 'assistant', 'content': f'{i} + {i} = {2 * i}.'}]})
    else:
      recs.append(vqa_record(f'img/{i % 6}.png', f'what is shape {i}?', f'circle {i}'))
  path = write_jsonl(str(tmp_path / 'chat.jsonl'), recs)
  return path, recs
