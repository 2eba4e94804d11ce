"""Bundled demo data: easy-vqa (from its PyPI package) and generated arithmetic word problems.

`python -m kimi_vl_jax.data.build_demo [--cache_dir DIR]` builds, under the cache directory
(default `$KIMI_VL_JAX_CACHE` or `~/.cache/kimi_vl_jax`):

  easy_vqa/{train,test}.jsonl          one question per conversation: user = image + question,
                                       assistant = the one-word answer (38,575 / 9,673 records),
                                       `kind` = 'yes/no' | 'shape' | 'color'
  easy_vqa/train_open.jsonl            the training questions answered by a shape or a color
                                       (10,168), a mixture source that upweights them
  easy_vqa/captions_{train,test}.jsonl image-caption pairs ("A blue circle.") derived from the QA
  easy_vqa/images/{train,test}/N.png   the 64x64 images, copied from the package (not committed)
  arithmetic/{train,test}.jsonl        text-only chats: a word problem and a worked answer ending in
                                       "The answer is N." plus the verifiable `answer` field
  arithmetic/text_{train,test}.jsonl   the same problems as plain `{"text": ...}` documents
  arithmetic/cot_{train,test}.jsonl    the same problems with worked answers of three lengths
                                       (plain, with a plan, with a plan and a check; a third
                                       each; no extra number to get wrong): the tiny long-CoT
                                       SFT data
  video/{train,test}.jsonl             generated videos of a colored shape moving across a 56x56
                                       frame (12-40 frames), one question each: which way it moves,
                                       its shape, its color or how long the video is (`kind` =
                                       'direction' | 'shape' | 'color' | 'duration'); half give
                                       `fps`, half irregular `timestamps` (docs/video.md)
  video/frames/{train,test}/N/K.png    frame K of video N

Everything is deterministic. Configs name these files as `demo:<subdir>/<file>`, built on first use
(`resolve_path`), so nothing derived from the package needs committing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import tempfile

DEMO_VERSION = '7'
ARITH_SIZES = {'train': 20000, 'test': 1000}
ARITH_SEEDS = {'train': 1234, 'test': 98765}


def default_cache_dir() -> str:
  return os.environ.get('KIMI_VL_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'kimi_vl_jax')


def _write_jsonl(path: str, records) -> int:
  n = 0
  with open(path, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
      n += 1
  return n


def _atomic_build(final_dir: str, build_fn) -> str:
  """Builds into a temporary sibling directory and renames it into place (safe under races)."""
  marker = os.path.join(final_dir, 'VERSION')
  if os.path.isfile(marker) and open(marker).read().strip() == DEMO_VERSION:
    return final_dir
  parent = os.path.dirname(final_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final_dir) + '.tmp-', dir=parent)
  try:
    build_fn(tmp)
    with open(os.path.join(tmp, 'VERSION'), 'w') as f:
      f.write(DEMO_VERSION)
    if os.path.isdir(final_dir):
      shutil.rmtree(final_dir, ignore_errors=True)  # an older version
    try:
      os.rename(tmp, final_dir)
    except OSError:
      if not os.path.isfile(marker):  # nobody else finished it either
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return final_dir


# ----------------------------------------------------------------------------------------- easy-vqa

_COLORS = ('red', 'green', 'blue', 'black', 'gray', 'teal', 'brown', 'yellow')
_SHAPES = ('circle', 'rectangle', 'triangle')
_WORD = re.compile(r'[a-z]+')


def _easy_vqa_facts(question: str, answer: str) -> dict[str, str]:
  """What one easy-vqa question and its answer reveal: {'color': c} and / or {'shape': s}.

  Open questions name the shape or color they ask about ("what is the red shape?" -> red +
  answer; "what color is the triangle?" -> triangle + answer). Yes/no questions reveal the
  attribute they name when it is present: a "yes" to a positive question ("is there a blue
  shape?") or a "no" to a negated one ("is there not a circle?", "is no circle present?").
  """
  words = _WORD.findall(question.lower())
  answer = answer.strip().lower()
  named = {attr: w for attr, vocab in (('color', _COLORS), ('shape', _SHAPES))
           for w in words[::-1] if w in vocab}  # the first one named wins
  if answer in ('yes', 'no'):
    negated = 'not' in words or 'no' in words
    return named if (answer == 'yes') != negated else {}
  if answer in _COLORS or answer in _SHAPES:
    named[_answer_kind(answer)] = answer
  return named


def _answer_kind(answer: str) -> str:
  return 'yes/no' if answer in ('yes', 'no') else 'shape' if answer in _SHAPES else 'color'


def _easy_vqa_captions(questions, answers, image_ids) -> dict[int, str]:
  """Image id -> 'A <color> <shape>.' for every image whose questions reveal both."""
  color, shape = {}, {}
  for q, a, i in zip(questions, answers, image_ids):
    facts = _easy_vqa_facts(q, a)
    if 'color' in facts:
      color.setdefault(i, facts['color'])
    if 'shape' in facts:
      shape.setdefault(i, facts['shape'])
  return {i: f'A {color[i]} {shape[i]}.' for i in sorted(color) if i in shape}


def _build_easy_vqa(out: str) -> None:
  import easy_vqa
  splits = {
      'train': (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
      'test': (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
  }
  for split, ((qs, ans, ids), paths) in splits.items():
    img_dir = os.path.join(out, 'images', split)
    os.makedirs(img_dir)
    for i, src in sorted(paths.items()):
      dst = os.path.join(img_dir, f'{i}.png')
      try:
        os.link(src, dst)  # same bytes; a hard link survives uninstalling the package
      except OSError:
        shutil.copyfile(src, dst)
    rel = lambda i: f'images/{split}/{i}.png'  # noqa: E731
    records = [{'messages': [
        {'role': 'user', 'content': [{'type': 'image', 'image': rel(i)},
                                     {'type': 'text', 'text': q}]},
        {'role': 'assistant', 'content': a}], 'answer': a, 'kind': _answer_kind(a)}
        for q, a, i in zip(qs, ans, ids)]
    _write_jsonl(os.path.join(out, f'{split}.jsonl'), records)
    if split == 'train':  # the questions whose answer names a shape or a color
      _write_jsonl(os.path.join(out, 'train_open.jsonl'),
                   (r for r in records if r['kind'] != 'yes/no'))
    caps = _easy_vqa_captions(qs, ans, ids)
    _write_jsonl(os.path.join(out, f'captions_{split}.jsonl'),
                 ({'image': rel(i), 'caption': c} for i, c in caps.items()))


# --------------------------------------------------------------------------------------- arithmetic

_NAMES = ['Ana', 'Ben', 'Chen', 'Dara', 'Eli', 'Fatima', 'Gus', 'Hana', 'Ivan', 'Jade', 'Kofi',
          'Lena', 'Mia', 'Noah', 'Omar', 'Priya', 'Quinn', 'Rosa', 'Sam', 'Tara']
_ITEMS = ['apples', 'books', 'coins', 'pencils', 'stickers', 'marbles', 'cookies', 'stamps',
          'shells', 'cards']


def _arithmetic_parts(rng: random.Random) -> dict:
  """One word problem's parts: question, kind (0 add, 1 subtract, 2 multiply, 3 divide), the
  operands, the result and the names in it."""
  name, other = rng.sample(_NAMES, 2)
  item = rng.choice(_ITEMS)
  kind = rng.randrange(4)
  if kind == 0:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    q = f'{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?'
    r, expr = a + b, f'{a} + {b}'
  elif kind == 1:
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    q = f'{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?'
    r, expr = a - b, f'{a} - {b}'
  elif kind == 2:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = f'There are {a} boxes with {b} {item} in each box. How many {item} are there in total?'
    r, expr = a * b, f'{a} * {b}'
  else:
    b, r = rng.randint(2, 9), rng.randint(2, 12)
    a = b * r
    q = f'{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?'
    expr = f'{a} / {b}'
  return dict(q=q, kind=kind, a=a, b=b, r=r, expr=expr, name=name, other=other, item=item)


def arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
  """One word problem -> (question, worked answer, numeric answer)."""
  p = _arithmetic_parts(rng)
  return p['q'], worked_answer(p, 'short'), p['r']


# What a longer worked answer adds: a plan (which operation, and why) and a check (the same
# equation once more). Neither restates a number of the question, so the longer answers are no
# harder to get right than the plain one: only longer, the overthinking that k1.5's length
# penalty removes.
_PLAN = {
    0: 'We get more, so I add.',
    1: 'Some are given away, so I subtract.',
    2: 'Each box has the same number, so I multiply.',
    3: 'They are shared equally, so I divide.',
}
COT_STYLES = ('short', 'plan', 'reflect')


def worked_answer(p: dict, style: str) -> str:
  """A worked answer of one of three lengths (the long-CoT demo's mixture, `cot_*.jsonl`):
  'short' is the plain answer of `{train,test}.jsonl`; 'plan' says which operation and why
  first; 'reflect' also checks the equation once more. All end in "The answer is N." with the
  same N."""
  if style not in COT_STYLES:
    raise ValueError(f'unknown worked-answer style {style!r}; one of {COT_STYLES}')
  calc, end = f"{p['expr']} = {p['r']}.", f"The answer is {p['r']}."
  if style == 'short':
    return f'{calc} {end}'
  if style == 'plan':
    return f"{_PLAN[p['kind']]} {calc} {end}"
  return f"{_PLAN[p['kind']]} {calc} Let me check: {calc} That is right. {end}"


def _build_arithmetic(out: str) -> None:
  for split, n in ARITH_SIZES.items():
    rng = random.Random(ARITH_SEEDS[split])
    parts = [_arithmetic_parts(rng) for _ in range(n)]
    probs = [(p['q'], worked_answer(p, 'short'), p['r']) for p in parts]
    _write_jsonl(os.path.join(out, f'{split}.jsonl'), (
        {'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}],
         'answer': str(r)} for q, a, r in probs))
    _write_jsonl(os.path.join(out, f'text_{split}.jsonl'),
                 ({'text': f'Question: {q} Answer: {a}'} for q, a, _ in probs))
    # The same problems with worked answers of three lengths, a third each (the tiny long-CoT
    # SFT's data: the model it trains answers at varied lengths, which RL's length penalty
    # then shortens).
    style_rng = random.Random(ARITH_SEEDS[split] + 1)
    _write_jsonl(os.path.join(out, f'cot_{split}.jsonl'), (
        {'messages': [{'role': 'user', 'content': p['q']},
                      {'role': 'assistant',
                       'content': worked_answer(p, style_rng.choice(COT_STYLES))}],
         'answer': str(p['r']), 'kind': ('add', 'subtract', 'multiply', 'divide')[p['kind']]}
        for p in parts))


# -------------------------------------------------------------------------------------------- video

VIDEO_SIZES = {'train': 300, 'test': 60}
VIDEO_SEEDS = {'train': 4321, 'test': 8765}
VIDEO_FRAME = 56            # pixels: 4 x 4 patches, 4 tokens per frame at any image limit >= 16
VIDEO_FRAMES = (12, 40)     # frames per video, inclusive
_DIRECTIONS = {'right': (1, 0), 'left': (-1, 0), 'down': (0, 1), 'up': (0, -1)}
# The shape colours of the generated videos (easy-vqa's colour names).
RGB = {'red': (220, 30, 30), 'green': (30, 160, 50), 'blue': (40, 70, 220), 'black': (0, 0, 0),
        'gray': (128, 128, 128), 'teal': (0, 128, 128), 'brown': (140, 80, 30),
        'yellow': (230, 200, 0)}


def draw_shape(shape: str, color: str, center: tuple[float, float], size: int = VIDEO_FRAME,
               radius: float = 8.0, background=(255, 255, 255)):
  """A `size` x `size` RGB PIL image with one filled shape centred at `center`."""
  from PIL import Image, ImageDraw
  img = Image.new('RGB', (size, size), background)
  d = ImageDraw.Draw(img)
  x, y = center
  r = radius
  if shape == 'circle':
    d.ellipse((x - r, y - r, x + r, y + r), fill=RGB[color])
  elif shape == 'rectangle':
    d.rectangle((x - r, y - 0.7 * r, x + r, y + 0.7 * r), fill=RGB[color])
  elif shape == 'triangle':
    d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=RGB[color])
  else:
    raise ValueError(f'unknown shape {shape!r}')
  return img


def video_timestamps(rng: random.Random, n: int) -> tuple[dict, list[float]]:
  """The timing of a video of n frames: ({'fps': f} or {'timestamps': [...]}, the times)."""
  if rng.random() < 0.5:
    fps = rng.choice([1, 2, 4])
    return {'fps': fps}, [k / fps for k in range(n)]
  t, times = 0.0, []
  for _ in range(n):
    times.append(round(t, 3))
    t += rng.choice([0.25, 0.5, 0.75, 1.0])
  return {'timestamps': times}, times


def moving_shape_video(rng: random.Random, directory: str, rel: str) -> dict:
  """Writes the frames of one moving-shape video under `directory/rel`; returns its record."""
  from kimi_vl_jax.data import video as video_lib
  n = rng.randint(*VIDEO_FRAMES)
  shape, color = rng.choice(_SHAPES), rng.choice(list(RGB))
  direction = rng.choice(list(_DIRECTIONS))
  dx, dy = _DIRECTIONS[direction]
  cross = rng.uniform(16, VIDEO_FRAME - 16)  # where it crosses the frame
  os.makedirs(os.path.join(directory, rel))
  frames = []
  for k in range(n):
    along = 10 + (VIDEO_FRAME - 20) * k / (n - 1)
    if dx < 0 or dy < 0:
      along = VIDEO_FRAME - along
    center = (along, cross) if dx else (cross, along)
    frames.append(f'{rel}/{k}.png')
    draw_shape(shape, color, center).save(os.path.join(directory, frames[-1]))
  timing, times = video_timestamps(rng, n)
  kind = rng.choice(['direction', 'shape', 'color', 'duration'])
  question, answer = {
      'direction': (f'Which way does the {color} {shape} move?', direction),
      'shape': ('What shape moves in the video?', shape),
      'color': (f'What color is the moving {shape}?', color),
      'duration': ('How long is the video?', video_lib.format_timestamp(times[-1])),
  }[kind]
  return {'messages': [
      {'role': 'user', 'content': [{'type': 'video', 'frames': frames, **timing},
                                   {'type': 'text', 'text': question}]},
      {'role': 'assistant', 'content': answer}], 'answer': answer, 'kind': kind}


def _build_video(out: str) -> None:
  for split, n in VIDEO_SIZES.items():
    rng = random.Random(VIDEO_SEEDS[split])
    records = [moving_shape_video(rng, out, f'frames/{split}/{i}') for i in range(n)]
    _write_jsonl(os.path.join(out, f'{split}.jsonl'), records)


BUILDERS = {'easy_vqa': _build_easy_vqa, 'arithmetic': _build_arithmetic, 'video': _build_video}


def ensure_demo(name: str, cache_dir: str | None = None) -> str:
  """Builds demo set `name` (easy_vqa | arithmetic | video) if needed; returns its directory."""
  if name not in BUILDERS:
    raise ValueError(f'unknown demo data set {name!r}; known: {sorted(BUILDERS)}')
  return _atomic_build(os.path.join(cache_dir or default_cache_dir(), name), BUILDERS[name])


def resolve_path(path: str, cache_dir: str | None = None) -> str:
  """`demo:<set>/<file>` -> the built file's absolute path; other paths unchanged."""
  if not path.startswith('demo:'):
    return path
  rel = path[len('demo:'):]
  name = rel.split('/', 1)[0]
  full = os.path.join(ensure_demo(name, cache_dir), *rel.split('/')[1:])
  if not os.path.exists(full):
    raise FileNotFoundError(f'{path!r}: the demo set {name!r} has no {full!r}')
  return full


def demo_sft_data_config(seq_len: int = 256, batch_size: int = 8, *, image_max_patches: int = 9,
                         vqa_weight: float = 0.7, split: str = 'train', num_workers: int = 0):
  """`data` ConfigDict for the tiny SFT demo: easy-vqa chats mixed with arithmetic chats.

  image_max_patches=9 shrinks the 64x64 images to 48x48 -> padded 56x56: 4x4 patches, 4 tokens.
  (With the reference limit of 4096 they stay 64x64 -> padded 84x84: 36 patches, 9 tokens.)
  The row patch budget allows about 0.75 patch per token, above what this mixture uses.
  """
  import ml_collections
  max_patches = max(64, (int(seq_len * 0.75) // 4) * 4)
  return ml_collections.ConfigDict({
      'sources': [
          {'name': 'easy_vqa', 'kind': 'chat', 'path': f'demo:easy_vqa/{split}.jsonl',
           'weight': vqa_weight},
          {'name': 'arithmetic', 'kind': 'chat', 'path': f'demo:arithmetic/{split}.jsonl',
           'weight': 1.0 - vqa_weight},
      ],
      'seq_len': seq_len, 'max_patches': max_patches, 'max_images': max(4, seq_len // 16),
      'batch_size': batch_size, 'num_workers': num_workers,
      'image': {'max_patches': image_max_patches},
  })


def demo_corpus() -> list[str]:
  """The bundled text the tiny SentencePiece model is trained on (no files needed)."""
  import easy_vqa
  lines = []
  for qs, ans, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
    lines.extend(f'{q} {a}' for q, a in zip(qs, ans))  # answers as often as they occur
    lines.extend(_easy_vqa_captions(qs, ans, _).values())
  for split in ('train', 'test'):
    rng = random.Random(ARITH_SEEDS[split])
    for _ in range(ARITH_SIZES[split]):
      q, a, _ = arithmetic_problem(rng)
      lines.append(f'Question: {q} Answer: {a}')
  lines.extend(['system user assistant image', 'You are a helpful assistant.'])
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--cache_dir', default=None)
  args = p.parse_args(argv)
  for name in BUILDERS:
    d = ensure_demo(name, args.cache_dir)
    files = sorted(f for f in os.listdir(d) if f.endswith('.jsonl'))
    print(f'{name}: {d}')
    for f in files:
      with open(os.path.join(d, f)) as fh:
        print(f'  {f}: {sum(1 for _ in fh)} records')


if __name__ == '__main__':
  main()
