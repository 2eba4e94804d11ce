"""An RL prompt set and its images on object storage (moto's S3 server on localhost) give the
prompts of the same file read locally; a bad record there stops the load with its line."""

import json

import numpy as np
import pytest

from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.rl import rollouts
from kimi_vl_jax.storage import paths
from tests.data.data_helpers import vqa_record, write_chat_set


def test_prompt_set_from_the_bucket_matches_local(s3_env, tmp_path):
  _, bucket = s3_env
  url = f's3://{bucket}/set'
  local = write_chat_set(tmp_path / 'set', url)
  tok = tok_lib.SentencePieceTokenizer()
  a = rollouts.load_prompts(local, tok, verifier='exact')
  b = rollouts.load_prompts(f'{url}/test.jsonl', tok, verifier='exact')
  assert len(a) == len(b) == 3 and [p.answer for p in b] == ['circle'] * 3
  for x, y in zip(a, b):
    assert x.prompt.pixel_values is not None and len(x.prompt.pixel_values)
    np.testing.assert_array_equal(x.prompt.input_ids, y.prompt.input_ids)
    np.testing.assert_array_equal(x.prompt.pixel_values, y.prompt.pixel_values)
    np.testing.assert_array_equal(x.prompt.image_grid_hws, y.prompt.image_grid_hws)
  # An image path leaving the set's prefix, a record without an answer: errors with the line.
  paths.write_text(f'{url}/escape.jsonl', json.dumps(vqa_record('../x.png', 'q', 'a')) + '\n')
  with pytest.raises(ValueError, match='prompt set .*escape.jsonl line 1: path_escape'):
    rollouts.load_prompts(f'{url}/escape.jsonl', tok, verifier='exact')
  paths.write_text(f'{url}/no_answer.jsonl', '{"messages": [{"role": "user", "content": "q"}]}\n'
                   * 2 + '{"messages": []}\n')
  with pytest.raises(ValueError, match='no_answer.jsonl line 1: a prompt record needs'):
    rollouts.load_prompts(f'{url}/no_answer.jsonl', tok, verifier='exact')
