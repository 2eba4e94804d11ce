"""Bundled demo data (easy-vqa conversion, arithmetic problems) and the tiny SentencePiece model."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from kimi_vl_jax.data import build_demo
from kimi_vl_jax.data import pipeline
from kimi_vl_jax.data import tokenizer as tok_lib
from kimi_vl_jax.data import train_spm


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('demo_cache'))
  build_demo.ensure_demo('easy_vqa', d)
  build_demo.ensure_demo('arithmetic', d)
  return d


def _lines(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def test_easy_vqa_conversion(cache):
  d = os.path.join(cache, 'easy_vqa')
  train, test = _lines(os.path.join(d, 'train.jsonl')), _lines(os.path.join(d, 'test.jsonl'))
  assert (len(train), len(test)) == (38575, 9673)
  assert len(os.listdir(os.path.join(d, 'images', 'train'))) == 4000
  assert len(os.listdir(os.path.join(d, 'images', 'test'))) == 1000
  r = train[0]
  user, assistant = r['messages']
  assert user['content'][0]['type'] == 'image' and user['content'][1]['text'].endswith('?')
  assert assistant['content'] == r['answer'] and ' ' not in r['answer']
  assert {r['kind'] for r in test} == {'yes/no', 'shape', 'color'}
  assert all((r['kind'] == 'yes/no') == (r['answer'] in ('yes', 'no')) for r in train)
  assert os.path.isfile(os.path.join(d, user['content'][0]['image']))
  caps = _lines(os.path.join(d, 'captions_train.jsonl'))
  assert len(caps) == 3542
  assert all(re.fullmatch(r'A (red|green|blue|black|gray|teal|brown|yellow) '
                          r'(circle|rectangle|triangle)\.', c['caption']) for c in caps)
  # Built once: a second call reuses it.
  mtime = os.path.getmtime(os.path.join(d, 'train.jsonl'))
  assert build_demo.ensure_demo('easy_vqa', cache) == d
  assert os.path.getmtime(os.path.join(d, 'train.jsonl')) == mtime


def test_easy_vqa_facts_never_contradict_each_other():
  import easy_vqa
  assert build_demo._easy_vqa_facts('is there not a circle?', 'no') == {'shape': 'circle'}
  assert build_demo._easy_vqa_facts('is no blue shape present?', 'yes') == {}
  assert build_demo._easy_vqa_facts('what is the color of the shape?', 'teal') == {'color': 'teal'}
  assert build_demo._easy_vqa_facts('what is the red shape?', 'circle') == {
      'color': 'red', 'shape': 'circle'}
  seen = {}
  for q, a, i in zip(*easy_vqa.get_train_questions()):
    for attr, value in build_demo._easy_vqa_facts(q, a).items():
      assert seen.setdefault((i, attr), value) == value, (i, q, a)


def test_open_easy_vqa_questions(cache):
  d = os.path.join(cache, 'easy_vqa')
  full = _lines(os.path.join(d, 'train.jsonl'))
  assert _lines(os.path.join(d, 'train_open.jsonl')) == [
      r for r in full if r['kind'] != 'yes/no']


def test_arithmetic_is_deterministic_and_verifiable(cache, tmp_path):
  recs = _lines(os.path.join(cache, 'arithmetic', 'train.jsonl'))
  assert len(recs) == 20000
  for r in recs[:500]:
    answer = r['messages'][1]['content']
    expr, result = re.fullmatch(r'(\d+ [-+*/] \d+) = (\d+)\. The answer is \2\.', answer).groups()
    assert eval(expr) == int(result) == int(r['answer'])  # noqa: S307 - our own digits
  again = build_demo.ensure_demo('arithmetic', str(tmp_path))
  with open(os.path.join(again, 'train.jsonl')) as f1, \
      open(os.path.join(cache, 'arithmetic', 'train.jsonl')) as f2:
    assert f1.read() == f2.read()
  test = _lines(os.path.join(cache, 'arithmetic', 'test.jsonl'))
  assert {r['messages'][0]['content'] for r in test[:200]} != {
      r['messages'][0]['content'] for r in recs[:200]}


def test_worked_answers_of_three_lengths(cache):
  """The tiny long-CoT data: the train problems, each with a worked answer of one of three
  lengths whose arithmetic is right and whose final answer is the record's."""
  plain = _lines(os.path.join(cache, 'arithmetic', 'train.jsonl'))
  cot = _lines(os.path.join(cache, 'arithmetic', 'cot_train.jsonl'))
  assert len(cot) == len(plain)
  tok = tok_lib.SentencePieceTokenizer()
  lengths = {s: [] for s in build_demo.COT_STYLES}
  for p, c in zip(plain[:600], cot[:600]):
    assert c['messages'][0] == p['messages'][0] and c['answer'] == p['answer']
    text = c['messages'][1]['content']
    assert text.endswith(f"The answer is {c['answer']}.")
    for lhs, rhs in re.findall(r'(\d+ [-+*/] \d+) = (\d+)', text):
      assert eval(lhs) == int(rhs), text  # noqa: S307 - our own digits
    style = ('reflect' if 'Let me check' in text else 'plan' if ', so ' in text else 'short')
    # No number beyond the plain answer's: the longer answers are only longer.
    assert set(re.findall(r'\d+', text)) == set(re.findall(r'\d+', p['messages'][1]['content']))
    if style == 'short':
      assert text == p['messages'][1]['content']
    lengths[style].append(len(tok.encode(text)))
  assert all(150 < len(v) < 250 for v in lengths.values())          # about a third each
  means = [np.mean(lengths[s]) for s in build_demo.COT_STYLES]
  assert means[0] * 2 < means[1] < means[2] < 100, means
  with pytest.raises(ValueError, match='style'):
    build_demo.worked_answer(dict(kind=0), 'verbose')


def test_demo_mixture_through_the_pipeline(cache):
  tok = tok_lib.SentencePieceTokenizer()
  cfg = build_demo.demo_sft_data_config(seq_len=256, batch_size=4)
  cfg.cache_dir = cache
  it = pipeline.make_iterator(cfg, tok, seed=0)
  b = next(it)
  assert b['input_ids'].shape == (4, 256)
  # 64x64 images at image.max_patches=9: 56x56 after resize and padding -> 4x4 patches.
  grids = b['image_grid_hws'].reshape(-1, 2)
  assert {tuple(g) for g in grids if g[0]} == {(4, 4)}
  assert (b['input_ids'] == tok.media_pad_id).sum() * 4 == (b['patch_image_ids'] > 0).sum()
  assert (b['segment_ids'] > 0).mean() > 0.8
  for _ in range(3):
    next(it)
  s = pipeline.data_stats(it)
  assert s['skip_rate'] == 0 and s['examples/easy_vqa'] > s['examples/arithmetic'] > 0


@pytest.mark.slow
def test_committed_spm_model_is_reproduced_by_the_script(tmp_path):
  out = train_spm.train(str(tmp_path / 'spm.model'))
  with open(out, 'rb') as a, open(tok_lib.TINY_SPM_PATH, 'rb') as b:
    assert a.read() == b.read()


def test_resolve_path(cache):
  p = build_demo.resolve_path('demo:arithmetic/test.jsonl', cache)
  assert os.path.isfile(p) and p.startswith(cache)
  assert build_demo.resolve_path('/x/y.jsonl', cache) == '/x/y.jsonl'
  with pytest.raises(ValueError, match='unknown demo'):
    build_demo.resolve_path('demo:imagenet/train.jsonl', cache)
  with pytest.raises(FileNotFoundError):
    build_demo.resolve_path('demo:arithmetic/nope.jsonl', cache)


def test_video_demo_is_deterministic_and_answerable(tmp_path, monkeypatch):
  from kimi_vl_jax.data import chat
  from kimi_vl_jax.data import video
  monkeypatch.setattr(build_demo, 'VIDEO_SIZES', {'train': 12, 'test': 3})
  d = build_demo.ensure_demo('video', str(tmp_path / 'a'))
  again = build_demo.ensure_demo('video', str(tmp_path / 'b'))
  with open(os.path.join(d, 'train.jsonl')) as f1, open(os.path.join(again, 'train.jsonl')) as f2:
    assert f1.read() == f2.read()
  recs = _lines(os.path.join(d, 'train.jsonl'))
  assert len(recs) == 12 and len(_lines(os.path.join(d, 'test.jsonl'))) == 3
  timings = set()
  for r in recs:
    turns = chat.parse_conversation(r)
    (v,) = chat.videos(turns)
    part = r['messages'][0]['content'][0]
    timings.add('fps' if 'fps' in part else 'timestamps')
    assert build_demo.VIDEO_FRAMES[0] <= len(v) <= build_demo.VIDEO_FRAMES[1]
    assert r['messages'][1]['content'] == r['answer']
    if r['kind'] == 'duration':
      assert r['answer'] == video.format_timestamp(v.timestamps[-1])
    # The shape's centre of mass moves the way the direction answer says.
    first, last = (np.asarray(Image.open(os.path.join(d, v.frames[k]))).min(axis=2) < 250
                   for k in (0, -1))
    start, end = [np.mean(np.nonzero(m), axis=1) for m in (first, last)]  # (row, col)
    dy, dx = end - start
    moved = ('right' if dx > 0 else 'left') if abs(dx) > abs(dy) else ('down' if dy > 0 else 'up')
    if r['kind'] == 'direction':
      assert r['answer'] == moved
  assert timings == {'fps', 'timestamps'}
