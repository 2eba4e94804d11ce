"""Shared fixtures for the data tests: the tiny tokenizer and small on-disk datasets."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax.data import tokenizer as tok_lib


@pytest.fixture(scope='session')
def tok():
  return tok_lib.SentencePieceTokenizer()


def write_png(path, size=(56, 56), seed=0, mode='RGB'):
  """A small random image file; returns its path."""
  rng = np.random.default_rng(seed)
  w, h = size
  arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  img = Image.fromarray(arr, 'RGB')
  if mode != 'RGB':
    img = img.convert(mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path)
  return path


def write_jsonl(path, records):
  with open(path, 'w') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return path


def vqa_record(img, q, a):
  return {'messages': [
      {'role': 'user', 'content': [{'type': 'image', 'image': img}, {'type': 'text', 'text': q}]},
      {'role': 'assistant', 'content': a}]}


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
