"""`train/` and `data/` import one way: no import cycle among their modules (imports inside
functions included), and `data/` never imports `train/`. Read statically from the source (ast),
so a cycle hidden behind a function-local import is found too."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ('kimi_vl_jax.train', 'kimi_vl_jax.data')


def _modules(root: str, package: str) -> dict[str, str]:
  """module name -> file, for the package and its direct submodules."""
  d = os.path.join(root, *package.split('.'))
  out = {package: os.path.join(d, '__init__.py')}
  for name in sorted(os.listdir(d)):
    if name.endswith('.py') and name != '__init__.py':
      out[f'{package}.{name[:-3]}'] = os.path.join(d, name)
  return out


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
  """Every module name an import statement anywhere in `tree` may load (a `from P import x`
  counts as both P and P.x), plus `importlib.import_module('...')` with a literal name."""
  base = module.split('.') if is_package else module.split('.')[:-1]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        pkg = '.'.join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
      else:
        pkg = node.module
      out.add(pkg)
      out.update(f'{pkg}.{a.name}' for a in node.names)
    elif (isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', ''))
          == 'import_module' and node.args and isinstance(node.args[0], ast.Constant)):
      out.add(str(node.args[0].value))
  return out


def import_graph(root: str, packages=PACKAGES) -> dict[str, set[str]]:
  """module -> the modules of `packages` it imports (each also depends on its parent package's
  `__init__`, which Python runs first)."""
  files = {}
  for p in packages:
    files.update(_modules(root, p))
  graph = {}
  for mod, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    names = _imported(tree, mod, path.endswith('__init__.py'))
    deps = set()
    for name in names:
      parts = name.split('.')
      # `import a.b.c` runs a, a.b and a.b.c.
      deps.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
    graph[mod] = {d for d in deps if d in files and d != mod}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a], or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_no_import_cycle_in_train_and_data():
  graph = import_graph(ROOT)
  assert 'kimi_vl_jax.train.loop' in graph and 'kimi_vl_jax.data.pipeline' in graph
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_data_does_not_import_train():
  graph = import_graph(ROOT)
  bad = {m: sorted(d for d in deps if d.startswith('kimi_vl_jax.train'))
         for m, deps in graph.items() if m.startswith('kimi_vl_jax.data')}
  assert not any(bad.values()), f'data modules importing train/: {bad}'


@pytest.mark.parametrize('importer', [
    'from kimi_vl_jax.train import a',
    'from . import a',
    'import kimi_vl_jax.train.a as a',
    'import importlib\nimportlib.import_module("kimi_vl_jax.train.a")',
])
def test_a_function_local_cycle_is_found(tmp_path, importer):
  pkg = tmp_path / 'kimi_vl_jax' / 'train'
  pkg.mkdir(parents=True)
  (tmp_path / 'kimi_vl_jax' / '__init__.py').write_text('')
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from kimi_vl_jax.train.b import f\n')
  body = '\n'.join('  ' + line for line in importer.splitlines())
  (pkg / 'b.py').write_text(f'def f():\n{body}\n')
  cycle = find_cycle(import_graph(str(tmp_path), ('kimi_vl_jax.train',)))
  assert cycle is not None and set(cycle) == {'kimi_vl_jax.train.a', 'kimi_vl_jax.train.b'}
