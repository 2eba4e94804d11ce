r"""Answer-only verifiers on awkward strings, the thinking block, and loop detection."""

import pytest

from kimi_vl_jax.rl import rewards as R

THINK = '◁think▷ 2 + 2 = 5? no, 4 ◁/think▷'


@pytest.mark.parametrize('response,reference,kind,expected', [
    ('The answer is 1,234.', '1234', 'numeric', 1.0),
    ('about 3.5 cm', '3.5', 'numeric', 1.0),
    (r'so $\frac{1}{2}$', '0.5', 'numeric', 1.0),
    (r'first \boxed{3}, then \boxed{4}', '4', 'numeric', 1.0),     # the last box counts
    (r'first \boxed{3}, then \boxed{4}', '3', 'numeric', 0.0),
    ('12 apples and 13 pears', '12', 'numeric', 0.0),              # the last number is 13
    ('no number here', '7', 'numeric', 0.0),
    (r'\boxed{\dfrac{3}{4}}', '0.75', 'boxed', 1.0),
    (r'\boxed{\frac{3}{4}}', r'\frac34', 'boxed', 1.0),
    ('3/4', '0.75', 'boxed', 0.0),                                 # boxed verifier needs a box
    ('  Paris. ', 'paris', 'exact', 1.0),
    ('Paris, France', 'paris', 'exact', 0.0),
    (THINK + ' 4', '4', 'numeric', 1.0),                           # reasoning is not graded
    (THINK + ' 5', '4', 'numeric', 0.0),
    ('◁think▷ 4 4 4', '4', 'numeric', 0.0),                        # never closed: no answer
])
def test_verify(response, reference, kind, expected):
  assert R.verify(response, reference, kind) == expected


def test_choice_needs_a_parse_not_a_guess():
  opts = ['red', 'green', 'blue']
  assert R.verify('(B)', 'B', 'choice', options=opts) == 1.0
  assert R.verify('I think the answer is C.', 'blue', 'choice', options=opts) == 1.0
  # Nothing parses: evaluation would guess a random letter; a reward must be 0 whatever it is.
  assert all(R.verify('hmm', ref, 'choice', options=opts) == 0.0 for ref in 'ABC')


def test_bad_reference_and_kind():
  with pytest.raises(ValueError, match='not a number'):
    R.verify('1', 'seven', 'numeric')
  with pytest.raises(ValueError, match='unknown verifier'):
    R.verify('1', '1', 'regex')


def test_loop_detection():
  cfg = R.LoopPenaltyConfig(penalty=0.5, min_n=1, max_n=4, min_repeats=4)
  assert R.ends_in_loop([9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], cfg)
  assert R.ends_in_loop([5, 7, 7, 7, 7], cfg)
  assert not R.ends_in_loop([1, 2, 3, 1, 2, 3, 1, 2, 3], cfg)    # only 3 repeats
  assert not R.ends_in_loop([1, 2, 3, 4, 5, 6, 7, 8], cfg)
  with pytest.raises(ValueError):
    R.LoopPenaltyConfig(min_repeats=1)
