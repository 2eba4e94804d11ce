"""Streaming detokenization (`data/detokenize.py`): the deltas add up to `decode(ids)`, a
multi-byte character is never emitted in pieces, SentencePiece's leading spaces survive."""

import base64

import numpy as np

from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.data.detokenize import REPLACEMENT, IncrementalDetokenizer


def _stream(tok, ids, skip=()):
  d = IncrementalDetokenizer(tok, skip_ids=skip)
  deltas = [d.push(i) for i in ids]
  deltas.append(d.flush())
  return deltas, d


def test_spm_deltas_join_to_decode_and_keep_spaces(tok):
  text = 'Tom has 12 apples, naïve café 你好 ✓ and the shape is red.'
  ids = tok.encode(text)
  deltas, d = _stream(tok, ids)
  assert ''.join(deltas) == d.text == tok.decode(ids) == text
  assert ' apples,' in ''.join(deltas[:ids.index(tok.encode(' apples')[-1]) + 2])
  assert not any(REPLACEMENT in x for x in deltas)


def test_spm_random_ids_join_to_decode(tok):
  """Arbitrary id streams (what an untrained model emits), byte pieces included."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    ids = rng.integers(0, 1012, size=40).tolist()
    deltas, _ = _stream(tok, ids)
    assert ''.join(deltas) == tok.decode(ids)


def test_tiktoken_multibyte_character_waits_for_its_last_byte(tmp_path):
  ranks = [bytes([b]) for b in range(256)] + [b'ab', 'é'.encode()]
  with open(tmp_path / 'tiktoken.model', 'w') as f:
    for r, t in enumerate(ranks):
      f.write(f'{base64.b64encode(t).decode()} {r}\n')
  tok = tok_lib.KimiTokenizer(str(tmp_path))
  euro = list('€'.encode())                        # 3 bytes, 3 byte-level tokens
  ids = [256] + euro + [257] + [ord('x')]
  deltas, _ = _stream(tok, ids)
  assert deltas[:5] == ['ab', '', '', '€', 'é']
  assert ''.join(deltas) == 'ab€éx' == tok.decode(ids)
  # A stream cut inside a character: flush gives what decode gives (U+FFFD).
  deltas, _ = _stream(tok, [256] + euro[:2])
  assert deltas == ['ab', '', '', REPLACEMENT]


def test_skip_ids_are_not_emitted(tok):
  ids = tok.encode('the shape') + [tok.im_end_id]
  deltas, d = _stream(tok, ids, skip=[tok.im_end_id])
  assert d.text == 'the shape' and d.ids == ids[:-1]
