"""Every fixture record in tests/fixtures/eval/ scores as its `expected` field says, through the
scorer its `scorer` field names."""

import json
import os

import pytest

from kimi_vl_jax.data import chat
from kimi_vl_jax.evaluation import scorers

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'fixtures', 'eval')


def _records(name):
  with open(os.path.join(FIXTURES, f'{name}.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize('name', ['mmmu', 'ocrbench', 'mathvista', 'boxed'])
def test_fixture_records_score_as_expected(name):
  records = _records(name)
  assert len(records) >= 7
  got = []
  for r in records:
    turns = chat.parse_conversation(r)   # the fixtures are valid chats
    reference = ''.join(v for k, v in turns[-1].parts if k == 'text')
    got.append(scorers.score(r, reference, r['prediction']))
  expected = [r['expected'] for r in records]
  assert got == expected, [(r.get('id'), r['prediction'], g) for r, g in zip(records, got)
                           if g != r['expected']]
  assert 0 < sum(expected) < len(expected)   # each file has hits and misses


def test_scorer_choice_and_errors():
  r = {'scorer': 'exact', 'task': 'boxed'}
  assert scorers.scorer_name(r) == 'exact'
  assert scorers.scorer_name({'task': 'boxed'}) == 'boxed'
  assert scorers.scorer_name(r, 'mmmu') == 'mmmu'
  with pytest.raises(ValueError, match='names no scorer'):
    scorers.scorer_name({})
  with pytest.raises(ValueError, match='unknown scorer'):
    scorers.scorer_name({'scorer': 'bleu'})
  with pytest.raises(ValueError, match="'options'"):
    scorers.score({'scorer': 'mmmu'}, 'A', 'A')
  assert scorers.score({'scorer': 'exact'}, ' Yes', 'yes ') == 1.0
