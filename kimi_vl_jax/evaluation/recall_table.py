"""The needle-in-a-haystack recall table (Kimi-VL report Table 2's layout: one row per haystack,
one column per length bucket) and a depth x length heat map per haystack."""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from kimi_vl_jax.evaluation import niah


def recall(results: Sequence[niah.Result]) -> dict[str, dict[tuple[int, int], tuple[int, int]]]:
  """{haystack: {bucket: (hits, cases)}}."""
  out: dict = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
  for r in results:
    cell = out[r.haystack][r.bucket]
    cell[0] += int(r.hit)
    cell[1] += 1
  return {h: {b: tuple(v) for b, v in cells.items()} for h, cells in out.items()}


def format_table(results: Sequence[niah.Result], buckets: Sequence[tuple[int, int]]) -> str:
  """Markdown: recall in % per haystack and bucket, with the case count of each cell."""
  table = recall(results)
  head = ['Haystack'] + [niah.bucket_label(b) for b in buckets]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, cells in table.items():
    row = [name]
    for b in buckets:
      hits, n = cells.get(b, (0, 0))
      row.append(f'{100 * hits / n:.1f} ({n})' if n else '-')
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def heatmap_grid(results: Sequence[niah.Result], haystack: str):
  """(lengths, depths, recall [depths, lengths] with NaN where no case ran) of one haystack."""
  rs = [r for r in results if r.haystack == haystack]
  lengths = sorted({r.requested for r in rs})
  ds = sorted({r.depth for r in rs})
  sums, counts = np.zeros((len(ds), len(lengths))), np.zeros((len(ds), len(lengths)))
  for r in rs:
    i, j = ds.index(r.depth), lengths.index(r.requested)
    sums[i, j] += r.hit
    counts[i, j] += 1
  with np.errstate(invalid='ignore'):
    return lengths, ds, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def write_heatmap(results: Sequence[niah.Result], path: str, title: str = '') -> None:
  """One panel per haystack: needle depth (rows) x prompt length (columns), recall 0..1."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(r.haystack for r in results))
  if not names:
    raise ValueError('no results to plot')
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 1, 3.6), squeeze=False,
                           layout='constrained')
  for k, (ax, name) in enumerate(zip(axes[0], names)):
    lengths, ds, grid = heatmap_grid(results, name)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap='RdYlGn', aspect='auto', origin='upper')
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=7)
    ax.set_yticks(range(len(ds)), [f'{d:.0%}' for d in ds], fontsize=7)
    ax.set_xlabel('prompt length (tokens)')
    if k == 0:
      ax.set_ylabel('needle depth')
    ax.set_title(f'{name} haystack')
    for i in range(len(ds)):
      for j in range(len(lengths)):
        if not np.isnan(grid[i, j]):
          ax.text(j, i, f'{grid[i, j]:.0%}', ha='center', va='center', fontsize=6)
  fig.colorbar(im, ax=axes[0].tolist(), label='recall')
  if title:
    fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
