"""The distribution a token is sampled from: temperature, top-k, top-p (nucleus), greedy.

Per row, in the order transformers' logits warpers apply them: logits / temperature, keep the
top_k largest (0 = all), then keep the smallest set of the largest whose probability (under the
top-k-truncated distribution) reaches top_p (1.0 = all; the most likely token is always kept).
Tokens tied with the last kept value are kept too. `truncated_logprobs` gives the normalised
log-probs of that distribution; `sample` draws from it.

Greedy rows (temperature 0) take the argmax, and their log-prob is the one under the untruncated
temperature-1 distribution, `log_softmax(logits)`: the policy's own log-prob of the token, which
is what a trainer recomputes by teacher forcing. For sampled rows the log-prob is that of the
distribution actually sampled from (with temperature 1 and no truncation: the policy's).

Einsum letters: B rows, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG_INF = -jnp.inf


def truncated_logprobs(logits: Array, temperature: Array, top_k: Array, top_p: Array, *,
                       truncate: bool = True) -> Array:
  """logits [B, V] (fp32), temperature / top_k / top_p [B] -> log-probs [B, V] of the
  distribution each row samples from (-inf outside the kept set; greedy rows: log_softmax).

  truncate=False skips the sort (every row has top_k 0 and top_p >= 1): the same result.
  """
  logits = logits.astype(jnp.float32)
  V = logits.shape[-1]
  greedy = temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
  if truncate:
    desc = -jnp.sort(-scaled, axis=-1)                                        # [B, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)                        # [B]
    ranks = jnp.arange(V)[None, :]
    desc = jnp.where(ranks < k[:, None], desc, _NEG_INF)                      # top-k
    p = jax.nn.softmax(desc, axis=-1)
    # Keep rank r while the mass of the ranks before it is below top_p (rank 0 always).
    keep_rank = (jnp.cumsum(p, axis=-1) - p) < top_p[:, None]
    n_keep = jnp.maximum(jnp.sum(keep_rank & (ranks < k[:, None]), axis=-1), 1)
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)    # [B, 1]
    scaled = jnp.where(scaled >= threshold, scaled, _NEG_INF)
  out = jax.nn.log_softmax(scaled, axis=-1)
  return jnp.where(greedy[:, None], jax.nn.log_softmax(logits, axis=-1), out)


def sample(keys: Array, logits: Array, temperature: Array, top_k: Array, top_p: Array, *,
           truncate: bool = True) -> tuple[Array, Array]:
  """keys [B, 2] (one PRNG key per row), logits [B, V] -> (tokens [B] int32, log-probs [B] fp32
  of those tokens as the module docstring defines them)."""
  logp = truncated_logprobs(logits, temperature, top_k, top_p, truncate=truncate)
  drawn = jax.vmap(jax.random.categorical)(keys, logp)
  tokens = jnp.where(temperature <= 0, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
