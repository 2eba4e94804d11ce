"""Test-wide set-up: 8 emulated CPU devices and quick compiles (`tests/xla_env.py`, before jax is
imported), fp32 matmuls, and one XLA compilation cache per test session.

The cache lives in a fresh temporary directory made by the first process that loads this file
(the pytest controller), handed to xdist workers and to every subprocess a test starts through the
environment, and removed at the end. Tests compile the same tiny programs many times (each
resume test runs its command three times); a cache hit replays the same executable, so results
are unchanged, only compile time is saved. `KIMI_VL_JAX_TEST_COMPILE_CACHE=off` disables it.
"""

import os
import shutil
import tempfile

from tests.xla_env import xla_flags  # noqa: E402

os.environ.setdefault('XLA_FLAGS', xla_flags(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_CACHE_ENV = 'KIMI_VL_JAX_TEST_COMPILE_CACHE'
_OWNS_CACHE = False
if os.environ.get(_CACHE_ENV) != 'off' and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='kimi_vl_jax_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ[_CACHE_ENV]
  # Programs compiling in under 0.2 s are cheaper to rebuild than to store and look up.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.2'
  _OWNS_CACHE = True

import jax  # noqa: E402

# Object-storage servers on localhost (tests/object_store.py), started only when a test asks.
pytest_plugins = ('object_store',)

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_unconfigure(config):
  if _OWNS_CACHE:            # the process that made it (the controller under xdist)
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
