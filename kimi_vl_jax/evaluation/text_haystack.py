"""The text haystack: RULER's offline "repeat" haystack and its magic-number needle.

The haystack repeats five sentences ("The grass is green. The sky is blue. ..."), and one
sentence "One of the special magic numbers for {key} is: {value}." is inserted at the requested
depth (a sentence boundary). The question asks for the number; a response is a hit when it
contains the 7-digit value (RULER's string match). Keys are word pairs, values 7-digit numbers,
both drawn from the case's seeded generator.
"""

from __future__ import annotations

import random

from kimi_vl_jax.evaluation import haystacks

FILLER = ('The grass is green.', 'The sky is blue.', 'The sun is yellow.', 'Here we go.',
          'There and back again.')
NEEDLE = 'One of the special magic numbers for {key} is: {value}.'
INTRO = ('Some special magic numbers are hidden within the following text. Make sure to memorize '
         'it. I will quiz you about the numbers afterwards.')
QUESTION = 'What is the special magic number for {key} mentioned in the provided text?'
_ADJECTIVES = ('amused', 'brave', 'calm', 'eager', 'fancy', 'gentle', 'happy', 'jolly', 'kind',
               'lively', 'proud', 'silly', 'witty', 'zealous', 'quiet', 'rapid')
_NOUNS = ('apple', 'bridge', 'candle', 'desert', 'engine', 'forest', 'garden', 'harbor', 'island',
          'jacket', 'kettle', 'lantern', 'meadow', 'needle', 'orchard', 'pebble')


def haystack_text(n_sentences: int, needle: str, depth: float) -> str:
  """`n_sentences` filler sentences with `needle` inserted after round(depth * n) of them."""
  sentences = [FILLER[i % len(FILLER)] for i in range(n_sentences)]
  sentences.insert(round(depth * n_sentences), needle)
  return ' '.join(sentences)


class TextHaystack:
  name = 'text'

  def make(self, length: int, depth: float, rng: random.Random,
           measure: haystacks.Measure) -> haystacks.NeedleCase:
    key = f'{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}'
    value = str(rng.randrange(1_000_000, 10_000_000))
    needle = NEEDLE.format(key=key, value=value)

    def messages(n):
      text = f'{INTRO}\n{haystack_text(n, needle, depth)}\n{QUESTION.format(key=key)}'
      return [{'role': 'user', 'content': text}]

    n = haystacks.largest_fitting(lambda k: measure(messages(k), {}), length,
                                  guess=max(1, length // 6))
    msgs = messages(n)
    return haystacks.NeedleCase(msgs, value, {}, depth, measure(msgs, {}))

  def is_hit(self, case: haystacks.NeedleCase, response: str) -> bool:
    return case.answer in response

