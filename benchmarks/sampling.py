"""Sampling benchmark: the KV-cache sampler against the full-sequence greedy decoder, and the
decode plan of Kimi-VL-A3B on TPU.

    python benchmarks/sampling.py speed [--models=demo,small] [--batches=1,64] [--new=256]
    python benchmarks/sampling.py plan  [--topologies=v5e-8,v5p-8] [--contexts=32768,131072]

`speed` (this machine): greedy decoding of `--new` tokens after a `--prompt`-token text prompt,
random weights of the preset, fp32. The sampler (`kimi_vl_jax.sampling.Sampler`: one prefill,
then one token per step over the latent cache) and the decoder the trainer's eval used before
(`train/evaluate.make_greedy_decoder`: a full forward over the whole row for every new token) run
alternately, `--repeats` times each, after a warm-up call that compiles them; the best time
counts. Decode tokens/s = rows x (new - 1) / (time(new) - time(1)) for the sampler (prefill
excluded) and rows x steps / time for the old decoder, whose every step is the same full forward
over the whole row (prompt + new tokens): it runs min(new, max(2, `--old_row_tokens` / (rows x
row length))) steps over that row, since its time per step does not depend on the step (the
output says how many).

`plan` (no TPU needed): compiles the decode step of Kimi-VL-A3B (bf16 parameters and cache) for
each TPU topology and context length with libtpu (`kimi_vl_jax/aot_decode.py`) and prints the
cache bytes per token read off the compiled step's cache, memory per device, the largest batch
that fits, and the HBM-bound roofline tokens/s. One compile at a time; each takes minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn, keep: list | None = None) -> float:
  import jax
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  if keep is not None:
    keep[:] = [out]
  return time.perf_counter() - t0


def speed(models, batches, new: int, prompt_len: int, repeats: int, old_row_tokens: int) -> list:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kimi_vl_jax.data.batch import BatchSpec
  from kimi_vl_jax.model.config import get_preset
  from kimi_vl_jax.model.kimi_vl import KimiVL, init_params
  from kimi_vl_jax.sampling import Prompt, Sampler, SamplingParams
  from kimi_vl_jax.train import evaluate

  results = []
  for name in models:
    mc = get_preset(name)
    if jax.default_backend() == 'cpu':   # XLA:CPU runs ragged_dot densely over every expert
      mc = mc.replace(text=dataclasses.replace(mc.text, moe_impl='dropless_blocked'))
    params = nn.meta.unbox(init_params(mc, jax.random.PRNGKey(0)))
    for B in batches:
      rng = np.random.default_rng(B)
      ids = rng.integers(0, min(1000, mc.text.vocab_size - 16), size=(B, prompt_len))
      prompts = [Prompt(input_ids=row) for row in ids]
      cache_len = prompt_len + new
      sampler = Sampler(mc, params, max_len=cache_len, prompt_buckets=(prompt_len,),
                        batch_buckets=(B,))
      sp = {n: SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=())
            for n in (1, new)}
      # The old decoder: rows of prompt + new tokens, one segment each.
      old_steps = min(new, max(2, old_row_tokens // (B * (prompt_len + new))))
      spec = BatchSpec(B, int(np.ceil(cache_len / 16) * 16), 0, 1, mc.vision.patch_dim,
                       targets=False)
      examples = [{'ids': row, 'patches': None, 'coords': None, 'grids': []} for row in ids]
      rows, _ = spec.split(evaluate.prompt_batch(examples, spec))
      rows = {k: jnp.asarray(v) for k, v in rows.items()}
      t0 = time.perf_counter()
      old = jax.jit(evaluate.make_greedy_decoder(KimiVL(mc), old_steps)).lower(
          params, rows).compile()                       # compiled, not run: each run is long
      old_compile_s = time.perf_counter() - t0

      run_new = {n: (lambda n=n: np.concatenate(sampler.generate(prompts, sp[n]).tokens))
                 for n in (1, new)}
      compile_s = {'sampler': _timed(run_new[new]) + _timed(run_new[1]),
                   'old': old_compile_s}
      t_new, t_one, t_old, out_new, out_old = [], [], [], [], []
      for _ in range(repeats):                          # alternated, best of `repeats`
        t_new.append(_timed(run_new[new], out_new))
        t_one.append(_timed(run_new[1]))
        t_old.append(_timed(lambda: old(params, rows), out_old))
      # Both greedy on the same prompts: the first tokens agree (a cross-check, not a timing).
      first_new = out_new[0].reshape(B, new)[:, :old_steps]
      first_old = np.asarray(out_old[0])
      agree = float(np.mean(first_new == first_old))
      dec_s = (min(t_new) - min(t_one)) / (new - 1)    # per decode step, all rows
      old_s = min(t_old) / old_steps
      r = {'model': name, 'batch': B, 'prompt': prompt_len, 'new_tokens': new,
           'sampler_decode_tokens_per_s': B / dec_s, 'sampler_ms_per_step': 1e3 * dec_s,
           'sampler_prefill_s': min(t_one), 'sampler_total_s': min(t_new),
           'old_tokens_per_s': B / old_s, 'old_ms_per_step': 1e3 * old_s,
           'old_steps_timed': old_steps, 'old_row_len': spec.seq_len,
           'speedup': old_s / dec_s, 'greedy_agreement': agree, 'compile_s': compile_s,
           'repeats': repeats}
      results.append(r)
      print(f"{name} batch {B}: sampler {r['sampler_decode_tokens_per_s']:.1f} tokens/s "
            f"({r['sampler_ms_per_step']:.1f} ms/step, prefill {r['sampler_prefill_s']:.2f} s), "
            f"full-sequence decoder {r['old_tokens_per_s']:.1f} tokens/s "
            f"({r['old_ms_per_step']:.1f} ms/step over {old_steps} step(s) of a "
            f"{spec.seq_len}-token row) -> {r['speedup']:.1f}x; greedy tokens agree on "
            f"{agree:.0%} of the first {old_steps}", flush=True)
  return results


def plan(topologies, contexts, batch: int | None, verify: bool) -> list:
  """Per topology: the memory line searched at the first context; longer contexts scale its
  per-row part (`aot_decode.scale_line`) and compile the predicted batch once to check it."""
  from kimi_vl_jax import aot_decode
  from kimi_vl_jax.model.config import get_preset
  mc = get_preset('kimi_vl_a3b')
  out = []
  for topo in topologies:
    line = None
    for ctx in contexts:
      scaled = None if line is None else aot_decode.scale_line(line, ctx / contexts[0])
      text, rep = aot_decode.plan(mc, topo, context=ctx, batch=batch, line=scaled,
                                  verify=verify or scaled is not None)
      print(text, flush=True)
      if line is None and 'memory_line' in rep:
        line = rep['memory_line'][:2]
      out.append(rep)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('mode', choices=['speed', 'plan'])
  ap.add_argument('--models', default='demo,small')
  ap.add_argument('--batches', default='1,64')
  ap.add_argument('--new', type=int, default=256)
  ap.add_argument('--prompt', type=int, default=32)
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--old_row_tokens', type=int, default=16384,
                  help='the old decoder runs min(new, max(2, this / (rows x row length))) steps')
  ap.add_argument('--topologies', default='v5e-8,v5p-8')
  ap.add_argument('--contexts', default='32768,131072')
  ap.add_argument('--batch', type=int, default=None,
                  help='plan: the batch to compile (default: the largest that fits, searched)')
  ap.add_argument('--verify', action='store_true',
                  help='plan: also compile the batch the first context predicts')
  ap.add_argument('--out', default=None, help='write the results as JSON here')
  args = ap.parse_args()
  if args.mode == 'speed':
    import jax
    jax.config.update('jax_default_matmul_precision', 'highest')
    res = speed(args.models.split(','), [int(b) for b in args.batches.split(',')], args.new,
                args.prompt, args.repeats, args.old_row_tokens)
  else:
    res = plan(args.topologies.split(','), [int(c) for c in args.contexts.split(',')],
               args.batch, args.verify)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(res, f, indent=2, default=str)


if __name__ == '__main__':
  main()
