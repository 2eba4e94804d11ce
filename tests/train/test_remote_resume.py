"""A whole tiny training run on object storage (moto's S3 server on localhost): it reads its
data from the bucket and writes its checkpoints there, is killed (SIGKILL) part-way, and the
same command on a "new machine" (an empty local cache and staging directory) resumes from the
bucket; its losses equal bitwise those of an uninterrupted run that read the same data from
local files. The S3 server is also down for 2 s while the resumed run trains (checkpoint uploads
retry and catch up)."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from kimi_vl_jax.storage import paths
from kimi_vl_jax.train.metrics import read_metrics

from object_store import wait_until
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'train', 'remote_config.py')
STEPS = 16  # checkpoints every 2 steps


def _write_dataset(d):
  sys.path.insert(0, os.path.join(ROOT, 'tests', 'data'))
  from data_helpers import vqa_record, write_jsonl, write_png
  for k in range(24):
    write_png(os.path.join(d, 'img', f'{k}.png'), (28 + 14 * (k % 3), 28 + 14 * (k % 2)), seed=k)
  write_jsonl(os.path.join(d, 'chat.jsonl'),
              [vqa_record(f'img/{i % 24}.png', f'what is shape {i}?', f'circle {i % 5}')
               for i in range(120)])
  write_jsonl(os.path.join(d, 'captions.jsonl'),
              [{'image': f'img/{k}.png', 'caption': f'a shape number {k}'} for k in range(24)])


def _cmd(workdir, data_root, ckpt_dir=None):
  cmd = [sys.executable, '-m', 'kimi_vl_jax.main', f'--config={CONFIG}:{STEPS},{data_root}',
         f'--workdir={workdir}']
  return cmd + ([f'--config.checkpoint.dir={ckpt_dir}'] if ckpt_dir else [])


def _env(extra, cache_dir, compile_cache):
  env = dict(os.environ)
  env.update(extra)
  env.update({'XLA_FLAGS': xla_flags(1), 'JAX_PLATFORMS': 'cpu',
              'KIMI_VL_JAX_STORAGE_CACHE_DIR': cache_dir,
              'KIMI_VL_JAX_STORAGE_RETRIES': '8', 'KIMI_VL_JAX_STORAGE_BACKOFF_S': '0.2',
              'JAX_COMPILATION_CACHE_DIR': compile_cache,
              'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
              'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'})
  return env


@pytest.mark.slow
def test_s3_run_killed_and_resumed_from_the_bucket_is_bitwise(tmp_path, s3_env):
  server, bucket = s3_env
  local_data = str(tmp_path / 'data')
  _write_dataset(local_data)
  data_url = f's3://{bucket}/data'
  paths.upload_tree(local_data, data_url)
  ckpt = f's3://{bucket}/run/checkpoints'
  s3 = server.env()
  compile_cache = str(tmp_path / 'jax_cache')

  ref_dir = str(tmp_path / 'ref')
  subprocess.run(_cmd(ref_dir, local_data), check=True, cwd=ROOT, capture_output=True,
                 env=_env({}, str(tmp_path / 'cache_ref'), compile_cache))
  ref = read_metrics(ref_dir)
  assert [r['step'] for r in ref] == list(range(1, STEPS + 1))

  run_dir = str(tmp_path / 'run')
  proc = subprocess.Popen(_cmd(run_dir, data_url, ckpt), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL,
                          env=_env(s3, str(tmp_path / 'cache_a'), compile_cache))
  client = server.client()

  def committed():  # steps whose own commit file is up (orbax's items have one each too)
    r = client.list_objects_v2(Bucket=bucket, Prefix='run/checkpoints/')
    keys = [o['Key'].split('/') for o in r.get('Contents', [])]
    return sorted(int(k[2]) for k in keys if len(k) == 4 and k[3] == 'commit_success.txt')

  def ready():  # a step is complete in the bucket and the run trains past it
    done, steps = read_metrics(run_dir), committed()
    return steps and done and done[-1]['step'] > steps[-1]
  try:
    assert wait_until(lambda: ready() or proc.poll() is not None, timeout=1800)
    assert proc.poll() is None, 'the run finished before it could be killed'
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_at = read_metrics(run_dir)[-1]['step']
  resume_from = max(committed())
  assert 1 <= resume_from < STEPS and killed_at < STEPS  # orbax saves step 1 too

  # A new machine: nothing local but the metrics log; the checkpoint comes from the bucket.
  log = str(tmp_path / 'resumed.log')
  with open(log, 'w') as f:
    proc = subprocess.Popen(_cmd(run_dir, data_url, ckpt), cwd=ROOT, stdout=f,
                            stderr=subprocess.STDOUT,
                            env=_env(s3, str(tmp_path / 'cache_b'), compile_cache))
    # The S3 server goes away for 2 s once the resumed run trains again.
    assert wait_until(lambda: len(read_metrics(run_dir)) > killed_at or proc.poll() is not None,
                      timeout=1800)
    server.stop()
    threading.Timer(2.0, server.start).start()
    assert proc.wait(timeout=1800) == 0, open(log).read()[-3000:]
  out = open(log).read()
  assert f'resuming from {ckpt} step {resume_from}' in out
  with open(os.path.join(run_dir, 'summary.json')) as f:
    assert json.load(f)['resumed_from'] == resume_from
  run = read_metrics(run_dir)
  assert [r['step'] for r in run] == list(range(1, STEPS + 1))
  for a, b in zip(ref, run):
    assert a['loss'] == b['loss'], (a['step'], a['loss'], b['loss'])       # bitwise
    assert a['loss_tokens'] == b['loss_tokens'] and a['grad_norm'] == b['grad_norm']
  assert committed()[-1] == STEPS       # the last checkpoint reached the bucket
  assert os.path.isdir(str(tmp_path / 'cache_b' / 'staging'))
