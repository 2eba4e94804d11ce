"""The eval entry point's runners with a stand-in generator (the sampler itself is tested in
tests/sampling; `tests/evaluation/test_generation.py` runs the whole path on a tiny model)."""

import json
import os
import re

from kimi_vl_jax import eval as eval_main
from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data.tokenizer import make_tokenizer
from kimi_vl_jax.evaluation import model_source
from kimi_vl_jax.model import get_preset

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'eval')
MODEL = model_source.Model(get_preset('tiny'), None, make_tokenizer(),
                           images_lib.ImageConfig(max_patches=16), 512, source='stand-in')


def _reader(p):
  """Reads the needle back out of a text-haystack prompt."""
  text = MODEL.tokenizer.decode(p.input_ids.tolist())
  key = re.search(r'magic number for (\S+) mentioned', text).group(1)
  return re.search(rf'numbers for {re.escape(key)} is: (\d+)', text).group(1)


def test_niah_writes_table_results_and_heatmap(tmp_path):
  def generate(ps):
    return [_reader(p) if p.pixel_values is None else 'red' for p in ps]

  results, buckets, table = eval_main.run_niah(
      MODEL, generate, haystack_names=['text', 'image'], context=512, max_new_tokens=16,
      first_bucket=128, per_bucket=1, n_depths=3, image_size=28, seed=0, out_dir=str(tmp_path))
  assert buckets == [(0, 128), (128, 256), (256, 512)]
  lines = table.splitlines()
  assert lines[0] == '| Haystack | (0,128] | (128,256] | (256,512] |'
  text_row = lines[2].split(' | ')
  assert text_row[0] == '| text' and text_row[1] == '-'            # too short for the needle
  assert text_row[2:] == ['100.0 (3)', '100.0 (3) |']
  image = [r for r in results if r.haystack == 'image']
  assert len(image) == 9 and 0 < sum(r.hit for r in image) < 9      # 'red' is right sometimes
  assert max(r.length for r in results) <= 512 - 16
  assert (tmp_path / 'niah_heatmap.png').stat().st_size > 1000
  rows = [json.loads(l) for l in (tmp_path / 'niah_results.jsonl').read_text().splitlines()]
  assert len(rows) == len(results) and {'depth', 'hit', 'length'} <= set(rows[0])
  assert table in (tmp_path / 'niah_table.md').read_text()


def test_niah_video_haystack():
  prompts = []

  def generate(ps):
    prompts.extend(ps)
    return ['red'] * len(ps)

  results, _, _ = eval_main.run_niah(
      MODEL, generate, haystack_names=['video'], context=512, max_new_tokens=16,
      first_bucket=256, per_bucket=1, n_depths=2, image_size=28, seed=0, out_dir=None)
  assert [r.haystack for r in results] == ['video'] * 4 and len(prompts) == 4
  for p, r in zip(prompts, results):
    frames = len(p.image_grid_hws)
    text = MODEL.tokenizer.decode(p.input_ids.tolist()).replace(' ', '')
    stamped = re.findall(r'\d\d:\d\d:\d\d\.\d\d\d<\|media_start\|>', text)  # every frame
    assert frames > 4 and text.count('<|media_start|>') == len(stamped) == frames
    assert len(p.input_ids) == r.length <= 512 - 16
  assert all(r.hit == (r.answer == 'red') for r in results)


def test_benchmark_runner(tmp_path):
  path = os.path.join(FIXTURES, 'boxed.jsonl')
  records = [json.loads(l) for l in open(path)]
  out = tmp_path / 'pred.jsonl'
  metrics = eval_main.run_benchmark(MODEL, lambda ps: [r['prediction'] for r in records], path,
                                    out=str(out))
  expected = sum(r['expected'] for r in records) / len(records)
  assert metrics['accuracy'] == metrics['accuracy/boxed'] == expected
  assert [json.loads(l)['score'] for l in out.read_text().splitlines()] == [
      r['expected'] for r in records]
