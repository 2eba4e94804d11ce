"""Helpers for the data tests (small images and JSONL files)."""

import json
import os

import numpy as np
from PIL import Image


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


def write_chat_set(root, url=None, n=3):
  """`root/test.jsonl`: n chats (reference answer 'circle', scorer 'exact') naming two images
  beside it under `img/`; with `url` the directory is also uploaded there. Returns the file."""
  from kimi_vl_jax.storage import paths
  root = str(root)
  for k in range(2):
    write_png(os.path.join(root, 'img', f'{k}.png'), seed=k)
  path = write_jsonl(os.path.join(root, 'test.jsonl'),
                     [dict(vqa_record(f'img/{i % 2}.png', f'what shape {i}?', 'circle'),
                           scorer='exact') for i in range(n)])
  if url:
    paths.upload_tree(root, url)
  return path
