"""Tokenizers behind one small interface.

Two implementations:

* `KimiTokenizer`: the real Kimi tokenizer, a tiktoken BPE (`tiktoken.model`, 163,584 ranks) with
  the pre-tokenizer split `KIMI_PAT` and the special-token table of the released
  `tokenizer_config.json` (ids exact; the other ids 163584..163839 are `<|reserved_token_i|>`),
  loaded from a user-given path.
* `SentencePieceTokenizer`: a small SentencePiece model for the tiny configs. The bundled
  `assets/tiny_spm.model` (vocab 1024, built by `python -m kimi_vl_jax.data.train_spm`) carries every
  Kimi special token as a user-defined piece at the top of the vocab, `<|media_pad|>` = 1023 as in
  the `tiny` model preset.

Both expose `encode(text) -> list[int]` (plain text: special-token names inside it are NOT mapped to
special ids by the tiktoken tokenizer; the SentencePiece one matches its user-defined pieces, see
`SentencePieceTokenizer`), `decode(ids)`, `vocab_size` and the special ids by name
(`tok.special['<|im_end|>']`, or the attributes `im_end_id`, `media_pad_id`, ...). Chat rendering
(`chat.py`) builds sequences from special ids and encoded text spans, which is what the HF
tokenizer does when it splits a rendered template on its special tokens.
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any, Mapping, Sequence

from kimi_vl_jax.storage import files as files_lib
from kimi_vl_jax.storage import paths as paths_lib

# Special tokens of the real Kimi tokenizer (its `tokenizer_config.json`), name -> id.
KIMI_SPECIAL_TOKENS: dict[str, int] = {
    '[BOS]': 163584,
    '[EOS]': 163585,
    '<|im_end|>': 163586,
    '<|im_user|>': 163587,
    '<|im_assistant|>': 163588,
    '<|im_system|>': 163594,
    '<|im_middle|>': 163601,
    '<|media_start|>': 163602,
    '<|media_content|>': 163603,
    '<|media_end|>': 163604,
    '<|media_pad|>': 163605,
    '[UNK]': 163838,
    '[PAD]': 163839,
}
KIMI_NUM_BASE_TOKENS = 163584
KIMI_NUM_SPECIAL = 256
KIMI_VOCAB_SIZE = KIMI_NUM_BASE_TOKENS + KIMI_NUM_SPECIAL  # 163840

# The pre-tokenizer split of the Kimi tokenizer (its `tokenization_moonshot.py`), joined with '|'.
KIMI_PAT = '|'.join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Names every tokenizer must provide (the chat renderer and packer use them).
REQUIRED_SPECIAL = ('[BOS]', '[EOS]', '<|im_end|>', '<|im_user|>', '<|im_assistant|>',
                    '<|im_system|>', '<|im_middle|>', '<|media_start|>', '<|media_content|>',
                    '<|media_end|>', '<|media_pad|>', '[UNK]', '[PAD]')

# Order of the special pieces at the top of the tiny SentencePiece vocab: the last one gets id
# vocab_size - 1, so `<|media_pad|>` = 1023 for vocab 1024. `[UNK]` is SentencePiece's own unknown
# piece at id 0.
SPM_TOP_SPECIALS = ('[PAD]', '[BOS]', '[EOS]', '<|im_end|>', '<|im_user|>', '<|im_assistant|>',
                    '<|im_system|>', '<|im_middle|>', '<|media_start|>', '<|media_content|>',
                    '<|media_end|>', '<|media_pad|>')

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
TINY_SPM_PATH = os.path.join(ASSETS_DIR, 'tiny_spm.model')

_ATTR_NAMES = {
    '[BOS]': 'bos_id', '[EOS]': 'eos_id', '<|im_end|>': 'im_end_id', '<|im_user|>': 'im_user_id',
    '<|im_assistant|>': 'im_assistant_id', '<|im_system|>': 'im_system_id',
    '<|im_middle|>': 'im_middle_id', '<|media_start|>': 'media_start_id',
    '<|media_content|>': 'media_content_id', '<|media_end|>': 'media_end_id',
    '<|media_pad|>': 'media_pad_id', '[UNK]': 'unk_id', '[PAD]': 'pad_id',
}


class Tokenizer(abc.ABC):
  """The interface: `encode`, `decode`, `vocab_size`, `special` (name -> id) and id attributes."""

  vocab_size: int
  special: Mapping[str, int]

  def _set_special(self, special: Mapping[str, int]) -> None:
    missing = [n for n in REQUIRED_SPECIAL if n not in special]
    if missing:
      raise ValueError(f'{type(self).__name__}: special tokens missing: {missing}')
    self.special = dict(special)
    for name, attr in _ATTR_NAMES.items():
      setattr(self, attr, int(special[name]))

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of plain text."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids (special ids decode to their names)."""

  def __getstate__(self):
    # Tokenizers travel to grain worker processes: rebuild the native object there.
    return {'_init_args': self._init_args}

  def __setstate__(self, state):
    self.__init__(**state['_init_args'])


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model whose Kimi special tokens are user-defined pieces.

  User-defined pieces are matched inside raw text too (SentencePiece semantics), so text containing
  the literal string `<|im_end|>` encodes to the special id. Training data for the tiny models is
  generated, so this is harmless there; the real tokenizer does not do this.
  """

  def __init__(self, path: str | None = None):
    import sentencepiece as spm
    path = path or TINY_SPM_PATH
    self._init_args = {'path': path}
    if paths_lib.is_remote(path):  # through the read cache (storage/files.py)
      if not paths_lib.isfile(path):
        raise FileNotFoundError(f'SentencePiece model not found: {path!r}')
      path, _ = files_lib.fetch_file(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'SentencePiece model not found: {path!r}')
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    special = {}
    for name in REQUIRED_SPECIAL:
      if name == '[UNK]':
        special[name] = int(self._sp.unk_id())
        continue
      i = int(self._sp.piece_to_id(name))
      if i == self._sp.unk_id():
        raise ValueError(f'SentencePiece model {path!r} has no piece {name!r}: train it with '
                         f'`python -m kimi_vl_jax.data.train_spm`, which adds every Kimi special token')
      special[name] = i
    self._set_special(special)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def _read_kimi_special_from_config(directory: str) -> dict[str, int] | None:
  """Reads `tokenizer_config.json`'s added_tokens_decoder (id -> {"content": name}) if present."""
  path = os.path.join(directory, 'tokenizer_config.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    cfg = json.load(f)
  decoder = cfg.get('added_tokens_decoder') or {}
  return {v['content']: int(k) for k, v in decoder.items() if isinstance(v, dict) and 'content' in v}


class KimiTokenizer(Tokenizer):
  """The real Kimi tokenizer: tiktoken BPE + `KIMI_PAT` + the special-token table.

  `path` is the `tiktoken.model` file or a directory holding it (and optionally
  `tokenizer_config.json`, whose named special tokens must agree with the table). The 256 special
  ids start at 163584; ids not in the table are `<|reserved_token_{id}|>` as in the reference.
  """

  def __init__(self, path: str):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    self._init_args = {'path': path}
    if paths_lib.is_remote(path):  # a local copy: the directory's files, or the one file
      if paths_lib.isdir(path):
        path = files_lib.fetch_tree(path, 'tokenizer')
      elif paths_lib.isfile(path):
        path, _ = files_lib.fetch_file(path)
    model_file = os.path.join(path, 'tiktoken.model') if os.path.isdir(path) else path
    if not os.path.isfile(model_file):
      raise FileNotFoundError(f'Kimi tokenizer: no tiktoken BPE file at {model_file!r} (give the '
                              f'path of tiktoken.model or of the directory holding it)')
    try:
      ranks = load_tiktoken_bpe(model_file)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
      raise ValueError(f'Kimi tokenizer: {model_file!r} is not a tiktoken BPE file '
                       f'(lines of "<base64 token> <rank>"): {e}') from e
    if not ranks:
      raise ValueError(f'Kimi tokenizer: {model_file!r} holds no BPE ranks')
    max_rank = max(ranks.values())
    if max_rank >= KIMI_NUM_BASE_TOKENS:
      raise ValueError(f'Kimi tokenizer: {model_file!r} has rank {max_rank} >= {KIMI_NUM_BASE_TOKENS}, '
                       f'where the special ids start')
    by_id = {i: f'<|reserved_token_{i}|>' for i in range(KIMI_NUM_BASE_TOKENS, KIMI_VOCAB_SIZE)}
    for name, i in KIMI_SPECIAL_TOKENS.items():
      by_id[i] = name
    if os.path.isdir(path):
      from_cfg = _read_kimi_special_from_config(path)
      if from_cfg:
        for name, i in KIMI_SPECIAL_TOKENS.items():
          if name in from_cfg and from_cfg[name] != i:
            raise ValueError(f'Kimi tokenizer: tokenizer_config.json gives {name} id {from_cfg[name]}, '
                             f'the reference table says {i}')
    special_tokens = {name: i for i, name in by_id.items()}
    self._enc = tiktoken.Encoding(name='kimi', pat_str=KIMI_PAT, mergeable_ranks=ranks,
                                  special_tokens=special_tokens)
    self._id_to_special = by_id
    self.vocab_size = KIMI_VOCAB_SIZE
    self._set_special(KIMI_SPECIAL_TOKENS)

  def encode(self, text: str) -> list[int]:
    # Plain text: special-token names are ordinary text here (no injection through user content).
    return self._enc.encode_ordinary(text)

  def decode(self, ids: Sequence[int]) -> str:
    out, run = [], []
    for i in ids:
      i = int(i)
      if i in self._id_to_special:
        if run:
          out.append(self._enc.decode(run))
          run = []
        out.append(self._id_to_special[i])
      else:
        run.append(i)
    if run:
      out.append(self._enc.decode(run))
    return ''.join(out)


def make_tokenizer(cfg: Any = None) -> Tokenizer:
  """Builds a tokenizer from a config (ConfigDict / dict with `kind` and `path`) or a kind string.

  kind 'sentencepiece' (alias 'spm', 'tiny'): `path` optional, defaults to the bundled tiny model.
  kind 'kimi' (alias 'tiktoken'): `path` required (tiktoken.model or its directory).
  Paths may be local, `s3://` or `gs://` (kimi_vl_jax/storage).
  """
  if cfg is None:
    kind, path = 'sentencepiece', None
  elif isinstance(cfg, str):
    kind, path = cfg, None
  else:
    get = cfg.get if hasattr(cfg, 'get') else (lambda k, d=None: getattr(cfg, k, d))
    kind, path = get('kind', 'sentencepiece'), get('path', None)
  kind = str(kind).lower()
  if kind in ('sentencepiece', 'spm', 'tiny'):
    return SentencePieceTokenizer(path)
  if kind in ('kimi', 'tiktoken'):
    if not path:
      raise ValueError("tokenizer kind 'kimi' needs `path` (the tiktoken.model file or its directory)")
    return KimiTokenizer(path)
  raise ValueError(f"unknown tokenizer kind {kind!r}: use 'sentencepiece' or 'kimi'")
