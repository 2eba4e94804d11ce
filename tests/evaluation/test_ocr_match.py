import pytest

from kimi_vl_jax.evaluation import ocr_match


def test_normalised_substring():
  assert ocr_match.score('  Hello\nWorld!  ', 'hello world') == 1.0
  assert ocr_match.score('hello', 'hello world') == 0.0     # the reference must be inside
  assert ocr_match.score('x ^ 2', 'x^2') == 0.0
  assert ocr_match.score('x ^ 2', 'x^2', drop_spaces=True) == 1.0
  with pytest.raises(ValueError, match='at least one'):
    ocr_match.score('a', [])
