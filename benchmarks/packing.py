"""Packing benchmark: efficiency (non-padding token fraction) and throughput of the data pipeline.

  python benchmarks/packing.py [--seq_lens 8192 32768] [--workers 0 2] [--rows 16] [--out FILE]
  python benchmarks/packing.py --remote [--seq_lens 8192] [--workers 0 2]

Two inputs:
  demo:      the tiny SFT demo mixture (easy-vqa chats 0.7 + arithmetic chats 0.3; images at the
             reference 4096-patch limit, so each 64x64 image is 36 patches / 9 tokens);
  longtail:  synthetic text chats whose lengths follow a log-normal law (median ~300 tokens,
             sigma 1.2; any longer than a row would be dropped and counted), 20% with an image.
For each (input, seq_len, workers): rows/s, non-padding tokens/s, packing efficiency = mean over
rows of (tokens in a segment) / seq_len, patch-buffer use, and the dropped-example counts.
The first batch (worker start-up, tokenizer load) is excluded from the timings.

--remote: the demo mixture read from S3 instead of local files. The benchmark starts a local
S3 server (moto's ThreadedMotoServer, in this process), uploads the demo files (easy-vqa train
questions and their 4,000 images, arithmetic train chats) and reads them through the package's
storage layer (`s3://` source paths; images are fetched on first use through the read cache).
For each (seq_len, workers) it prints the local-file figures beside the remote ones with a
cold cache (a fresh cache directory) and a warm one (the same rows again, every object cached).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import json
import logging
import os
import socket
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


DEMO_FILES = {'easy_vqa': 'easy_vqa/train.jsonl', 'arithmetic': 'arithmetic/train.jsonl'}


@contextlib.contextmanager
def s3_demo(bucket: str = 'kimi-vl-bench'):
  """A local S3 server holding the demo mixture's files; yields {source name: s3:// URL}."""
  import boto3
  from moto.server import ThreadedMotoServer
  logging.getLogger('werkzeug').setLevel(logging.ERROR)  # one log line per request otherwise
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  server = ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
  server.start()
  saved = {k: os.environ.get(k) for k in ('AWS_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID',
                                          'AWS_SECRET_ACCESS_KEY', 'AWS_REGION')}
  os.environ.update(AWS_ENDPOINT_URL=f'http://127.0.0.1:{port}', AWS_ACCESS_KEY_ID='bench',
                    AWS_SECRET_ACCESS_KEY='bench', AWS_REGION='us-east-1')
  try:
    client = boto3.client('s3')
    client.create_bucket(Bucket=bucket)
    root = os.path.dirname(build_demo.ensure_demo('easy_vqa'))
    build_demo.ensure_demo('arithmetic')
    files = [os.path.join(root, f) for f in DEMO_FILES.values()]
    files += sorted(glob.glob(os.path.join(root, 'easy_vqa', 'images', 'train', '*.png')))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
      list(ex.map(lambda f: client.upload_file(f, bucket, os.path.relpath(f, root)), files))
    print(f'uploaded {len(files)} demo files to s3://{bucket} at {os.environ["AWS_ENDPOINT_URL"]} '
          f'in {time.perf_counter() - t0:.0f} s', flush=True)
    yield {name: f's3://{bucket}/{rel}' for name, rel in DEMO_FILES.items()}
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@contextlib.contextmanager
def remote_cache(cache_dir: str):
  """The storage layer's read cache in `cache_dir` while the block runs."""
  from kimi_vl_jax import storage
  saved = os.environ.get('KIMI_VL_JAX_STORAGE_CACHE_DIR')
  storage.configure({'cache_dir': cache_dir})
  try:
    yield
  finally:
    if saved is None:
      os.environ.pop('KIMI_VL_JAX_STORAGE_CACHE_DIR', None)
    else:
      os.environ['KIMI_VL_JAX_STORAGE_CACHE_DIR'] = saved


def run(kind, seq_len, workers, rows, tok, longtail_path, remote_paths=None):
  cfg = data_config(kind, seq_len, workers, longtail_path)
  if remote_paths is not None:
    for src in cfg.sources:
      src['path'] = remote_paths[src['name']]
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
      'cache_hit_rate': stats.get('cache_hit_rate'),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seq_lens', type=int, nargs='+', default=[8192, 32768])
  p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  p.add_argument('--inputs', nargs='+', default=['demo', 'longtail'])
  p.add_argument('--rows', type=int, default=16, help='rows timed per configuration')
  p.add_argument('--out', default=None, help='also write the results as JSON here')
  p.add_argument('--remote', action='store_true',
                 help='the demo mixture from a local S3 server: local vs. cold vs. warm cache')
  p.add_argument('--block_bytes', type=int, default=None,
                 help='--remote: the storage layer\'s block size for remote JSONL files '
                      '(config.storage.block_bytes; default its own, 4 MiB)')
  args = p.parse_args(argv)
  tok = pipeline.make_tokenizer(None)
  results = []
  header = (f'{"input":14} {"seq_len":>7} {"workers":>7} {"rows":>5} {"effic.":>8} {"min row":>8} '
            f'{"rows/s":>8} {"tokens/s":>10} {"patches":>8}  dropped')

  def report(label, r):
    r['label'] = label
    results.append(r)
    print(f'{label:14} {r["seq_len"]:7d} {r["workers"]:7d} {r["rows"]:5d} {r["efficiency"]:8.2%} '
          f'{r["min_row_efficiency"]:8.2%} {r["rows_per_s"]:8.2f} {r["tokens_per_s"]:10.0f} '
          f'{r["patch_buffer_use"]:8.1%}  {r["dropped"]}'
          + ('' if r['cache_hit_rate'] is None else f'  cache hits {r["cache_hit_rate"]:.1%}'),
          flush=True)

  with tempfile.TemporaryDirectory() as tmp:
    if args.remote:
      if args.block_bytes:
        from kimi_vl_jax import storage
        storage.configure({'block_bytes': args.block_bytes})
      with s3_demo() as urls:
        print(header)
        for seq_len in args.seq_lens:
          for w in args.workers:
            report('demo local', run('demo', seq_len, w, args.rows, tok, None))
            cache_dir = tempfile.mkdtemp(prefix='cache-', dir=tmp)  # cold: nothing cached yet
            for label in ('demo s3 cold', 'demo s3 warm'):
              with remote_cache(cache_dir):
                report(label, run('demo', seq_len, w, args.rows, tok, None, urls))
    else:
      longtail_path = longtail_dataset(tmp) if 'longtail' in args.inputs else None
      print(header)
      for kind in args.inputs:
        for seq_len in args.seq_lens:
          for w in args.workers:
            report(kind, run(kind, seq_len, w, args.rows, tok, longtail_path))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
