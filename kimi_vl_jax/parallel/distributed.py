"""Multi-host start-up: `jax.distributed.initialize` when (and only when) the job has several hosts.

Call `maybe_initialize()` first thing in the entry point, before anything touches a jax backend
(`jax.devices()`, creating an array, jitting): the distributed client must exist before the
backend is built, or each process sees only its own devices.

When it initialises, in order of precedence:

1. Explicit environment (any cluster, and the localhost multi-process test):
   `JAX_COORDINATOR_ADDRESS=host:port` (process 0's address; it runs the coordinator service),
   `JAX_NUM_PROCESSES=n`, `JAX_PROCESS_ID=i` (0-based), optionally `JAX_LOCAL_DEVICE_IDS=0,1`.
   `KIMI_VL_CPU_COLLECTIVES` picks the CPU collectives backend (default `gloo`), needed for
   cross-process collectives on XLA:CPU.
2. A multi-host Cloud TPU VM / queued resource (and multi-slice via `MEGASCALE_*`): detected
   from `TPU_WORKER_HOSTNAMES` (or `TPU_PROCESS_ADDRESSES`) listing more than one worker, or
   `MEGASCALE_COORDINATOR_ADDRESS`; jax then discovers coordinator, process count and id itself
   from the TPU environment / GCE metadata.
3. Otherwise (a laptop, one CPU process, a single-host TPU VM such as v5e-8): nothing to do.

`KIMI_VL_DISTRIBUTED=0` disables it, `=1` forces `jax.distributed.initialize()` with auto
detection (e.g. on SLURM or a GKE JobSet, which jax recognises itself).
"""

from __future__ import annotations

import logging
import os

import jax

_ENV_ADDR, _ENV_N, _ENV_ID = 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'


def _tpu_worker_count() -> int:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_PROCESS_ADDRESSES') or ''
  return len([h for h in hosts.split(',') if h.strip()])


def _intended(env) -> str | None:
  """Why this process should initialise ('explicit' | 'tpu' | 'forced'), or None."""
  flag = env.get('KIMI_VL_DISTRIBUTED', '').strip().lower()
  if flag in ('0', 'false', 'no', 'off'):
    return None
  if env.get(_ENV_ADDR) and env.get(_ENV_N):
    return 'explicit'
  if _tpu_worker_count() > 1 or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  if flag in ('1', 'true', 'yes', 'on'):
    return 'forced'
  return None


def maybe_initialize() -> bool:
  """Initialises jax.distributed if the environment asks for it; returns whether it is active."""
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  why = _intended(env)
  if why is None:
    return False
  if why == 'explicit':
    n = int(env[_ENV_N])
    if _ENV_ID not in env:
      raise ValueError(f'{_ENV_ADDR} and {_ENV_N}={n} are set but {_ENV_ID} is not; set it to '
                       f'this process index (0..{n - 1})')
    pid = int(env[_ENV_ID])
    if not 0 <= pid < n:
      raise ValueError(f'{_ENV_ID}={pid} is outside 0..{n - 1} ({_ENV_N}={n})')
    platforms = (env.get('JAX_PLATFORMS') or '').split(',')
    if 'cpu' in platforms or not platforms[0]:
      # XLA:CPU needs a collectives implementation to talk across processes.
      jax.config.update('jax_cpu_collectives_implementation',
                        env.get('KIMI_VL_CPU_COLLECTIVES', 'gloo'))
    ids = env.get('JAX_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        coordinator_address=env[_ENV_ADDR], num_processes=n, process_id=pid,
        local_device_ids=[int(i) for i in ids.split(',')] if ids else None)
  else:
    jax.distributed.initialize()
  logging.info('jax.distributed initialised (%s): process %d of %d, %d local / %d global devices',
               why, jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_coordinator() -> bool:
  """True on the process that writes logs and summaries (process 0)."""
  return jax.process_index() == 0
