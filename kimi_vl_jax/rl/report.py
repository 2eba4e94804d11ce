"""The RL run's PNG at the end: rollout and held-out reward, response length, KL and entropy per
iteration, and the prioritized-sampling weights of the prompt set (`metrics.jsonl` holds them all)."""

from __future__ import annotations

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
