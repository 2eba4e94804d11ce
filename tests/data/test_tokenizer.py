"""Tokenizers: the tiny SentencePiece model and the Kimi tiktoken loader (`data/tokenizer.py`)."""

import base64
import json
import os
import pickle

import pytest

from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.model import config as model_config


def test_tiny_spm_fits_the_tiny_preset(tok):
  preset = model_config.tiny()
  assert tok.vocab_size == preset.text.vocab_size == 1024
  assert tok.media_pad_id == preset.media_placeholder_token_id == 1023
  # Every Kimi special token is a single piece at the top of the vocab (UNK is piece 0).
  ids = [tok.special[n] for n in tok_lib.SPM_TOP_SPECIALS]
  assert ids == list(range(1024 - len(ids), 1024))
  assert tok.unk_id == 0
  for name in tok_lib.SPM_TOP_SPECIALS:
    assert tok.encode(name)[-1] == tok.special[name]  # after SentencePiece's dummy-prefix piece
  assert os.path.getsize(tok_lib.TINY_SPM_PATH) < 100_000


def test_spm_round_trip_and_byte_fallback(tok):
  for text in ['Tom has 12 apples and gets 3 more.', 'what color is the shape?',
               'naïve café, 你好 ✓']:
    ids = tok.encode(text)
    assert all(0 <= i < 1024 for i in ids)
    assert tok.unk_id not in ids  # byte fallback covers any UTF-8
    assert tok.decode(ids) == text
  t2 = pickle.loads(pickle.dumps(tok))
  assert t2.encode('the shape') == tok.encode('the shape')


def _write_bpe(path, merges):
  ranks = [bytes([b]) for b in range(256)] + [m.encode() for m in merges]
  with open(path, 'w') as f:
    for r, tokb in enumerate(ranks):
      f.write(f'{base64.b64encode(tokb).decode()} {r}\n')
  return {t: r for r, t in enumerate(ranks)}


@pytest.fixture
def kimi_dir(tmp_path):
  merges = ['th', 'the', ' t', ' the', 'in', 'ing', ' th', ' thing', '12', '123', '45', '1234',
            '12345', 'He', 'Hel', 'Hell', 'Hello', 'lo']
  ranks = _write_bpe(str(tmp_path / 'tiktoken.model'), merges)
  return tmp_path, ranks


def test_kimi_tokenizer_special_ids_exact(kimi_dir):
  d, _ = kimi_dir
  t = tok_lib.make_tokenizer({'kind': 'kimi', 'path': str(d)})
  assert t.vocab_size == 163840
  for name, i in tok_lib.KIMI_SPECIAL_TOKENS.items():
    assert t.special[name] == i
  assert (t.bos_id, t.eos_id, t.im_end_id, t.media_pad_id, t.pad_id) == (
      163584, 163585, 163586, 163605, 163839)
  # Special names are plain text to encode(); decode renders special ids by name.
  ids = t.encode('<|im_end|>')
  assert 163586 not in ids and t.decode(ids) == '<|im_end|>'
  assert t.decode([163587] + t.encode('the thing') + [163586]) == '<|im_user|>the thing<|im_end|>'
  assert t.decode([163590]) == '<|reserved_token_163590|>'


def test_kimi_tokenizer_bpe_and_pretokenizer_split(kimi_dir):
  d, ranks = kimi_dir
  t = tok_lib.KimiTokenizer(str(d / 'tiktoken.model'))
  assert t.encode(' the thing') == [ranks[b' the'], ranks[b' thing']]
  # \p{N}{1,3}: "12345" splits into "123" + "45" before BPE, though "12345" is a token.
  assert t.encode('12345') == [ranks[b'123'], ranks[b'45']]
  # Letters and digits are separate pieces; Han runs are their own piece.
  assert t.encode('Hello123') == [ranks[b'Hello'], ranks[b'123']]
  text = 'Hello 你好, the thing 12345!\n'
  assert t.decode(t.encode(text)) == text
  t2 = pickle.loads(pickle.dumps(t))
  assert t2.encode(text) == t.encode(text)


def test_kimi_tokenizer_checks_config_and_file(kimi_dir, tmp_path):
  d, _ = kimi_dir
  with open(d / 'tokenizer_config.json', 'w') as f:
    json.dump({'added_tokens_decoder': {'163586': {'content': '<|im_end|>'},
                                        '163600': {'content': '<|media_pad|>'}}}, f)
  with pytest.raises(ValueError, match='media_pad'):
    tok_lib.KimiTokenizer(str(d))
  with pytest.raises(FileNotFoundError, match='tiktoken'):
    tok_lib.KimiTokenizer(str(tmp_path / 'nowhere'))
  bad = tmp_path / 'bad.model'
  bad.write_text('not base64 at all\n')
  with pytest.raises(ValueError, match='not a tiktoken BPE file'):
    tok_lib.KimiTokenizer(str(bad))
  with pytest.raises(ValueError, match='needs `path`'):
    tok_lib.make_tokenizer({'kind': 'kimi'})
  with pytest.raises(ValueError, match='unknown tokenizer kind'):
    tok_lib.make_tokenizer('bpe2')
