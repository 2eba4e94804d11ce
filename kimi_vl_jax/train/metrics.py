"""Observability: analytic FLOPs / MFU, metric writers (JSONL + TensorBoard), loss-curve PNG.

FLOPs are counted analytically from the model config (the PaLM appendix-B convention): a matmul
with a [m, n] weight costs 2mn FLOPs per token forward and twice that backward, so training
costs 3x forward. MoE layers count only the *active* experts (top-k routed + shared) and the
router; attention adds its score and value matmuls over the attended keys (causal: on average
half the sequence for the language model; per image for MoonViT). Embedding lookups are free;
the LM head is a matmul.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.model.config import KimiVLConfig


def lm_matmul_params_per_token(config: KimiVLConfig) -> int:
  """Weights each token multiplies with in the language model (active experts only)."""
  t = config.text
  D, N = t.hidden_size, t.num_heads
  if t.q_lora_rank:
    q = D * t.q_lora_rank + t.q_lora_rank * N * t.qk_head_dim
  else:
    q = D * N * t.qk_head_dim
  kv = D * (t.kv_lora_rank + t.qk_rope_head_dim) + t.kv_lora_rank * N * (
      t.qk_nope_head_dim + t.v_head_dim)
  attn = q + kv + N * t.v_head_dim * D
  dense_mlp = 3 * D * t.intermediate_size
  moe_mlp = (3 * D * t.moe_intermediate_size * (t.num_experts_per_tok + t.n_shared_experts)
             + D * t.n_routed_experts)
  return (t.num_layers * attn + t.num_dense_layers * dense_mlp + t.num_moe_layers * moe_mlp
          + D * t.vocab_size)


def lm_flops_per_token(config: KimiVLConfig, seq_len: int, train: bool = True) -> float:
  """Forward(+backward) FLOPs per text token at context `seq_len` (causal attention)."""
  t = config.text
  attended = seq_len / 2  # causal: on average half the keys
  attn = 2 * t.num_heads * (t.qk_head_dim + t.v_head_dim) * attended * t.num_layers
  fwd = 2 * lm_matmul_params_per_token(config) + attn
  return (3 if train else 1) * fwd


def vision_flops_per_patch(config: KimiVLConfig, patches_per_image: int,
                           train: bool = True) -> float:
  """MoonViT + projector FLOPs per image patch (bidirectional attention within the image)."""
  v = config.vision
  Dv = v.hidden_size
  per_layer = 4 * Dv * Dv + 2 * Dv * v.intermediate_size  # wqkv + wo, fc0 + fc1
  matmul = v.patch_dim * Dv + v.num_layers * per_layer
  proj = (4 * Dv * 4 * Dv + 4 * Dv * config.text.hidden_size) / 4  # per merged token / 4 patches
  attn = 2 * 2 * Dv * patches_per_image * v.num_layers
  fwd = 2 * (matmul + proj) + attn
  return (3 if train else 1) * fwd


def batch_flops(config: KimiVLConfig, batch: dict[str, np.ndarray], train: bool = True) -> float:
  """Analytic FLOPs of one step on `batch` (real tokens and patches only, padding excluded)."""
  seg = np.asarray(batch['segment_ids'])
  seq_len = seg.shape[1]
  tokens = float((seg > 0).sum())
  flops = tokens * lm_flops_per_token(config, seq_len, train)
  if 'patch_image_ids' in batch and np.asarray(batch['patch_image_ids']).size:
    pid = np.asarray(batch['patch_image_ids'])
    n_patches = float((pid > 0).sum())
    hws = np.asarray(batch['image_grid_hws']).reshape(-1, 2)
    sizes = hws.prod(-1)
    sizes = sizes[sizes > 0]
    mean_image = float((sizes ** 2).sum() / max(sizes.sum(), 1)) if sizes.size else 0.0
    flops += n_patches * vision_flops_per_patch(config, int(round(mean_image)), train)
  return flops


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Achieved fp32 matmul FLOP/s of one device (the practical CPU peak for MFU)."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
  f(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


# Peak dense bf16 FLOP/s per chip, for MFU on accelerators.
PEAK_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
              'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12}


def peak_flops_per_device(override: float | None = None) -> tuple[float, str]:
  """(FLOP/s, how it was obtained): the config override, the chip table, or measured on CPU."""
  if override:
    return float(override), 'config'
  kind = jax.devices()[0].device_kind
  for name, v in PEAK_FLOPS.items():
    if kind.startswith(name):
      return v, kind
  return measure_matmul_flops(), f'measured fp32 matmul on {kind}'


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` (one line per step; what the resume test reads)
  and TensorBoard (`workdir/tensorboard`). Only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._f = open(self.path, 'a') if enabled else None
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, Any], kind: str = 'train') -> None:
    if not self.enabled:
      return
    clean = {k: _to_py(v) for k, v in scalars.items()}
    self._f.write(json.dumps({'kind': kind, 'step': int(step), **clean}) + '\n')
    self._f.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(f'{kind}/{k}', v, step)

  def close(self) -> None:
    if self._f:
      self._f.close()
    if self._tb is not None:
      self._tb.close()


class StepLog:
  """The train records of one phase, written one step late.

  `add` takes a step's metrics as the jitted step returned them (device arrays, not yet
  computed); `flush(keep=1)` after the next step is dispatched fetches and writes all but the
  newest, so the host never waits for the step it just queued and prepares the next batch while
  the device computes. Every step gets a record (its device metrics); log steps (every
  `log_every`-th and the phase's last) add throughput, MFU and the data pipeline's statistics
  (taken when the step's batch was read) and update the progress bar.
  """

  def __init__(self, writer: MetricWriter, bar, config: KimiVLConfig, peak_flops_total: float,
               log_every: int, phase: int, counts_fn=None):
    self.writer, self.bar, self.config = writer, bar, config
    # `(host batch) -> (tokens, FLOPs)` of this host's rows; default: the LM batch's.
    self.counts_fn = counts_fn or (lambda b: (float((b['segment_ids'] > 0).sum()),
                                              batch_flops(config, b)))
    self.peak_total, self.log_every, self.phase = peak_flops_total, log_every, phase
    self.pending: list[tuple[int, Any, float, float, dict | None]] = []
    self.last_time, self.tokens, self.flops = time.time(), 0.0, 0.0

  def add(self, step: int, metrics: dict, batch: dict[str, np.ndarray],
          data_stats: dict | None) -> None:
    """`batch`: the step's host batch (this host's rows); `data_stats` None = not a log step."""
    n = jax.process_count()
    tokens, flops = self.counts_fn(batch)
    self.pending.append((step, metrics, tokens * n, flops * n, data_stats))

  def flush(self, keep: int = 0) -> None:
    """Fetches (one `device_get`) and writes every pending record but the newest `keep`."""
    n = len(self.pending) - keep
    if n <= 0:
      return
    todo, self.pending = self.pending[:n], self.pending[n:]
    fetched = jax.device_get([t[1] for t in todo])
    for (step, _, tokens, flops, data_stats), m in zip(todo, fetched):
      self._write(step, m, tokens, flops, data_stats)

  def _write(self, step, m, tokens, flops, data_stats) -> None:
    rec = dict(m)
    self.tokens += tokens
    self.flops += flops
    if data_stats is not None:
      now = time.time()
      dt = max(now - self.last_time, 1e-9)
      rec.update(tokens_per_s=self.tokens / dt, mfu=self.flops / dt / self.peak_total,
                 step_time_s=dt / max(1, self.log_every if step % self.log_every == 0 else 1),
                 phase=self.phase)
      rec.update(data_stats)
      self.last_time, self.tokens, self.flops = now, 0.0, 0.0
      self.bar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                           mfu=f"{rec['mfu']:.2%}", skip=int(m['counters/skipped_steps']),
                           refresh=False)
    self.writer.write(step, rec)
    self.bar.update(1)


class ProfileWindow:
  """`train.profile_steps` = 'START,STOP' (or 'STEP', or a (start, stop) pair): a `jax.profiler`
  trace of steps START..STOP (1-based, as in `metrics.jsonl`) under `directory`
  (`plugins/profile/<run>/<host>.xplane.pb`, what TensorBoard's profile plugin reads)."""

  def __init__(self, spec, directory: str):
    self.directory, self.active, self.done = directory, False, False
    self.start = self.stop = None
    if spec in (None, '', ()):
      return
    try:
      parts = [int(p) for p in (spec.split(',') if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
      parts = []
    if len(parts) not in (1, 2) or not 1 <= parts[0] <= parts[-1]:
      raise ValueError(f'config.train.profile_steps={spec!r}: expected "START,STOP" (or "STEP")'
                       ' with 1 <= START <= STOP')
    self.start, self.stop = parts[0], parts[-1]

  def before(self, step: int) -> None:
    """Called before step `step` (1-based) is dispatched."""
    if self.start is not None and not (self.active or self.done) and (
        self.start <= step <= self.stop):
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Called once step `step` is dispatched; ends the trace after the window's last step."""
    if self.active and step >= self.stop:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active, self.done = False, True


def _to_py(v):
  v = np.asarray(v)
  if v.ndim == 0:
    return v.item()
  return v.tolist()


def read_metrics(workdir: str, kind: str = 'train') -> list[dict]:
  """Records of `metrics.jsonl`; for steps logged more than once (a run resumed from an older
  checkpoint re-runs steps) the last record wins."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a line cut off by a kill
        continue
      if rec.get('kind') == kind:
        by_step[rec['step']] = rec
  return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(workdir: str, path: str | None = None) -> str | None:
  """Writes `workdir/loss_curve.png` (train loss per step, eval loss/accuracy when present)."""
  train = read_metrics(workdir, 'train')
  if not train:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  evals = read_metrics(workdir, 'eval')
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r['step'] for r in train], [r['loss'] for r in train], lw=0.8, label='train loss')
  if evals and any('loss' in r for r in evals):
    ev = [r for r in evals if 'loss' in r]
    ax.plot([r['step'] for r in ev], [r['loss'] for r in ev], 'o-', label='held-out loss')
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.set_yscale('log')
  ax.grid(alpha=0.3)
  if evals and any('answer_accuracy' in r for r in evals):
    ax2 = ax.twinx()
    ev = [r for r in evals if 'answer_accuracy' in r]
    ax2.plot([r['step'] for r in ev], [r['answer_accuracy'] for r in ev], 's--', color='C2',
             label='answer accuracy')
    ax2.set_ylabel('answer accuracy')
    ax2.set_ylim(0, 1)
    ax2.legend(loc='upper right')
  ax.legend(loc='upper left')
  fig.tight_layout()
  path = path or os.path.join(workdir, 'loss_curve.png')
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
