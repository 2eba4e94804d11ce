"""launch/colab_tiny.ipynb runs headless on CPU (nbclient) with the steps cut down, the install
cell skipped and the repository on the kernel's path, and shows a loss plot and answers."""

import json
import os

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, 'launch', 'colab_tiny.ipynb')


def _tagged(nb, tag):
  return [i for i, c in enumerate(nb.cells) if tag in c.metadata.get('tags', [])]


def _load():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def test_colab_notebook_is_a_valid_notebook_that_runs_the_tiny_config():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb['nbformat'] == 4 and nb['cells']
  for c in nb['cells']:
    assert c['cell_type'] in ('markdown', 'code') and isinstance(c['source'], list)
    if c['cell_type'] == 'code':
      assert c['outputs'] == [] and 'execution_count' in c
  code = ''.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code')
  assert 'os.path.join(REPO_DIR, "configs", "joint_sft.py")' in code
  assert 'get_config("tiny")' in code and 'Trainer(cfg, WORKDIR).run()' in code
  assert 'pip", "install", "-q", "-e", REPO_DIR' in code and 'git", "clone"' in code
  # Every code cell is valid Python once IPython's ! and % lines are set aside.
  for c in nb['cells']:
    if c['cell_type'] == 'code':
      src = ''.join(l for l in c['source'] if not l.lstrip().startswith(('!', '%')))
      compile(src, 'cell', 'exec')


def test_notebook_is_parameterised_and_names_only_real_fields():
  nb = _load()
  assert len(_tagged(nb, 'parameters')) == 1 and len(_tagged(nb, 'install')) == 1
  params = nb.cells[_tagged(nb, 'parameters')[0]].source
  assert 'STEPS = 1000' in params and 'WORKDIR' in params and 'REPO_DIR' in params
  code = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
  assert 'Trainer(cfg, WORKDIR).run()' in code and 'get_config("tiny")' in code
  assert '--config.' not in code  # no command-line overrides: the config is edited in Python


@pytest.mark.slow
def test_notebook_trains_plots_and_answers(tmp_path, monkeypatch):
  nb = _load()
  nb.cells = [c for i, c in enumerate(nb.cells) if i not in _tagged(nb, 'install')]
  p = _tagged(nb, 'parameters')[0]
  nb.cells[p].source = (f'REPO_DIR = {ROOT!r}\nWORKDIR = {str(tmp_path / "run")!r}\n'
                        'STEPS = 6\nANSWER_EXAMPLES = 8\n')
  # The kernel is a fresh process: this checkout first on its path, one CPU device as on Colab.
  monkeypatch.setenv('PYTHONPATH', ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()

  def outputs(marker):
    cell = next(c for c in nb.cells if c.cell_type == 'code' and marker in c.source)
    return cell.outputs

  def text(outs):
    return ''.join(o.get('text', '') for o in outs if o.output_type == 'stream')

  def has_png(outs):
    return any('image/png' in o.get('data', {}) for o in outs if o.output_type == 'display_data')

  train_out = text(outputs('Trainer(cfg, WORKDIR).run()'))
  assert "('sft_short', 5), ('sft_long', 1)" in train_out, train_out
  assert 'answer_accuracy' in train_out, train_out
  assert os.path.exists(tmp_path / 'run' / 'metrics.jsonl')
  assert has_png(outputs('read_metrics(WORKDIR)'))
  answer_outs = outputs('greedy_answers(')
  assert has_png(answer_outs)
  lines = text(answer_outs).splitlines()
  assert sum(line.startswith('Q: ') for line in lines) == 4
  assert sum(line.startswith('A: ') for line in lines) == 4, lines
