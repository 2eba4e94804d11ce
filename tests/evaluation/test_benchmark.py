import json
import os

import pytest

from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.evaluation import benchmark, prompts

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'fixtures', 'eval')
TOK = make_tokenizer()
CFG = prompts.eval_image_config({'max_patches': 16})


def test_fixture_predictions_through_the_runner():
  """The fixtures' `prediction` fields as the generator's output reproduce their `expected`."""
  records = []
  for name in ('mmmu', 'ocrbench', 'mathvista', 'boxed'):
    records += [dict(r, task=name) for r in benchmark.load_records(os.path.join(FIXTURES, f'{name}.jsonl'))]
  seen = []

  def generate(ps):
    seen.extend(ps)
    return [r['prediction'] for r in records]

  metrics, rows = benchmark.evaluate(records, generate, TOK, CFG, root=FIXTURES)
  assert len(seen) == len(records) == metrics['examples']
  assert [row['score'] for row in rows] == [r['expected'] for r in records]
  for name in ('mmmu', 'boxed'):
    exp = [r['expected'] for r in records if r['scorer'] == name]
    assert metrics[f'accuracy/{name}'] == sum(exp) / len(exp)
    assert metrics[f'accuracy/task/{name}'] == metrics[f'accuracy/{name}']
  # the prompt is the chat without the reference: it ends with the generation prompt
  for p in seen:
    ids = p.input_ids.tolist()
    assert ids.count(TOK.special['<|im_assistant|>']) == 1
    assert ids[-1] == TOK.special['<|im_middle|>'] and ids[0] == TOK.special['<|im_user|>']


def test_override_and_errors(tmp_path):
  path = tmp_path / 'b.jsonl'
  rec = {'messages': [{'role': 'user', 'content': 'Say yes.'}, {'role': 'assistant', 'content': 'Yes'}]}
  path.write_text(json.dumps(rec) + '\n' + json.dumps(rec) + '\n')
  records = benchmark.load_records(str(path))
  assert [r['_line'] for r in records] == [1, 2]
  with pytest.raises(ValueError, match='names no scorer'):
    benchmark.evaluate(records, lambda ps: ['yes'] * 2, TOK, CFG, root=str(tmp_path))
  m, _ = benchmark.evaluate(records, lambda ps: ['yes', 'no'], TOK, CFG, root=str(tmp_path),
                            scorer='exact')
  assert m['accuracy'] == 0.5 and m['accuracy/exact'] == 0.5
  assert len(benchmark.load_records(str(path), limit=1)) == 1
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'messages': [{'role': 'assistant', 'content': 'x'},
                                          {'role': 'user', 'content': 'q'}]}) + '\n')
  with pytest.raises(ValueError, match='line 1: the last turn'):
    benchmark.load_records(str(bad))
