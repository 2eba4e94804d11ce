"""Preemption: a SIGTERM (TPU maintenance event, spot / preemptible VM) makes the loop write a
checkpoint at the current step and stop; re-running the same command resumes from it.

One process: a SIGTERM handler sets a flag that the loop reads after every step.

Several processes (`jax.distributed`): every process must stop at the same step, or the hosts
would save different steps and the next step's collectives would hang. JAX's preemption sync
service (started by `jax.distributed.initialize`, on by default: `jax_enable_preemption_service`)
catches SIGTERM on any host, lets all hosts agree on the next step every one of them reaches,
and `multihost_utils.reached_preemption_sync_point(step)` turns True at that same step on every
process. Between notices it is a local check (no collective per step). No Python handler is
installed then (it would replace the service's own); without the service a multi-process run
keeps the default SIGTERM behaviour (the process ends, the run resumes from the last interval
checkpoint).
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class Preemption:
  """Context manager: `reached(step)` is True at the step where the run must save and stop."""

  def __init__(self):
    from jax._src import distributed
    self.requested = False
    self._sync = (jax.process_count() > 1
                  and distributed.global_state.preemption_sync_manager is not None)
    self._previous = None

  def __enter__(self) -> 'Preemption':
    if jax.process_count() > 1:
      if not self._sync:
        logging.warning('jax preemption service off: SIGTERM ends the run without a checkpoint')
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Called by every process after every train step (`step` = steps completed)."""
    if self._sync:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested
