"""The k1.5 mirror-descent surrogate: value, baselines and the analytic gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.rl import mirror_descent as md


def _example(seed=0, G=3, k=4, T=6):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-1.5, 0.5, (G * k, T)).astype(np.float32)
  old = logp + rng.normal(0, 0.1, logp.shape).astype(np.float32)
  mask = (rng.random((G * k, T)) > 0.3).astype(np.float32)
  rewards = rng.integers(0, 2, G * k).astype(np.float32)
  return jnp.asarray(logp), jnp.asarray(old), jnp.asarray(mask), jnp.asarray(rewards), k


@pytest.mark.parametrize('baseline', md.BASELINES)
@pytest.mark.parametrize('length_normalise', [False, True])
def test_gradient_matches_the_analytic_form(baseline, length_normalise):
  logp, old, mask, rewards, k = _example()
  cfg = md.MirrorDescentConfig(tau=0.3, baseline=baseline, length_normalise=length_normalise)
  grad = jax.grad(lambda lp: md.mirror_descent_sums(lp, old, mask, rewards, k, cfg)['loss_sum'])(
      logp)
  # dL/dlogp_jt = -(2 tau / k) (r_j - b_j - tau Delta_j) mask_jt [/ len_j]
  delta = np.sum(np.asarray(mask) * (np.asarray(logp) - np.asarray(old)), axis=1)
  r = np.asarray(rewards).reshape(-1, k)
  if baseline == 'mean':
    b = np.repeat(r.mean(1), k)
  else:
    b = np.array([0.3 * np.log(np.mean(np.exp(np.delete(row, j) / 0.3)))
                  for row in r for j in range(k)])
  resid = np.asarray(rewards) - b - 0.3 * delta
  expected = -(2 * 0.3 / k) * resid[:, None] * np.asarray(mask)
  if length_normalise:
    expected = expected / np.maximum(np.asarray(mask).sum(1, keepdims=True), 1)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


def test_first_step_is_reinforce_with_a_mean_baseline():
  logp, _, mask, rewards, k = _example(1)
  out = md.mirror_descent_sums(logp, logp, mask, rewards, k, md.MirrorDescentConfig(tau=0.5))
  r = np.asarray(rewards).reshape(-1, k)
  np.testing.assert_allclose(float(out['loss_sum']),
                             np.sum((r - r.mean(1, keepdims=True)) ** 2) / k, rtol=1e-6)
  assert float(out['delta_abs_sum']) == 0.0 and float(out['groups']) == len(r)


def test_old_logp_and_rewards_are_constants():
  logp, old, mask, rewards, k = _example(2)
  cfg = md.MirrorDescentConfig()
  g_old, g_r = jax.grad(lambda o, r: md.mirror_descent_sums(logp, o, mask, r, k, cfg)['loss_sum'],
                        argnums=(0, 1))(old, rewards)
  assert not np.any(np.asarray(g_old)) and not np.any(np.asarray(g_r))


def test_loo_baseline_approaches_the_leave_one_out_max_for_small_tau():
  r = jnp.asarray([1.0, 0.0, 0.0, 0.0])
  b = md.baselines(r, 4, 'loo_logmeanexp', tau=1e-3)
  # Without the response's own reward: 0 for the solver, ~1 (minus tau log 3) for the others.
  np.testing.assert_allclose(np.asarray(b), [0.0, 1 - 1e-3 * np.log(3)] + [1 - 1e-3 * np.log(3)] * 2,
                             atol=1e-5)


def test_masked_positions_never_leak_inf():
  logp, old, mask, rewards, k = _example(3)
  logp = jnp.where(mask > 0, logp, -jnp.inf)
  out = md.mirror_descent_sums(logp, old, mask, rewards, k, md.MirrorDescentConfig())
  assert np.isfinite(float(out['loss_sum']))


def test_bad_config_and_groups_are_refused():
  with pytest.raises(ValueError, match='tau'):
    md.MirrorDescentConfig(tau=0.0)
  with pytest.raises(ValueError, match='baseline'):
    md.MirrorDescentConfig(baseline='median')
  with pytest.raises(ValueError, match='groups of k'):
    md.baselines(jnp.zeros(5), 4, 'mean', 0.1)


def test_kl_estimate_is_zero_at_equal_policies_and_matches_exact_kl():
  p = np.array([0.7, 0.2, 0.1])
  q = np.array([0.5, 0.3, 0.2])
  exact = float(np.sum(p * np.log(p / q)))
  rng = np.random.default_rng(0)
  tokens = rng.choice(3, size=(1, 200_000), p=p)
  lp, lq = jnp.asarray(np.log(p)[tokens]), jnp.asarray(np.log(q)[tokens])
  mask = jnp.ones(tokens.shape)
  s = md.kl_estimate_sums(lp, lq, mask)
  assert abs(float(s['kl_sum'] / s['tokens']) - exact) < 0.01 * exact + 1e-3
  assert float(md.kl_estimate_sums(lp, lp, mask)['kl_sum']) == 0.0


@pytest.mark.parametrize('baseline', md.BASELINES)
def test_uniform_groups_have_zero_first_step_gradient_and_are_found(baseline):
  """What `rl.skip_uniform_groups` relies on: a group whose k rewards are equal contributes
  nothing to the gradient at Delta = 0, under both baselines."""
  logp, _, mask, _, k = _example(3, G=4)
  rewards = jnp.asarray([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5], jnp.float32)
  keep = md.informative_groups(rewards, k)
  np.testing.assert_array_equal(keep, [False, True, False, False])
  cfg = md.MirrorDescentConfig(tau=0.2, baseline=baseline)
  grad = jax.grad(lambda lp: md.mirror_descent_sums(lp, logp, mask, rewards, k, cfg)['loss_sum'])(
      logp)
  per_group = np.abs(np.asarray(grad)).reshape(4, k, -1).sum((1, 2))
  assert np.all(per_group[~keep] == 0) and np.all(per_group[keep] > 0)
  with pytest.raises(ValueError, match='groups of k'):
    md.informative_groups(rewards[:-1], k)
