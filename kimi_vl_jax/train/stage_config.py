"""Shared building blocks of the stage configs in `configs/` (the fields the loop reads).

A stage config (`configs/<stage>.py: get_config(arg)`) is an `ml_collections.ConfigDict`:

  stage            which stage runs (main.LOOP_STAGES: the LM stages and vit_pretrain; rl)
  model            preset name ('kimi_vl_a3b', 'small', 'tiny', 'demo') or an HF config path
  model_overrides  {'text': {...}, 'vision': {...}, top-level KimiVLConfig fields (dtype, remat)}
  tokenizer        {kind: 'kimi', path} | {kind: 'sentencepiece'} (the bundled tiny model)
  init_from        'scratch' | 'hf:DIR' | 'params:DIR' | 'orbax:WORKDIR' | 'siglip:DIR', then
                   optional ',SUBTREE=orbax:WORKDIR' / ',SUBTREE=hf:DIR' parts (train/init.py)
  data_dir         substituted for `{data_dir}` in data source paths (full-scale configs)
  seed
  data             the data pipeline config (data/pipeline.py; `batch_size` = rows per host)
  phases           [{name, steps, data: {overrides}, model_overrides: {...}}]; steps add up
  optim            optimizer config (optim/muon.py `default_config`: schedule, weight decay,
                   trainable / frozen parameter regexes)
  parallel         mesh + rule preset (parallel/mesh.py `default_config`)
  checkpoint       interval, keep (last N), keep_every (K), async_save, dir (default
                   WORKDIR/checkpoints; may be s3:// or gs://)
  storage          object-storage endpoints, read cache and retries (kimi_vl_jax/storage/paths.py
                   CONFIG_ENV; None = the environment's value or the default)
  train            grad_accum, z_loss_weight, balance_loss_weight, router_bias_rate,
                   loss_chunk_tokens (chunked cross-entropy, tokens per device), log_every,
                   blank_images (ablation: zero every image), tensorboard, peak_flops,
                   profile_steps ('START,STOP': jax.profiler trace of those steps),
                   log_upload_s (remote workdir: seconds between log uploads, besides the
                   upload at every checkpoint save; train/remote_logs.py)
  eval             every, batches, data, answer_file, answer_examples, answer_batch,
                   max_new_tokens (train/evaluate.py)

`arg` picks the variant: '' = the full Kimi-VL-A3B recipe for TPU pods, 'tiny' = a model of a
few hundred K parameters on the bundled demo data that runs on a CPU in minutes.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from kimi_vl_jax.config_dict import as_dict
from kimi_vl_jax.data import sources as sources_lib
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.storage import paths as storage_paths

VARIANTS = ('', 'tiny')

# `configs/` next to the package: one file per stage, `get_config(arg)`.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs')


def load_config_file(path: str, variant: str = '', module_name: str = 'stage_config_file'):
  """`get_config(variant)` of the stage config file at `path` (the caller checks it exists)."""
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)

# Full-scale numbers (Kimi-VL report, arXiv 2504.07491, section 2.3). Rows per host x hosts =
# global batch.
A3B_HOSTS = 64                 # a v5p-256 slice: 128 chips, 64 hosts
A3B_ROWS_PER_HOST = 16         # x 64 hosts = 1024 rows of 8K = 8.4M tokens per step
A3B_GLOBAL_ROWS = A3B_HOSTS * A3B_ROWS_PER_HOST


def check_variant(arg: str, allowed=VARIANTS) -> str:
  arg = (arg or '').strip()
  if arg not in allowed:
    raise ValueError(f'config variant {arg!r}: choose one of {[a or "(full)" for a in allowed]}')
  return arg


def base(stage: str, arg: str) -> ml_collections.ConfigDict:
  """Fields common to every LM stage, for the full model ('') or the tiny CPU variant."""
  tiny = arg == 'tiny'
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.model = 'tiny' if tiny else 'kimi_vl_a3b'
  c.model_overrides = ml_collections.ConfigDict() if tiny else ml_collections.ConfigDict(
      {'dtype': 'bfloat16', 'param_dtype': 'float32', 'remat_policy': 'full',
       # Blockwise attention (model/flash.py): dense [heads, T, S] scores do not fit at 32K+.
       'attention_impl': 'flash'})
  c.tokenizer = ml_collections.ConfigDict(
      {'kind': 'sentencepiece', 'path': None} if tiny else
      {'kind': 'kimi', 'path': ml_collections.config_dict.placeholder(str)})
  c.init_from = 'scratch'
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.seed = 0
  c.jax_matmul_precision = 'highest' if tiny else ''

  c.data = ml_collections.ConfigDict({
      'sources': [],
      'seq_len': 512 if tiny else 8192,
      'max_patches': 256 if tiny else 16384,
      'max_images': 16 if tiny else 64,
      'batch_size': 8 if tiny else A3B_ROWS_PER_HOST,
      'num_workers': 0 if tiny else 8,
      'default_system_prompt': None,
      'image': {'max_patches': 64 if tiny else 4096},
  })
  c.phases = []

  c.optim = ml_collections.ConfigDict({
      'schedule': {'kind': 'constant', 'peak_lr': 1e-3},
      'weight_decay': 0.1,
      'grad_clip_norm': 1.0,
      'trainable': ml_collections.config_dict.placeholder(tuple),
      'frozen': (),
  })
  c.parallel = mesh_lib.default_config()
  if not tiny:
    c.parallel.expert = 8
    c.parallel.rules = 'fsdp_ep'
  c.checkpoint = ml_collections.ConfigDict(
      {'interval': 50 if tiny else 1000, 'keep': 3, 'keep_every': 0 if tiny else 10000,
       'async_save': True, 'dir': ml_collections.config_dict.placeholder(str)})
  c.storage = ml_collections.ConfigDict(
      {k: ml_collections.config_dict.placeholder(str) for k in storage_paths.CONFIG_ENV})
  c.train = ml_collections.ConfigDict({
      'grad_accum': 1,
      'z_loss_weight': 0.0 if tiny else 1e-4,
      'balance_loss_weight': 0.0,
      'router_bias_rate': 1e-3,
      # Chunked cross-entropy (train/losses.py): at most this many tokens per device have fp32
      # logits at once (A3B: 2048 x 163840 x 4 B = 1.3 GB per buffer); 0 = whole-batch logits.
      'loss_chunk_tokens': 512 if tiny else 2048,
      'log_every': 1 if tiny else 10,
      'blank_images': False,
      'tensorboard': True,
      'peak_flops': ml_collections.config_dict.placeholder(float),
      'profile_steps': ml_collections.config_dict.placeholder(str),
      'log_upload_s': 300.0,
  })
  c.eval = ml_collections.ConfigDict({
      'every': 0, 'batches': 2 if tiny else 16, 'data': {},
      'answer_file': '', 'answer_examples': 500, 'answer_batch': 50, 'max_new_tokens': 6,
  })
  return c


def tiny_pretrain_sources() -> list[dict]:
  """Bundled demo data in pre-training form: text documents, image captions, image QA."""
  return [
      source('arith_text', 'text', 'demo:arithmetic/text_train.jsonl', 0.4),
      source('captions', 'caption', 'demo:easy_vqa/captions_train.jsonl', 0.3),
      source('easy_vqa', 'chat', 'demo:easy_vqa/train.jsonl', 0.3),
  ]


def source(name: str, kind: str, path, weight: float = 1.0) -> dict:
  return {'name': name, 'kind': kind, 'path': path, 'weight': weight}


def tokens_to_steps(tokens: float, seq_len: int, global_rows: int) -> int:
  return max(1, int(round(tokens / (seq_len * global_rows))))


def resolve_sources(sources, data_dir) -> list[dict]:
  """Data source specs with `{data_dir}` in their `path` replaced by `data_dir` (copies)."""
  out = []
  for src in sources or []:
    src = dict(src)
    path = src.get('path')
    if isinstance(path, str) and '{data_dir}' in path:
      if not data_dir:
        raise ValueError(f'data source {src.get("name")!r} reads {path!r}: set --config.data_dir '
                         'to the directory holding the training data')
      src['path'] = path.replace('{data_dir}', str(data_dir).rstrip('/'))
    out.append(src)
  return out


def resolve_phases(cfg, *, resolve_paths: bool = True) -> list[dict]:
  """[{name, steps, start, end, data (merged data config), model_overrides}] of a stage.

  resolve_paths: substitute `config.data_dir` into the data source paths (needed to read data;
  not to compile the step, whose shapes only depend on the sizes in `data`). Every data source
  (phases and eval) is checked to be one the pipeline reads (`data.sources.check_sources`), so a
  config naming unreadable data stops at start.
  """
  phases = cfg.get('phases') or [{'steps': cfg.train.steps}]
  out, start = [], 0
  for i, ph in enumerate(phases):
    ph = as_dict(ph)
    unknown = set(ph) - {'name', 'steps', 'data', 'model_overrides'}
    if unknown:
      raise ValueError(f'config.phases[{i}]: unknown keys {sorted(unknown)}')
    steps = int(ph.get('steps', 0))
    if steps < 1:
      raise ValueError(f'config.phases[{i}].steps must be >= 1, got {ph.get("steps")!r}')
    data = as_dict(cfg.data)
    data.update(as_dict(ph.get('data')))
    sources_lib.check_sources(data.get('sources', []), f'config.phases[{i}].data.sources'
                              if 'sources' in as_dict(ph.get('data')) else 'config.data.sources')
    if resolve_paths:
      data['sources'] = resolve_sources(data.get('sources'), cfg.get('data_dir'))
    data = ml_collections.ConfigDict(data)
    out.append({'name': ph.get('name', f'phase{i}'), 'steps': steps, 'start': start,
                'end': start + steps, 'data': data,
                'model_overrides': as_dict(ph.get('model_overrides'))})
    start += steps
  eval_data = as_dict(as_dict(cfg.get('eval')).get('data'))
  sources_lib.check_sources(eval_data.get('sources', []), 'config.eval.data.sources')
  return out
