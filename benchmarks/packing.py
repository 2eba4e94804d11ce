"""Packing benchmark: efficiency (non-padding token fraction) and throughput of the data pipeline.

  python benchmarks/packing.py [--seq_lens 8192 32768] [--workers 0 2] [--rows 16] [--out FILE]

Two inputs:
  demo:      the tiny SFT demo mixture (easy-vqa chats 0.7 + arithmetic chats 0.3; images at the
             reference 4096-patch limit, so each 64x64 image is 36 patches / 9 tokens);
  longtail:  synthetic text chats whose lengths follow a log-normal law (median ~300 tokens,
             sigma 1.2; any longer than a row would be dropped and counted), 20% with an image.
For each (input, seq_len, workers): rows/s, non-padding tokens/s, packing efficiency = mean over
rows of (tokens in a segment) / seq_len, patch-buffer use, and the dropped-example counts.
The first batch (worker start-up, tokenizer load) is excluded from the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from kimi_vl_jax.data import build_demo  # noqa: E402
from kimi_vl_jax.data import pipeline  # noqa: E402


def longtail_dataset(directory: str, n: int = 4000, seed: int = 0) -> str:
  """Writes the long-tailed synthetic chat set (and its images); returns the JSONL path."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(directory, 'img'), exist_ok=True)
  for k in range(8):
    arr = rng.integers(0, 256, (int(rng.integers(28, 200)), int(rng.integers(28, 200)), 3), np.uint8)
    Image.fromarray(arr).save(os.path.join(directory, 'img', f'{k}.png'))
  words = ['alpha', 'beta', 'gamma', 'delta', 'the', 'shape', 'color', 'answer', 'box', 'red']
  path = os.path.join(directory, 'longtail.jsonl')
  with open(path, 'w') as f:
    for i in range(n):
      n_words = int(np.clip(rng.lognormal(np.log(120), 1.2), 4, 60000))
      n_q = max(1, n_words // 5)
      q = ' '.join(rng.choice(words, n_q))
      a = ' '.join(rng.choice(words, n_words - n_q))
      user = q if rng.random() > 0.2 else [{'type': 'image', 'image': f'img/{i % 8}.png'},
                                          {'type': 'text', 'text': q}]
      f.write(json.dumps({'messages': [{'role': 'user', 'content': user},
                                       {'role': 'assistant', 'content': a}]}) + '\n')
  return path


def data_config(kind: str, seq_len: int, workers: int, longtail_path: str | None):
  if kind == 'demo':
    cfg = build_demo.demo_sft_data_config(seq_len=seq_len, batch_size=2, image_max_patches=4096,
                                          num_workers=workers)
  else:
    cfg = build_demo.demo_sft_data_config(seq_len=seq_len, batch_size=2, image_max_patches=4096,
                                          num_workers=workers)
    cfg.sources = [{'name': 'longtail', 'kind': 'chat', 'path': longtail_path, 'weight': 1.0}]
    cfg.max_patches = max(4096, (seq_len // 16) * 4)
  cfg.packing = {'algorithm': 'first_fit', 'num_bins': 8, 'shuffle_bins': True}
  cfg.max_skip_rate = 1.0
  return cfg


def run(kind, seq_len, workers, rows, tok, longtail_path):
  cfg = data_config(kind, seq_len, workers, longtail_path)
  it = pipeline.make_iterator(cfg, tok, seed=0)
  next(it)  # warm-up: worker start-up, first packed batch
  t0 = time.perf_counter()
  n_rows, n_tok, n_patch, eff = 0, 0, 0, []
  while n_rows < rows:
    b = next(it)
    valid = b['segment_ids'] > 0
    n_rows += valid.shape[0]
    n_tok += int(valid.sum())
    n_patch += int((b['patch_image_ids'] > 0).sum())
    eff.extend(valid.mean(axis=1).tolist())
  dt = time.perf_counter() - t0
  stats = pipeline.data_stats(it)
  dropped = {k.split('/')[-1]: v for k, v in stats.items()
             if k.startswith('skipped/') and k.count('/') == 2}
  return {
      'input': kind, 'seq_len': seq_len, 'workers': workers, 'rows': n_rows,
      'efficiency': float(np.mean(eff)), 'min_row_efficiency': float(np.min(eff)),
      'rows_per_s': n_rows / dt, 'tokens_per_s': n_tok / dt,
      'patch_buffer_use': n_patch / (n_rows * cfg.max_patches),
      'max_patches': cfg.max_patches, 'dropped': dropped,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seq_lens', type=int, nargs='+', default=[8192, 32768])
  p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  p.add_argument('--inputs', nargs='+', default=['demo', 'longtail'])
  p.add_argument('--rows', type=int, default=16, help='rows timed per configuration')
  p.add_argument('--out', default=None, help='also write the results as JSON here')
  args = p.parse_args(argv)
  tok = pipeline.make_tokenizer(None)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    longtail_path = longtail_dataset(tmp) if 'longtail' in args.inputs else None
    print(f'{"input":9} {"seq_len":>7} {"workers":>7} {"rows":>5} {"effic.":>8} {"min row":>8} '
          f'{"rows/s":>8} {"tokens/s":>10} {"patches":>8}  dropped')
    for kind in args.inputs:
      for seq_len in args.seq_lens:
        for w in args.workers:
          r = run(kind, seq_len, w, args.rows, tok, longtail_path)
          results.append(r)
          print(f'{kind:9} {seq_len:7d} {w:7d} {r["rows"]:5d} {r["efficiency"]:8.2%} '
                f'{r["min_row_efficiency"]:8.2%} {r["rows_per_s"]:8.2f} {r["tokens_per_s"]:10.0f} '
                f'{r["patch_buffer_use"]:8.1%}  {r["dropped"]}', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
