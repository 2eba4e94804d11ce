"""Dependencies run one way: `model/` never imports `parallel/`, `parallel/mesh.py` and
`parallel/rules.py` do not import each other in both directions, and `storage/` imports nothing
else from the package."""

import ast
import os
import pkgutil
import subprocess
import sys

import kimi_vl_jax

PACKAGE = os.path.dirname(kimi_vl_jax.__file__)
REPO = os.path.dirname(PACKAGE)


def _imports(path: str, root: str = REPO) -> set[str]:
  """Every module a file under `root` imports, at any depth (function-local imports and
  `importlib` calls with a literal name included), as absolute dotted names."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = os.path.relpath(os.path.dirname(path), root).replace(os.sep, '.')
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      out.add(base)
      out.update(f'{base}.{a.name}' for a in node.names)
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and getattr(node.func, 'attr', getattr(node.func, 'id', '')) in ('import_module',
                                                                          '__import__')):
      out.add(node.args[0].value)
  return out


def _files(sub: str) -> list[str]:
  root = os.path.join(PACKAGE, sub)
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith('.py'))


def test_model_files_import_nothing_from_parallel():
  files = _files('model')
  assert len(files) > 5
  bad = {os.path.relpath(f, REPO): sorted(m for m in _imports(f)
                                           if m.startswith('kimi_vl_jax.parallel'))
         for f in files}
  assert not {f: m for f, m in bad.items() if m}, bad


def test_the_static_check_sees_function_local_and_importlib_imports(tmp_path):
  """Control: the checker above catches each way a model file could reach parallel/."""
  pkg = tmp_path / 'kimi_vl_jax' / 'model'
  pkg.mkdir(parents=True)
  path = pkg / 'probe.py'
  path.write_text('import importlib\n'
                  'def f():\n'
                  '  from kimi_vl_jax.parallel import context\n'
                  '  from ..parallel import expert\n'
                  "  return importlib.import_module('kimi_vl_jax.parallel.pipeline')\n")
  found = _imports(str(path), root=str(tmp_path))
  assert {'kimi_vl_jax.parallel', 'kimi_vl_jax.parallel.context', 'kimi_vl_jax.parallel.expert',
          'kimi_vl_jax.parallel.pipeline'} <= found


def test_importing_the_model_loads_no_parallel_module():
  modules = ['kimi_vl_jax.model'] + [
      f'kimi_vl_jax.model.{m.name}'
      for m in pkgutil.iter_modules([os.path.join(PACKAGE, 'model')])]
  code = ('import importlib, sys\n'
          f'for m in {modules!r}:\n'
          '  importlib.import_module(m)\n'
          "print(sorted(m for m in sys.modules if m.startswith('kimi_vl_jax.parallel')))\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]', out.stdout


def test_mesh_and_rules_do_not_import_each_other():
  mesh = _imports(os.path.join(PACKAGE, 'parallel', 'mesh.py'))
  rules = _imports(os.path.join(PACKAGE, 'parallel', 'rules.py'))
  mesh_uses_rules = any(m.startswith('kimi_vl_jax.parallel.rules') for m in mesh)
  rules_uses_mesh = any(m.startswith('kimi_vl_jax.parallel.mesh') for m in rules)
  assert not (mesh_uses_rules and rules_uses_mesh), (sorted(mesh), sorted(rules))


def test_storage_imports_nothing_else_from_the_package():
  """kimi_vl_jax/storage owns path handling for data/, checkpoint/ and train/: it depends on
  none of them (nor on model/ or parallel/)."""
  files = _files('storage')
  assert len(files) >= 5
  bad = {os.path.relpath(f, REPO): sorted(m for m in _imports(f) if m.startswith('kimi_vl_jax')
                                           and not m.startswith('kimi_vl_jax.storage'))
         for f in files}
  assert not {f: m for f, m in bad.items() if m}, bad


def test_entry_points_import_together():
  """Importing every entry point in one process defines no absl flag twice (each defines its
  flags at import only if no other entry point claims the same names)."""
  code = ('import kimi_vl_jax.main, kimi_vl_jax.recipe, kimi_vl_jax.eval, kimi_vl_jax.generate, '
          'kimi_vl_jax.checkpoint.convert, kimi_vl_jax.aot, kimi_vl_jax.aot_rl')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-2000:]
