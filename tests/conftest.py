"""Test-wide set-up: 8 emulated CPU devices (before jax is imported) and fp32 matmuls."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

# Object-storage servers on localhost (tests/object_store.py), started only when a test asks.
pytest_plugins = ('object_store',)

jax.config.update('jax_default_matmul_precision', 'highest')
