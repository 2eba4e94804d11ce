import math

from kimi_vl_jax.evaluation import niah, recall_table


def _r(h, bucket, length, depth, hit):
  return niah.Result(h, bucket, length, length - 3, depth, '1', 'x', hit)


RESULTS = [_r('text', (0, 2048), 2048, 0.0, True), _r('text', (0, 2048), 2048, 1.0, False),
           _r('text', (2048, 4096), 4096, 0.0, True), _r('text', (2048, 4096), 4096, 1.0, True),
           _r('image', (0, 2048), 2048, 0.0, False)]


def test_table():
  table = recall_table.format_table(RESULTS, [(0, 2048), (2048, 4096)])
  assert table.splitlines() == [
      '| Haystack | (0,2K] | (2K,4K] |',
      '|---|---|---|',
      '| text | 50.0 (2) | 100.0 (2) |',
      '| image | 0.0 (1) | - |']


def test_heatmap(tmp_path):
  lengths, ds, grid = recall_table.heatmap_grid(RESULTS, 'text')
  assert lengths == [2048, 4096] and ds == [0.0, 1.0]
  assert grid.tolist() == [[1.0, 1.0], [0.0, 1.0]]
  _, _, g = recall_table.heatmap_grid(RESULTS, 'image')
  assert g.tolist() == [[0.0]]
  path = tmp_path / 'niah.png'
  recall_table.write_heatmap(RESULTS, str(path), title='t')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert not math.isnan(grid[0, 0])
