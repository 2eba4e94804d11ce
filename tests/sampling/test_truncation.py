"""Temperature / top-k / top-p: the kept sets, the log-probs, and samples that follow the truncated
distribution (chi-square on a fixed logit vector)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.sampling.truncation import sample, truncated_logprobs

LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.3, -0.8, -1.5, -3.0], np.float32)
# Chi-square critical values at significance 0.001 by degrees of freedom (standard tables).
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
             9: 27.88}


def _lp(logits, temperature=1.0, top_k=0, top_p=1.0, truncate=True):
  B = logits.shape[0]
  return np.asarray(truncated_logprobs(
      jnp.asarray(logits), jnp.full(B, temperature), jnp.full(B, top_k, jnp.int32),
      jnp.full(B, top_p), truncate=truncate))


def _expected(temperature, top_k, top_p):
  """The truncated distribution by a direct numpy computation."""
  z = LOGITS / temperature
  order = np.argsort(-z)
  keep = np.zeros(len(z), bool)
  keep[order[:top_k or len(z)]] = True
  p = np.exp(z - z.max()) * keep
  p /= p.sum()
  cum, kept = 0.0, np.zeros(len(z), bool)
  for i in order:
    if keep[i] and cum < top_p:
      kept[i] = True
      cum += p[i]
  q = np.exp(z - z.max()) * kept
  return q / q.sum()


@pytest.mark.parametrize('temperature, top_k, top_p', [
    (1.0, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.8), (1.3, 5, 0.9), (1.0, 1, 1.0), (1.0, 0, 0.05)])
def test_logprobs_are_the_truncated_distribution(temperature, top_k, top_p):
  got = np.exp(_lp(LOGITS[None], temperature, top_k, top_p)[0])
  np.testing.assert_allclose(got, _expected(temperature, top_k, top_p), atol=1e-6)


def test_no_truncation_needs_no_sort_and_greedy_gives_the_policy_logprob():
  logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
  np.testing.assert_allclose(_lp(logits, 0.8, truncate=True), _lp(logits, 0.8, truncate=False),
                             atol=1e-6)
  # Greedy rows: log_softmax of the raw logits, whatever top-k / top-p say.
  ref = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(_lp(logits, 0.0, top_k=2, top_p=0.5), ref, atol=1e-6)
  tok, lp = sample(jax.random.split(jax.random.PRNGKey(0), 3), jnp.asarray(logits),
                   jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3))
  np.testing.assert_array_equal(tok, logits.argmax(-1))
  np.testing.assert_allclose(lp, ref[np.arange(3), logits.argmax(-1)], atol=1e-6)


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 3, 1.0), (0.7, 0, 0.8),
                                                        (1.3, 5, 0.9), (1.0, 0, 1.0)])
def test_samples_follow_the_truncated_distribution(temperature, top_k, top_p):
  n = 20000
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  B = lambda v, dt=jnp.float32: jnp.full(n, v, dt)
  tok, lp = jax.jit(sample, static_argnames='truncate')(
      keys, jnp.broadcast_to(jnp.asarray(LOGITS), (n, len(LOGITS))), B(temperature),
      B(top_k, jnp.int32), B(top_p), truncate=True)
  tok = np.asarray(tok)
  p = _expected(temperature, top_k, top_p)
  counts = np.bincount(tok, minlength=len(LOGITS))
  assert counts[p == 0].sum() == 0                      # nothing outside the kept set
  kept = p > 0
  expected = n * p[kept]
  chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
  assert chi2 < CHI2_CRIT[int(kept.sum()) - 1], (chi2, counts, expected)
  np.testing.assert_allclose(np.asarray(lp), np.log(p[tok]), atol=1e-5)


def test_a_wrong_distribution_fails_the_chi_square_check():
  """Control: top-k=3 samples tested against the untruncated distribution's top 3 proportions
  (renormalised differently) exceed the critical value."""
  n = 20000
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  tok, _ = sample(keys, jnp.broadcast_to(jnp.asarray(LOGITS), (n, 10)), jnp.full(n, 1.0),
                  jnp.full(n, 3, jnp.int32), jnp.full(n, 1.0))
  counts = np.bincount(np.asarray(tok), minlength=10)[:3]
  wrong = _expected(0.7, 3, 1.0)[:3] * n
  assert ((counts - wrong) ** 2 / wrong).sum() > CHI2_CRIT[2]
