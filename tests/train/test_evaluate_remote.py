"""Eval answer files (and the images they name) read from object storage (moto's S3 server on
localhost) give the prompts of the same file read locally."""

import os

import numpy as np

from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.storage import paths
from kimi_vl_jax.train.evaluate import load_answer_examples
from tests.data.data_helpers import vqa_record, write_jsonl, write_png


def test_answer_file_from_the_bucket_matches_local(s3_env, tmp_path):
  _, bucket = s3_env
  root = tmp_path / 'eval'
  for k in range(3):
    write_png(str(root / 'img' / f'{k}.png'), seed=k)
  write_jsonl(str(root / 'test.jsonl'),
              [vqa_record(f'img/{i % 3}.png', f'what shape {i}?', 'circle') for i in range(5)])
  paths.upload_tree(str(root), f's3://{bucket}/eval')
  tok = tok_lib.SentencePieceTokenizer()
  data_cfg = {'image': {'max_patches': 16}}
  local = load_answer_examples(os.path.join(root, 'test.jsonl'), tok, data_cfg, 10)
  remote = load_answer_examples(f's3://{bucket}/eval/test.jsonl', tok, data_cfg, 10)
  assert len(local) == len(remote) == 5
  for a, b in zip(local, remote):
    assert a['answer'] == b['answer']
    for k in ('ids', 'patches', 'coords', 'grids'):
      np.testing.assert_array_equal(a[k], b[k])
