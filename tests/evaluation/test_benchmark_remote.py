"""A benchmark file and its images on object storage (moto's S3 server on localhost) give the
records, prompts and scores of the same file read locally."""

import os

import numpy as np

from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.evaluation import benchmark, prompts
from tests.data.data_helpers import write_chat_set


def test_benchmark_file_from_the_bucket_matches_local(s3_env, tmp_path):
  _, bucket = s3_env
  local = write_chat_set(tmp_path / 'set', f's3://{bucket}/set')
  tok = tok_lib.SentencePieceTokenizer()
  cfg = prompts.eval_image_config({'max_patches': 16})
  results = []
  for path in (local, f's3://{bucket}/set/test.jsonl'):
    records = benchmark.load_records(path, limit=2)
    assert [r['_line'] for r in records] == [1, 2]
    seen = []

    def generate(ps):
      seen.extend(ps)
      return ['circle', 'square']
    metrics, _ = benchmark.evaluate(records, generate, tok, cfg, root=benchmark.file_root(path))
    results.append((metrics, seen))
  assert benchmark.file_root(local) == os.path.dirname(local)
  (m_local, p_local), (m_remote, p_remote) = results
  assert m_local == m_remote and m_remote['accuracy'] == 0.5
  for a, b in zip(p_local, p_remote):
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
