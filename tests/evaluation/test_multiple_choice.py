import pytest

from kimi_vl_jax.evaluation import multiple_choice as mc

OPTS = ['red', 'green', 'blue', 'yellow']


def test_search_order_bracket_before_bare_letter():
  # "(C)" is found in the first pass, so the bare "A " later in the text is never considered.
  assert mc.parse_choice('A guess would be (C)', OPTS) == 'C'
  assert mc.parse_choice('A guess', OPTS) == 'A'


def test_last_match_wins():
  assert mc.parse_choice('(A) or (B)? I say (C), not (B)', OPTS) == 'B'
  assert mc.parse_choice('B or C', OPTS) == 'C'
  assert mc.parse_choice('the sky looks blue and the grass looks green today', OPTS) == 'B'


def test_unparseable_is_a_seeded_random_choice():
  picks = {mc.parse_choice('no idea', OPTS, seed=s) for s in range(40)}
  assert picks == set('ABCD')                       # the seed matters
  assert all(mc.parse_choice('no idea', OPTS, seed=s) == mc.parse_choice('no idea', OPTS, seed=s)
             for s in range(10))                    # and fixes the pick


def test_bad_reference_and_option_count():
  with pytest.raises(ValueError, match='neither a letter'):
    mc.score('A', 'purple', OPTS)
  with pytest.raises(ValueError, match='1..26 options'):
    mc.option_letters(0)
