"""The KL term keeps the policy near pi_i: fitting the surrogate to convergence on a toy policy,
the optimum has tau * Delta_j = r_j - b_j, so a large tau barely moves the policy and a small one
moves it far (Kimi k1.5 section 2.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kimi_vl_jax.rl import mirror_descent as md


def _fit(tau, steps=400):
  # A categorical policy over 6 one-token responses; k = 4 samples drawn from pi_i.
  logits0 = jnp.asarray([0.3, -0.2, 0.1, 0.0, -0.4, 0.2])
  tokens = jnp.asarray([0, 2, 3, 5])
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0])
  old = jax.nn.log_softmax(logits0)[tokens][:, None]
  mask = jnp.ones((4, 1))
  cfg = md.MirrorDescentConfig(tau=tau)

  def loss(logits):
    logp = jax.nn.log_softmax(logits)[tokens][:, None]
    return md.mirror_descent_sums(logp, old, mask, rewards, 4, cfg)['loss_sum']

  opt = optax.adam(0.05)

  def body(_, carry):
    params, state = carry
    up, state = opt.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, up), state

  params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, opt.init(p))))(logits0)
  p0, p1 = jax.nn.softmax(logits0), jax.nn.softmax(params)
  kl = float(jnp.sum(p0 * (jnp.log(p0) - jnp.log(p1))))
  delta = np.asarray(jax.nn.log_softmax(params)[tokens] - old[:, 0])
  return kl, delta


def test_large_tau_barely_moves_small_tau_moves():
  kl_big, delta_big = _fit(tau=100.0)
  kl_small, _ = _fit(tau=0.5)
  assert kl_big < 1e-4, kl_big
  assert kl_small > 100 * kl_big and kl_small > 0.01, (kl_small, kl_big)
  # At the optimum tau * Delta_j = r_j - mean(r) (within the fit's precision).
  np.testing.assert_allclose(100.0 * delta_big, [0.5, -0.5, -0.5, 0.5], atol=0.05)
