"""Train-step benchmark: tokens/s and MFU of the shared train step, Muon vs AdamW step time.

    python benchmarks/train_step.py [--model=small] [--batch=2] [--seq_len=512] [--steps=5]
                                    [--moe_impl=auto] [--grad_accum=1] [--loss_chunk_tokens=0]
                                    [--ns_dtype=float32] [--rounds=1]

MFU is against the fp32 matmul throughput measured on the same machine in the same run (a jitted
square matmul, best of several), with the analytic FLOPs of `train.metrics` (active experts
only, attention included, 3x forward for training). The optimizer comparison runs the same step
with the Moonlight Muon + AdamW optimizer (`optim.make_optimizer`) and with plain AdamW on every
parameter (router biases frozen in both), and reports the ratio of the step times.

`--grad_accum=K` makes each optimizer step K micro-batches of `--batch` rows (the recipe's regime
of many tokens per optimizer step, where Newton-Schulz is amortised); `--rounds=R` alternates the
Muon and AdamW timings R times (both compiled once), so the machine's noise hits both, and reports
the median ratio. The compiled step's temporary memory (`memory_analysis`) is printed too, e.g.
to compare `--loss_chunk_tokens=0` (whole-batch logits) with chunked cross-entropy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kimi_vl_jax.model.config import get_preset  # noqa: E402
from kimi_vl_jax.model.kimi_vl import KimiVL, init_params  # noqa: E402
from kimi_vl_jax.optim import make_optimizer  # noqa: E402
from kimi_vl_jax.train import metrics as metrics_lib  # noqa: E402
from kimi_vl_jax.train.train_step import (StepOptions, TrainState, make_train_step,  # noqa: E402
                                          new_counters, trainable_tree)


def synthetic_batch(mc, B: int, T: int, grid: int = 8, seed: int = 0) -> dict:
  """Packed rows: one grid x grid-patch image at the start of each row, then text; loss on all
  text tokens."""
  rng = np.random.default_rng(seed)
  P, n_img = grid * grid, grid * grid // 4
  ids = rng.integers(1, mc.text.vocab_size - 1, size=(B, T)).astype(np.int32)
  ids[:, :n_img] = mc.media_placeholder_token_id
  mask = np.ones((B, T), np.float32)
  mask[:, :n_img] = 0
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  coords = np.stack([rows.ravel(), cols.ravel()], -1).astype(np.int32)
  return {'input_ids': ids, 'targets': np.roll(ids, -1, 1), 'loss_mask': mask,
          'segment_ids': np.ones((B, T), np.int32),
          'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
          'patches': rng.normal(size=(B, P, mc.vision.patch_dim)).astype(np.float32),
          'patch_coords': np.broadcast_to(coords, (B, P, 2)).copy(),
          'patch_image_ids': np.ones((B, P), np.int32),
          'image_grid_hws': np.full((B, 1, 2), grid, np.int32)}


class StepTimer:
  """One optimizer's jitted, donated train step, compiled once (first call); `time(steps)` ->
  median step seconds."""

  def __init__(self, mc, tx, boxed, batch, opts: StepOptions):
    # A private copy: the step donates its state, which must not delete the caller's arrays.
    params = jax.tree.map(jnp.copy, nn.meta.unbox(boxed))
    trainable = trainable_tree(params)
    self.step = jax.jit(make_train_step(KimiVL(mc), tx, opts, trainable), donate_argnums=0)
    self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                            counters=new_counters())
    self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = self.step.lower(self.state, self.batch).compile()
    self.temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    self.step = compiled
    self.compile_s = time.perf_counter() - t0   # compiled ahead: the first timed step is warm

  def time(self, steps: int) -> float:
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state, m = self.step(self.state, self.batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    assert np.isfinite(float(m['loss']))
    return float(np.median(times))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--model', default='small')
  ap.add_argument('--batch', type=int, default=2)
  ap.add_argument('--seq_len', type=int, default=512)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--moe_impl', default='auto',
                  help="routed experts; 'auto' = 'dropless_blocked' on CPU (XLA:CPU runs ragged_dot "
                       "densely over every expert), the preset's otherwise")
  ap.add_argument('--grad_accum', type=int, default=1,
                  help='micro-batches of --batch rows per optimizer step')
  ap.add_argument('--loss_chunk_tokens', type=int, default=0,
                  help='chunked cross-entropy: tokens per chunk (0 = whole-batch logits)')
  ap.add_argument('--ns_dtype', default='float32', help="Muon's Newton-Schulz dtype")
  ap.add_argument('--rounds', type=int, default=1,
                  help='alternate the Muon and AdamW timings this many times')
  ap.add_argument('--out', default=None, help='write the results as JSON here')
  args = ap.parse_args()
  jax.config.update('jax_default_matmul_precision', 'highest')

  mc = get_preset(args.model)
  impl = args.moe_impl
  if impl == 'auto':
    impl = 'dropless_blocked' if jax.default_backend() == 'cpu' else mc.text.moe_impl
  mc = dataclasses.replace(mc, text=dataclasses.replace(mc.text, moe_impl=impl))
  batch = synthetic_batch(mc, args.batch * args.grad_accum, args.seq_len)
  peak = metrics_lib.measure_matmul_flops(2048)
  boxed = init_params(mc, jax.random.PRNGKey(0))
  lr = {'kind': 'constant', 'peak_lr': 1e-3}
  muon_tx, _ = make_optimizer({'schedule': lr, 'muon': {'ns_dtype': args.ns_dtype}}, boxed)
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: 'frozen' if 'e_score_correction_bias' in jax.tree_util.keystr(p) else 'adamw',
      nn.meta.unbox(boxed))
  adamw_tx = optax.partition({'adamw': optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1),
                              'frozen': optax.set_to_zero()}, labels)

  results = {'model': args.model, 'moe_impl': impl, 'batch': args.batch, 'seq_len': args.seq_len,
             'grad_accum': args.grad_accum, 'loss_chunk_tokens': args.loss_chunk_tokens,
             'ns_dtype': args.ns_dtype,
             'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
             'matmul_flops_per_s': peak}
  flops = metrics_lib.batch_flops(mc, batch)
  tokens = args.batch * args.grad_accum * args.seq_len
  opts = StepOptions(grad_accum=args.grad_accum, loss_chunk_tokens=args.loss_chunk_tokens)
  timers = {name: StepTimer(mc, tx, boxed, batch, opts)
            for name, tx in (('muon', muon_tx), ('adamw', adamw_tx))}
  times = {name: [] for name in timers}
  for _ in range(args.rounds):   # alternated, so slow phases of a shared machine hit both
    for name, timer in timers.items():
      times[name].append(timer.time(args.steps))
  for name, timer in timers.items():
    step_s = float(np.median(times[name]))
    results[name] = {'compile_s': timer.compile_s, 'step_s': step_s, 'rounds_s': times[name],
                     'tokens_per_s': tokens / step_s, 'temp_bytes': timer.temp_bytes,
                     'mfu': flops / step_s / (peak * jax.device_count())}
  results['step_flops'] = flops
  ratios = [m / a for m, a in zip(times['muon'], times['adamw'])]
  results['muon_over_adamw_step_time'] = float(np.median(ratios))
  print(json.dumps(results, indent=2))
  m = results['muon']
  print(f"{args.model}: {tokens} tokens per optimizer step ({args.grad_accum} x {args.batch} x "
        f"{args.seq_len}): {m['tokens_per_s']:.0f} tokens/s, MFU {m['mfu']:.1%} of the measured "
        f"{peak / 1e9:.0f} GFLOP/s fp32 matmul; step temp memory {m['temp_bytes'] / 2**20:.0f} "
        f"MiB; Muon/AdamW step time {results['muon_over_adamw_step_time']:.2f} (median of "
        f"{args.rounds} alternated rounds)")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
