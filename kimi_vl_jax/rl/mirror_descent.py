"""Online policy mirror descent (Kimi k1.5 section 2.3, the RL of Kimi-VL-Thinking: Kimi-VL report
section 2.4).

Iteration i keeps the policy it started from, pi_i, as the reference and maximises
`E[r(x, y, y*)] - tau KL(pi_theta(x) || pi_i(x))`. The optimum is
`pi*(y|x) = pi_i(y|x) exp(r / tau) / Z`, so `r - tau log Z = tau log(pi* / pi_i)`, and k1.5 fits
pi_theta to that identity with a squared loss on the k responses y_j sampled from pi_i per prompt:

    L = (1/k) sum_j (r_j - b_j - tau * Delta_j)^2,   Delta_j = sum_t (log pi_theta - log pi_i)(y_jt)

where b_j stands in for `tau log Z`: the mean reward of the prompt's k responses (`'mean'`), or the
leave-one-out `tau * log mean_{l != j} exp(r_l / tau)` (`'loo_logmeanexp'`, the exact-Z form
without the response's own reward). Its gradient is `-(2 tau / k) sum_j (r_j - b_j - tau Delta_j)
grad Delta_j`: at Delta = 0 (the first step of an iteration) REINFORCE with a baseline; the
squared term pulls pi_theta back toward pi_i as it moves. No value network, no clipping.

Rows are responses; a prompt's k responses are k consecutive rows. Token arrays are `[R, T]`
(R = prompts * k) with `mask` 1 on the response tokens that count (prompt tokens, padding and
tokens an older policy wrote in a partial rollout are 0; see `rl/partial_rollouts.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BASELINES = ('mean', 'loo_logmeanexp')


@dataclasses.dataclass(frozen=True)
class MirrorDescentConfig:
  """tau: KL weight (k1.5 write-ups and OpenKimi use 0.01 with 0/1 rewards); baseline: one of
  BASELINES; length_normalise: divide each response's squared residual by its number of loss
  tokens (long responses otherwise dominate the sum through Delta)."""
  tau: float = 0.01
  baseline: str = 'mean'
  length_normalise: bool = False

  def __post_init__(self):
    if not self.tau > 0:
      raise ValueError(f'tau must be > 0, got {self.tau}')
    if self.baseline not in BASELINES:
      raise ValueError(f'baseline must be one of {BASELINES}, got {self.baseline!r}')


def baselines(rewards: Array, k: int, kind: str, tau: float) -> Array:
  """rewards [R] (R = G * k, groups of k consecutive rows) -> the baseline b_j of each row, [R]."""
  if rewards.shape[0] % k:
    raise ValueError(f'{rewards.shape[0]} rewards do not form groups of k={k}')
  r = rewards.astype(jnp.float32).reshape(-1, k)                          # [G, k]
  if kind == 'mean':
    b = jnp.broadcast_to(jnp.mean(r, axis=1, keepdims=True), r.shape)
  elif kind == 'loo_logmeanexp':
    if k < 2:
      raise ValueError('the leave-one-out baseline needs k >= 2 responses per prompt')
    z = r / tau
    others = jnp.where(jnp.eye(k, dtype=bool)[None], -jnp.inf, z[:, None, :])  # [G, k(j), k(l)]
    b = tau * (jax.nn.logsumexp(others, axis=-1) - jnp.log(k - 1.0))
  else:
    raise ValueError(f'unknown baseline {kind!r}; one of {BASELINES}')
  return b.reshape(-1)


def informative_groups(rewards, k: int, atol: float = 1e-9):
  """rewards [R] (groups of k consecutive rows) -> bool [G]: the groups whose k rewards differ.

  A group whose responses all got the same reward has r_j - b_j = 0 under both baselines, so at
  Delta = 0 (an iteration's first step) its gradient is exactly zero; at later steps of the same
  iteration only its `tau * Delta` term remains, a pull back toward pi_i. Skipping such groups
  (`rl.skip_uniform_groups`; DAPO's "dynamic sampling", arXiv 2503.14476 section 3.2) spends the
  optimizer steps on the prompts that carry signal and drops that pull for the others."""
  r = np.asarray(rewards, np.float64)
  if r.shape[0] % k:
    raise ValueError(f'{r.shape[0]} rewards do not form groups of k={k}')
  r = r.reshape(-1, k)
  return (r.max(axis=1) - r.min(axis=1)) > atol


def log_ratio(logp: Array, old_logp: Array, mask: Array) -> Array:
  """Delta_j = sum over the row's loss tokens of log pi_theta - log pi_i: [R, T] x 3 -> [R]."""
  m = mask.astype(jnp.float32)
  d = logp.astype(jnp.float32) - old_logp.astype(jnp.float32)
  return jnp.sum(jnp.where(m > 0, d * m, 0.0), axis=-1)


def mirror_descent_sums(logp: Array, old_logp: Array, mask: Array, rewards: Array, k: int,
                        config: MirrorDescentConfig) -> dict[str, Array]:
  """The surrogate loss summed over prompts (divide by the global `groups` once, after gradient
  accumulation and across data shards, as `train/losses.py` does for tokens).

  Args:
    logp: [R, T] log pi_theta of each response token (differentiated).
    old_logp: [R, T] log pi_i of the same tokens, computed once per iteration (constants).
    mask: [R, T] 1 on loss tokens.
    rewards: [R] scalar reward per response (length reward etc. already added).
    k: responses per prompt (static).
  Returns fp32 scalars: `loss_sum` (sum over groups of (1/k) sum_j residual_j^2 [/ len_j]),
  `groups`, `delta_abs_sum` (sum |Delta_j|, how far pi_theta has moved), `residual_sq_sum`.
  """
  old_logp = jax.lax.stop_gradient(old_logp)
  rewards = jax.lax.stop_gradient(rewards.astype(jnp.float32))
  delta = log_ratio(logp, old_logp, mask)                                   # [R]
  b = baselines(rewards, k, config.baseline, config.tau)                    # [R]
  residual = rewards - b - config.tau * delta
  sq = jnp.square(residual)
  if config.length_normalise:
    sq = sq / jnp.maximum(jnp.sum(mask.astype(jnp.float32), axis=-1), 1.0)
  return {'loss_sum': jnp.sum(sq) / k, 'groups': jnp.float32(rewards.shape[0] // k),
          'delta_abs_sum': jnp.sum(jnp.abs(delta)), 'residual_sq_sum': jnp.sum(jnp.square(residual))}


def kl_estimate_sums(sample_logp: Array, other_logp: Array, mask: Array) -> dict[str, Array]:
  """KL(p || q) from tokens sampled by p: the per-token k3 estimator `(ratio - 1) - log ratio`,
  ratio = q / p (unbiased and non-negative; Schulman 2020), summed over loss tokens, with the
  token count. With rollouts from pi_i, `sample_logp` = log pi_i and `other_logp` = log pi_theta
  give KL(pi_i || pi_theta), how far an iteration's updates moved the policy."""
  m = mask.astype(jnp.float32)
  log_ratio_ = other_logp.astype(jnp.float32) - sample_logp.astype(jnp.float32)
  k3 = jnp.expm1(log_ratio_) - log_ratio_
  return {'kl_sum': jnp.sum(jnp.where(m > 0, k3 * m, 0.0)), 'tokens': jnp.sum(m)}
