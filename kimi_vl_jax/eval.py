"""Entry point: evaluate a model by generation with the KV-cache sampler.

    python -m kimi_vl_jax.eval benchmark --hf_dir=Kimi-VL-A3B-Instruct --file=mmmu_val.jsonl
    python -m kimi_vl_jax.eval benchmark --orbax=RUN --config=configs/joint_sft.py:tiny \\
        --file=bench.jsonl --scorer=exact
    python -m kimi_vl_jax.eval niah --hf_dir=Kimi-VL-A3B-Instruct --haystacks=text,image \\
        --out_dir=niah
    python -m kimi_vl_jax.eval niah --orbax=RUN --config=configs/long_context.py:tiny \\
        --first_bucket=128 --out_dir=niah

The model comes from an HF directory (`--hf_dir`, its tokenizer from the same directory unless
`--tokenizer`) or from a training run's newest orbax checkpoint (`--orbax=WORKDIR` with the
stage `--config` that trained it; `--step` picks another checkpoint).

`benchmark` scores a JSONL file of chats whose last turn is the reference answer, each with a
`scorer` / `task` field (or `--scorer` for all): mmmu, ocrbench, mathvista, boxed, exact
(kimi_vl_jax/evaluation/scorers.py). It prints accuracy overall, per scorer and per task, and
writes each prediction to `--out` when given.

`niah` runs the needle-in-a-haystack sweep of the Kimi-VL report's Table 2 (length buckets
(0,2K], (2K,4K], ... up to the model's context, `--depths` needle depths per length) for each of
`--haystacks` (kinds of `evaluation.niah.HAYSTACKS`: text, image, video), prints the recall table and writes it with every
case's result and a depth x length heat map to `--out_dir`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags


def _define_flags() -> None:
  """The command's flags, defined only when this module runs as a program: importing it
  (tests, other entry points) must not claim names such as --config and --hf_dir, which
  `main.py` and `checkpoint/convert.py` define too."""
  global _CONFIG, _HF_DIR, _TOKENIZER, _ORBAX, _STEP, _CONTEXT, _MAX_NEW, _BATCH, _TEMPERATURE, \
      _TOP_P, _TOP_K, _SEED, _FILE, _SCORER, _LIMIT, _OUT, _HAYSTACKS, _FIRST_BUCKET, _PER_BUCKET, \
      _DEPTHS, _IMAGE_SIZE, _OUT_DIR
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'stage config of the --orbax run',
                                            lock_config=True)
  _HF_DIR = flags.DEFINE_string('hf_dir', None, 'HF checkpoint directory')
  _TOKENIZER = flags.DEFINE_string('tokenizer', None, 'tiktoken.model (default: in --hf_dir)')
  _ORBAX = flags.DEFINE_string('orbax', None, 'training run directory (with --config)')
  _STEP = flags.DEFINE_integer('step', None, 'checkpoint step of --orbax (default: newest)')
  _CONTEXT = flags.DEFINE_integer('context', None, 'longest prompt + answer to evaluate '
                                  '(default: the model: HF max_position_embeddings or the stage '
                                  "config's last seq_len)")
  _MAX_NEW = flags.DEFINE_integer('max_new_tokens', None, 'generation budget (default: benchmark '
                                  '64, niah 16)')
  _BATCH = flags.DEFINE_integer('batch_size', 8, 'prompts generated together')
  _TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'sampling temperature (0: greedy)')
  _TOP_P = flags.DEFINE_float('top_p', 1.0, 'nucleus sampling mass (1: off)')
  _TOP_K = flags.DEFINE_integer('top_k', 0, 'top-k sampling (0: off)')
  _SEED = flags.DEFINE_integer('seed', 0, 'sampling and haystack seed')

  _FILE = flags.DEFINE_string('file', None, 'benchmark: JSONL file')
  _SCORER = flags.DEFINE_string('scorer', None, 'benchmark: scorer for every record')
  _LIMIT = flags.DEFINE_integer('limit', None, 'benchmark: the first N records')
  _OUT = flags.DEFINE_string('out', None, 'benchmark: predictions JSONL to write')

  _HAYSTACKS = flags.DEFINE_list('haystacks', ['text', 'image'], 'niah: haystack kinds')
  _FIRST_BUCKET = flags.DEFINE_integer('first_bucket', 2048, 'niah: upper edge of the first length '
                                       'bucket; the next ones double')
  _PER_BUCKET = flags.DEFINE_integer('per_bucket', 1, 'niah: prompt lengths per bucket')
  _DEPTHS = flags.DEFINE_integer('depths', 5, 'niah: needle depths per length, 0..100%')
  _IMAGE_SIZE = flags.DEFINE_integer('image_size', 56,
                                     'niah: side of each haystack image / video frame (px)')
  _OUT_DIR = flags.DEFINE_string('out_dir', None, 'niah: directory for the table, results and PNG')


COMMANDS = ('benchmark', 'niah')


def load_model():
  from kimi_vl_jax.evaluation import model_source
  if bool(_HF_DIR.value) == bool(_ORBAX.value):
    raise app.UsageError('give exactly one of --hf_dir and --orbax')
  if _HF_DIR.value:
    return model_source.from_hf(_HF_DIR.value, _TOKENIZER.value)
  if _CONFIG.value is None:
    raise app.UsageError('--orbax needs the --config that trained the run')
  return model_source.from_orbax(_ORBAX.value, _CONFIG.value, _STEP.value)


def run_benchmark(model, generate, path: str, *, scorer=None, limit=None, out=None) -> dict:
  from kimi_vl_jax.evaluation import benchmark, prompts
  records = benchmark.load_records(path, limit)
  metrics, rows = benchmark.evaluate(records, generate, model.tokenizer,
                                     prompts.eval_image_config(model.image_cfg),
                                     root=benchmark.file_root(path), scorer=scorer,
                                     system_prompt=model.system_prompt)
  if out:
    from kimi_vl_jax.storage import paths as storage_paths
    storage_paths.write_text(out, ''.join(json.dumps(row) + '\n' for row in rows))
  return metrics


def run_niah(model, generate, *, haystack_names, context: int, max_new_tokens: int,
             first_bucket: int, per_bucket: int, n_depths: int, image_size: int, seed: int,
             out_dir: str | None):
  """(results, buckets, table) of the sweep; with `out_dir` also niah_table.md,
  niah_results.jsonl and niah_heatmap.png there."""
  from kimi_vl_jax.evaluation import niah, prompts, recall_table
  image_cfg = prompts.eval_image_config(model.image_cfg)
  measure = prompts.make_measure(model.tokenizer, image_cfg, system_prompt=model.system_prompt)

  def generate_cases(cases):
    return generate([prompts.build_prompt(c.messages, model.tokenizer, image_cfg, images=c.images,
                                          system_prompt=model.system_prompt) for c in cases])

  buckets = niah.length_buckets(context, first_bucket)
  results = []
  for name in haystack_names:
    kwargs = {'image': {'image_size': image_size}, 'video': {'frame_size': image_size}}.get(name, {})
    hs = niah.make_haystack(name, **kwargs)
    results += niah.run(hs, generate_cases, buckets, per_bucket=per_bucket, n_depths=n_depths,
                        measure=measure, seed=seed, max_length=context - max_new_tokens)
  if not results:
    raise ValueError(f'no case fits a context of {context} tokens; lower --first_bucket')
  table = recall_table.format_table(results, buckets)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'niah_table.md'), 'w') as f:
      f.write(f'{model.source}, context {context}\n\n{table}\n')
    with open(os.path.join(out_dir, 'niah_results.jsonl'), 'w') as f:
      for r in results:
        f.write(json.dumps(r.__dict__) + '\n')
    recall_table.write_heatmap(results, os.path.join(out_dir, 'niah_heatmap.png'),
                               title=f'{model.source}, context {context}')
  return results, buckets, table


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: python -m kimi_vl_jax.eval {{{"|".join(COMMANDS)}}} --flags')
  command = argv[1]
  if command == 'benchmark' and not _FILE.value:
    raise app.UsageError('benchmark needs --file')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from kimi_vl_jax.evaluation import generation
  from kimi_vl_jax.sampling import SamplingParams
  if _CONFIG.value is not None and _CONFIG.value.get('jax_matmul_precision'):
    import jax
    jax.config.update('jax_default_matmul_precision', _CONFIG.value.jax_matmul_precision)
  model = load_model()
  max_new = _MAX_NEW.value or (64 if command == 'benchmark' else 16)
  context = _CONTEXT.value or model.context
  sampler = generation.make_sampler(model, max_len=context, batch_size=_BATCH.value)
  params = SamplingParams(max_new_tokens=max_new, temperature=_TEMPERATURE.value,
                          top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)

  def progress(done, total):
    print(f'  generated {done}/{total}', flush=True)

  generate = generation.sampler_generate(sampler, params, _BATCH.value, progress)
  if command == 'benchmark':
    metrics = run_benchmark(model, generate, _FILE.value, scorer=_SCORER.value,
                            limit=_LIMIT.value, out=_OUT.value)
    print(json.dumps(metrics, indent=1, sort_keys=True), flush=True)
  else:
    _, _, table = run_niah(model, generate, haystack_names=_HAYSTACKS.value, context=context,
                           max_new_tokens=max_new, first_bucket=_FIRST_BUCKET.value,
                           per_bucket=_PER_BUCKET.value, n_depths=_DEPTHS.value,
                           image_size=_IMAGE_SIZE.value, seed=_SEED.value, out_dir=_OUT_DIR.value)
    print(f'needle-in-a-haystack recall (%), {model.source}, context {context}:\n{table}',
          flush=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
