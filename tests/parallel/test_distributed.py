"""`maybe_initialize` decisions from the environment (the 2-process run is in test_multihost.py)."""

import pytest

from kimi_vl_jax.parallel import distributed


@pytest.mark.parametrize('env, want', [
    ({}, None),
    ({'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234', 'JAX_NUM_PROCESSES': '2'}, 'explicit'),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),          # single-host TPU VM
    ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2'}, 'tpu'),  # multi-slice
    ({'KIMI_VL_DISTRIBUTED': '1'}, 'forced'),
    ({'KIMI_VL_DISTRIBUTED': '0', 'TPU_WORKER_HOSTNAMES': 'w0,w1'}, None),
])
def test_intended(monkeypatch, env, want):
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'TPU_WORKER_HOSTNAMES',
            'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS', 'KIMI_VL_DISTRIBUTED'):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed._intended(distributed.os.environ) == want


def test_single_process_is_a_noop(monkeypatch):
  for k in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES',
            'MEGASCALE_COORDINATOR_ADDRESS', 'KIMI_VL_DISTRIBUTED'):
    monkeypatch.delenv(k, raising=False)
  assert distributed.maybe_initialize() is False
  assert distributed.is_coordinator()


def test_explicit_env_needs_a_valid_process_id(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  with pytest.raises(ValueError, match='JAX_PROCESS_ID is not'):
    distributed.maybe_initialize()
  monkeypatch.setenv('JAX_PROCESS_ID', '2')
  with pytest.raises(ValueError, match=r'JAX_PROCESS_ID=2 is outside 0..1'):
    distributed.maybe_initialize()
