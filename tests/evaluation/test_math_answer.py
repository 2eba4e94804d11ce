import pytest

from kimi_vl_jax.evaluation import math_answer as m


def test_extraction_order():
  kw = dict(question_type='free_form', answer_type='integer')
  assert m.extract('7', **kw) == '7'
  assert m.extract('The answer is "12". Or \\boxed{13}', **kw) == '12'
  assert m.extract('maybe 3, so \\boxed{13}', **kw) == '13'
  assert m.extract('between 3 and 4, finally 5 apples', **kw) == '5'
  assert m.extract('', **kw) == ''
  text = dict(question_type='free_form', answer_type='text')
  assert m.extract('some words', **text) == 'some words'


def test_normalisation():
  mcq = dict(question_type='multi_choice', answer_type='text', choices=['1', '22', '333'])
  assert m.normalise('(C) 333', **mcq) == '333'
  assert m.normalise('C', **mcq) == '333'
  assert m.normalise('23', **mcq) == '22'              # most similar choice
  assert m.normalise('3.7', question_type='free_form', answer_type='integer') == '3'
  assert m.normalise('2/3', question_type='free_form', answer_type='float', precision=3) == '0.667'
  assert m.normalise('none', question_type='free_form', answer_type='float') is None


def test_bad_fields():
  with pytest.raises(ValueError, match='question_type'):
    m.extract('1', question_type='open', answer_type='integer')
  with pytest.raises(ValueError, match='needs its choices'):
    m.extract('1', question_type='multi_choice', answer_type='text')
  with pytest.raises(ValueError, match='is not a integer'):
    m.score('1', 'many', question_type='free_form', answer_type='integer')


def test_levenshtein():
  assert m.levenshtein('kitten', 'sitting') == 3
  assert m.levenshtein('', 'abc') == 3
