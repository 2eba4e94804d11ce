"""Learning-rate schedules: warmup + cosine / linear decay, and multi-phase schedules.

Kimi-VL's stages each encode an LR schedule (Kimi-VL report sections 2.3-2.4; docs/recipe.md). Most are one warmup + decay;
joint SFT is two phases: 1 epoch at 32K with 2e-5 -> 2e-6, then 1 epoch at 128K re-warmed to
1e-5 and decayed to 1e-6. `multi_phase` chains such phases with `optax.join_schedules`, each phase
counting its own steps from 0.

All schedules are `step -> lr` functions usable under jit (`step` an int32 scalar array) and as
`optax.scale_by_learning_rate` arguments. Config form (`make_schedule`):

  schedule.kind = 'constant' | 'warmup_cosine' | 'warmup_linear' | 'multi_phase'
  # constant:           peak_lr
  # warmup_cosine/linear: peak_lr, total_steps, warmup_steps (0), end_lr (0.0), init_lr (0.0)
  # multi_phase:        phases = [dict(steps, warmup_steps, peak_lr, end_lr, decay, init_lr?), ...]
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

DECAY_KINDS = ('cosine', 'linear', 'constant')


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def warmup_decay(peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0,
                 init_lr: float = 0.0, decay: str = 'cosine') -> Schedule:
  """Linear warmup from `init_lr` to `peak_lr` over `warmup_steps`, then decay to `end_lr`.

  The decay runs over steps [warmup_steps, total_steps]; after `total_steps` the LR stays at
  `end_lr`. `decay`: 'cosine' (half cosine), 'linear', or 'constant' (stay at `peak_lr`).
  Step 0 gives `init_lr` when there is a warmup, `peak_lr` otherwise.
  """
  _check(decay in DECAY_KINDS, f'decay must be one of {DECAY_KINDS}, got {decay!r}')
  _check(int(total_steps) == total_steps and total_steps >= 1,
         f'total_steps must be a positive integer, got {total_steps!r}')
  _check(int(warmup_steps) == warmup_steps and 0 <= warmup_steps <= total_steps,
         f'warmup_steps must be an integer in [0, total_steps={total_steps}], got {warmup_steps!r}')
  for name, v in (('peak_lr', peak_lr), ('end_lr', end_lr), ('init_lr', init_lr)):
    _check(math.isfinite(v) and v >= 0, f'{name} must be a finite non-negative float, got {v!r}')
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = init_lr + (peak_lr - init_lr) * step / max(warmup_steps, 1)
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)  # decay progress in [0, 1]
    if decay == 'cosine':
      dec = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    elif decay == 'linear':
      dec = peak_lr + (end_lr - peak_lr) * t
    else:
      dec = jnp.full_like(t, peak_lr)
    return jnp.where(step < warmup_steps, warm, dec).astype(jnp.float32)

  return schedule


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0,
                  init_lr: float = 0.0) -> Schedule:
  """Linear warmup then half-cosine decay to `end_lr` at `total_steps`."""
  return warmup_decay(peak_lr, total_steps, warmup_steps, end_lr, init_lr, 'cosine')


def warmup_linear(peak_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0,
                  init_lr: float = 0.0) -> Schedule:
  """Linear warmup then linear decay to `end_lr` at `total_steps`."""
  return warmup_decay(peak_lr, total_steps, warmup_steps, end_lr, init_lr, 'linear')


_PHASE_KEYS = {'steps', 'warmup_steps', 'peak_lr', 'end_lr', 'decay', 'init_lr'}


def multi_phase(phases: Sequence) -> Schedule:
  """Phases run back to back; each is a warmup + decay over its own `steps`.

  Each phase (dict or ConfigDict): `steps`, `peak_lr`, and optionally `warmup_steps` (0),
  `end_lr` (= peak_lr), `decay` ('cosine'), `init_lr` (where its warmup starts: by default the
  previous phase's `end_lr`, 0.0 for the first phase, so a re-warm is continuous). After the last
  phase the LR stays at its `end_lr`.
  """
  _check(len(phases) >= 1, 'multi_phase needs at least one phase')
  schedules, boundaries, prev_end, start = [], [], 0.0, 0
  for i, ph in enumerate(phases):
    ph = dict(ph.to_dict() if isinstance(ph, ml_collections.ConfigDict) else ph)
    unknown = set(ph) - _PHASE_KEYS
    _check(not unknown, f'phase {i}: unknown keys {sorted(unknown)}; allowed {sorted(_PHASE_KEYS)}')
    _check('steps' in ph and 'peak_lr' in ph, f'phase {i}: needs `steps` and `peak_lr`, got {ph}')
    end_lr = ph.get('end_lr', ph['peak_lr'])
    init_lr = ph.get('init_lr', prev_end)
    try:
      schedules.append(warmup_decay(ph['peak_lr'], ph['steps'], ph.get('warmup_steps', 0), end_lr,
                                    init_lr, ph.get('decay', 'cosine')))
    except ValueError as e:
      raise ValueError(f'phase {i}: {e}') from None
    if i:
      boundaries.append(start)
    start += ph['steps']
    prev_end = end_lr
  if len(schedules) == 1:
    return schedules[0]
  # join_schedules feeds each schedule `step - boundary`, so phases count from 0.
  return optax.join_schedules(schedules, boundaries)


def make_schedule(cfg) -> Schedule:
  """Builds a schedule from its config (see the module docstring); a bare float is constant."""
  if isinstance(cfg, (int, float)):
    lr = float(cfg)
    return lambda step: jnp.full((), lr, jnp.float32)
  cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
  kind = cfg.pop('kind', None)
  allowed = {
      'constant': {'peak_lr'},
      'warmup_cosine': {'peak_lr', 'total_steps', 'warmup_steps', 'end_lr', 'init_lr'},
      'warmup_linear': {'peak_lr', 'total_steps', 'warmup_steps', 'end_lr', 'init_lr'},
      'multi_phase': {'phases'},
  }
  _check(kind in allowed, f'schedule.kind must be one of {sorted(allowed)}, got {kind!r}')
  unknown = set(cfg) - allowed[kind]
  _check(not unknown, f'schedule kind {kind!r}: unknown fields {sorted(unknown)}; '
         f'allowed {sorted(allowed[kind])}')
  if kind == 'constant':
    return make_schedule(float(cfg['peak_lr']))
  if kind == 'multi_phase':
    return multi_phase(cfg['phases'])
  fn = warmup_cosine if kind == 'warmup_cosine' else warmup_linear
  return fn(**cfg)
