"""What an RL run reports at the end: the change of its held-out figures from the first
evaluation to the last with paired bootstrap intervals, and a PNG of rollout and held-out reward,
response length, KL and entropy per iteration and the prioritized-sampling weights of the prompt
set (`metrics.jsonl` holds every figure)."""

from __future__ import annotations

import json
import os

import numpy as np

from kimi_vl_jax.rl.prompt_selection import PromptStats
from kimi_vl_jax.train.metrics import read_metrics


def plot_run(workdir: str, stats: PromptStats) -> str | None:
  rl = read_metrics(workdir, kind='rl')
  ev = read_metrics(workdir, kind='eval')
  if not rl:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  def series(rows, key):
    pts = [(r['step'], r[key]) for r in rows if key in r and r[key] is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

  fig, ax = plt.subplots(2, 3, figsize=(14, 7))
  a = ax[0, 0]
  a.plot(*series(rl, 'reward/answer_mean'), label='rollouts (sampled)')
  a.plot(*series(ev, 'heldout/mean_reward'), 'o-', label='held-out (sampled)')
  a.plot(*series(ev, 'heldout/greedy_accuracy'), 's-', label='held-out (greedy)')
  a.set_title('answer reward')
  a.set_xlabel('iteration')
  a.legend()
  a = ax[0, 1]
  a.plot(*series(rl, 'length/mean'), label='mean')
  a.plot(*series(rl, 'length/p90'), label='p90')
  a.set_title('response length (tokens)')
  a.legend()
  a = ax[0, 2]
  a.plot(*series(rl, 'kl/to_pi_i'), label='KL(pi_i || pi_i+1)')
  a.plot(*series(rl, 'kl/pi_i_to_start'), label='KL(pi_i || pi_start)')
  a.set_title('KL per token')
  a.legend()
  a = ax[1, 0]
  a.plot(*series(rl, 'entropy'))
  a.set_title('token entropy of pi_i')
  a = ax[1, 1]
  a.plot(*series(rl, 'time/rollout_s'), label='rollout')
  a.plot(*series(rl, 'time/train_s'), label='train')
  a.set_title('seconds per iteration')
  a.legend()
  a = ax[1, 2]
  w = np.maximum(1.0 - stats.success_rate(), 0.0)[~stats.dropped]
  a.hist(w, bins=20)
  a.set_title('prioritized-sampling weights (1 - success rate)')
  fig.tight_layout()
  path = os.path.join(workdir, 'rl.png')
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def heldout_change(workdir: str, resamples: int = 10_000, seed: int = 0) -> dict | None:
  """First vs last held-out evaluation in `heldout.jsonl`, paired by prompt: for the sampled mean
  reward and the greedy accuracy, the start and end means, their difference and its 95%
  percentile-bootstrap interval (prompts resampled with replacement, the same draw for both
  evaluations). None with fewer than two evaluations. An iteration evaluated twice (re-run after
  a restart) counts once, with its last record."""
  path = os.path.join(workdir, 'heldout.jsonl')
  if not os.path.exists(path):
    return None
  by_it = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        by_it[rec['iteration']] = rec
  if len(by_it) < 2:
    return None
  first, last = by_it[min(by_it)], by_it[max(by_it)]
  rng = np.random.default_rng(seed)
  out = {'from_iteration': first['iteration'], 'to_iteration': last['iteration']}
  for name, key in (('mean_reward', 'sampled_mean'), ('greedy_accuracy', 'greedy')):
    a, b = np.asarray(first[key], np.float64), np.asarray(last[key], np.float64)
    if a.shape != b.shape or not a.size:
      raise ValueError(f'{path}: held-out evaluations {first["iteration"]} and '
                       f'{last["iteration"]} cover different prompts ({a.shape} vs {b.shape})')
    d = b - a
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    out[name] = {'start': float(a.mean()), 'end': float(b.mean()), 'change': float(d.mean()),
                 'ci95': [float(lo), float(hi)]}
  return out


def format_change(change: dict) -> str:
  lines = [f"held-out change, iteration {change['from_iteration']} -> {change['to_iteration']} "
           '(95% paired bootstrap interval):']
  for name in ('mean_reward', 'greedy_accuracy'):
    c = change[name]
    lines.append(f"  {name}: {c['start']:.3f} -> {c['end']:.3f} ({c['change']:+.3f}, "
                 f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}])")
  return '\n'.join(lines)
