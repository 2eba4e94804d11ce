"""Trains the tiny SentencePiece tokenizer committed as `assets/tiny_spm.model`.

`python -m kimi_vl_jax.data.train_spm [--vocab_size 1024] [--out PATH]`

Trained on the bundled demo text (`build_demo.demo_corpus()`: easy-vqa questions, answers and
captions, and the generated arithmetic problems), with byte fallback so any UTF-8 text encodes
without `[UNK]`. That text supports only a few hundred learned pieces; the rest of the vocab below
the specials is filled with `<|unused_k|>` pieces of type UNUSED. Every Kimi special token is a user-defined piece;
after training the pieces are reordered so they sit at the top of the vocab in the order of
`tokenizer.SPM_TOP_SPECIALS`, giving `<|media_pad|>` = vocab_size - 1 (1023, the `tiny` preset's
`media_placeholder_token_id`). `[UNK]` is SentencePiece's unknown piece, id 0. Reordering only
changes ids: a unigram model segments by piece scores, not ids.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile

from kimi_vl_jax.data import build_demo
from kimi_vl_jax.data import tokenizer as tok_lib


def train(out_path: str, vocab_size: int = 1024) -> str:
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as model_pb2

  corpus = build_demo.demo_corpus()
  with tempfile.TemporaryDirectory() as tmp:
    text_file = os.path.join(tmp, 'corpus.txt')
    with open(text_file, 'w') as f:
      f.write('\n'.join(corpus) + '\n')
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=text_file, model_writer=buf, vocab_size=vocab_size - len(tok_lib.SPM_TOP_SPECIALS), model_type='unigram',
        character_coverage=1.0, byte_fallback=True, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, unk_piece='[UNK]',
        user_defined_symbols=list(tok_lib.SPM_TOP_SPECIALS), hard_vocab_limit=False,
        max_sentencepiece_length=16, normalization_rule_name='identity', minloglevel=2)
  proto = model_pb2.ModelProto()
  proto.ParseFromString(buf.getvalue())
  specials = {p.piece: p for p in proto.pieces if p.piece in tok_lib.SPM_TOP_SPECIALS}
  others = [p for p in proto.pieces if p.piece not in specials]
  # The demo text is small: SentencePiece stops below the requested size (soft limit). Fill the
  # gap with UNUSED pieces (never produced by encoding) so the specials land at the top.
  n_fill = vocab_size - len(others) - len(specials)
  if n_fill < 0:
    raise ValueError(f'trained {len(others)} pieces, more than vocab_size {vocab_size} allows')
  fill = []
  for k in range(n_fill):
    f = model_pb2.ModelProto.SentencePiece()
    f.piece, f.score, f.type = f'<|unused_{k}|>', 0.0, model_pb2.ModelProto.SentencePiece.UNUSED
    fill.append(f)
  ordered = others + fill + [specials[n] for n in tok_lib.SPM_TOP_SPECIALS]
  copies = []
  for p in ordered:
    c = model_pb2.ModelProto.SentencePiece()
    c.CopyFrom(p)
    copies.append(c)
  del proto.pieces[:]
  proto.pieces.extend(copies)
  # The trainer records its (temporary) input path: fix it so the file is reproducible.
  del proto.trainer_spec.input[:]
  proto.trainer_spec.input.append('build_demo.demo_corpus()')
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, 'wb') as f:
    f.write(proto.SerializeToString())
  # Check the result loads with the ids the tiny preset expects.
  t = tok_lib.SentencePieceTokenizer(out_path)
  assert t.vocab_size == vocab_size, t.vocab_size
  assert t.media_pad_id == vocab_size - 1, t.media_pad_id
  return out_path


def main(argv=None):
  p = argparse.ArgumentParser(description='Train the tiny SentencePiece tokenizer.')
  p.add_argument('--vocab_size', type=int, default=1024)
  p.add_argument('--out', default=tok_lib.TINY_SPM_PATH)
  args = p.parse_args(argv)
  path = train(args.out, args.vocab_size)
  t = tok_lib.SentencePieceTokenizer(path)
  print(f'wrote {path} ({os.path.getsize(path)} bytes), vocab {t.vocab_size}, specials:',
        {k: v for k, v in t.special.items()})


if __name__ == '__main__':
  main()
