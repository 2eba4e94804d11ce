"""Losses of the language-model stages: masked next-token cross-entropy (+ optional z-loss).

Every LM stage of Kimi-VL (joint pre-training, cooldown, long context, SFT, long-CoT SFT;
Kimi-VL report section 2.3) trains the same objective, next-token prediction; they differ in which
tokens count (SFT: assistant turns only), which the data pipeline encodes in `loss_mask`.

The loss is returned as a *sum* over masked tokens together with the token count, so that
gradient accumulation over micro-batches and data-parallel shards divides by the global number of
loss tokens exactly once (a mean of per-micro-batch means would weight short micro-batches up).
Everything here runs in fp32 whatever the logits' dtype.

Chunked cross-entropy (`chunked_cross_entropy_sums`, on when `loss_chunk_tokens > 0`): the model
returns its final-norm hidden states and the LM head runs inside a `lax.scan` over chunks of
positions, each chunk under `jax.checkpoint`, so neither the forward nor the backward ever holds
fp32 logits (or their gradient) for more than one chunk of tokens: at A3B's vocabulary of
163,840 the full `[tokens, vocab]` buffer is 0.66 MB per token. The backward recomputes a chunk's
logits, and the gradients of the hidden states (per chunk) and of the LM head weight (summed over
chunks by the scan's transpose) come out equal to the unchunked ones up to fp32 summation order.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_sums(logits: Array, targets: Array, loss_mask: Array,
                       z_loss_weight: float = 0.0) -> dict[str, Array]:
  """Masked token-level cross-entropy, summed.

  Args:
    logits: [B, T, V] (any float dtype; upcast to fp32).
    targets: int [B, T] next-token ids.
    loss_mask: [B, T], 1 where the target is trained on (0 for prompts, padding, images).
    z_loss_weight: weight of the PaLM z-loss `w * log(Z)^2` per token (0 = off); keeps the
      softmax normaliser near 1 for bf16 logits.
  Returns:
    dict of fp32 scalars: `ce_sum` (sum of -log p(target)), `z_sum` (sum of log(Z)^2, unweighted),
    `loss_sum` (= ce_sum + w * z_sum, what is differentiated), `tokens` (sum of loss_mask),
    `correct` (masked argmax hits).
  """
  logits = logits.astype(jnp.float32)
  mask = loss_mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)                                       # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                     axis=-1)[..., 0]                             # [B, T]
  ce = log_z - target_logit
  z = jnp.square(log_z)
  # where(), not multiply: a masked position with an inf/nan logit must not poison the sum.
  ce_sum = jnp.sum(jnp.where(mask > 0, ce * mask, 0.0))
  z_sum = jnp.sum(jnp.where(mask > 0, z * mask, 0.0))
  correct = jnp.sum(jnp.where(mask > 0, (jnp.argmax(logits, -1) == targets) * mask, 0.0))
  return {'ce_sum': ce_sum, 'z_sum': z_sum, 'loss_sum': ce_sum + z_loss_weight * z_sum,
          'tokens': jnp.sum(mask), 'correct': correct}


def loss_chunks(rows: int, seq_len: int, max_chunk_tokens: int) -> int:
  """The number of chunks n of the sequence axis: the smallest divisor of `seq_len` with
  `rows * seq_len / n <= max_chunk_tokens` (0 = one chunk). Errors if even one position per row
  is too many."""
  if max_chunk_tokens < 0:
    raise ValueError(f'train.loss_chunk_tokens must be >= 0 (0 = unchunked), got '
                     f'{max_chunk_tokens}')
  if max_chunk_tokens == 0 or rows * seq_len <= max_chunk_tokens:
    return 1
  if rows > max_chunk_tokens:
    raise ValueError(f'train.loss_chunk_tokens={max_chunk_tokens} is below the {rows} rows of a '
                     'micro-batch (a chunk holds at least one position of every row); raise it')
  return next(n for n in range(1, seq_len + 1)
              if seq_len % n == 0 and rows * (seq_len // n) <= max_chunk_tokens)


def chunked_cross_entropy_sums(hidden: Array, head: Callable[[Array], Array], targets: Array,
                               loss_mask: Array, num_chunks: int,
                               z_loss_weight: float = 0.0) -> dict[str, Array]:
  """`cross_entropy_sums(head(hidden), ...)` computed over `num_chunks` chunks of positions.

  Args:
    hidden: [B, T, D] final-norm hidden states (`KimiVL(..., return_hidden=True)`).
    head: [B, t, D] -> logits [B, t, V] (`KimiVL.lm_head_logits` with the params closed over).
    targets, loss_mask: [B, T] as in `cross_entropy_sums`.
    num_chunks: n, dividing T. Chunk k holds positions k, k + n, k + 2n, ... of every row (a
      strided split, so a sequence axis sharded in contiguous blocks stays evenly sharded in
      every chunk).
  Returns the dict of `cross_entropy_sums`.
  """
  B, T, D = hidden.shape
  if T % num_chunks:
    raise ValueError(f'{num_chunks} loss chunks do not divide the sequence length {T}')
  if num_chunks == 1:
    return cross_entropy_sums(head(hidden), targets, loss_mask, z_loss_weight)
  t = T // num_chunks
  # [B, T, ...] -> [n, B, t, ...]: position p = i * n + k goes to chunk k, slot i.
  split = lambda x: jnp.moveaxis(x.reshape((B, t, num_chunks) + x.shape[2:]), 2, 0)

  @jax.checkpoint    # saves nothing of the chunk: the backward recomputes its logits
  def one(h, tgt, mask):
    return cross_entropy_sums(head(h), tgt, mask, z_loss_weight)

  def body(acc, xs):
    return jax.tree.map(jnp.add, acc, one(*xs)), None

  zero = {k: jnp.zeros((), jnp.float32)
          for k in ('ce_sum', 'z_sum', 'loss_sum', 'tokens', 'correct')}
  sums, _ = jax.lax.scan(body, zero, (split(hidden), split(targets), split(loss_mask)))
  return sums


def lm_loss(model, params: Any, batch: dict[str, Array], *, z_loss_weight: float = 0.0,
            balance_loss_weight: float = 0.0,
            loss_chunk_tokens: int = 0) -> tuple[Array, dict[str, Array]]:
  """The LM stages' loss function: forward the packed batch, masked CE sums + MoE aux outputs.

  Returns (objective to differentiate, aux) where the objective is a *sum* (see module
  docstring); `aux` holds the sums above plus `expert_load` [L_moe, E] and `balance_loss`.
  The sequence-wise balance loss (DeepSeek-V3, weight 0 by default: Kimi-VL relies on the
  aux-loss-free bias) is per batch, so it is scaled by the batch's token count to sit in the sum.
  `loss_chunk_tokens` > 0: the LM head and the cross-entropy run over chunks of at most that many
  tokens of the batch (`chunked_cross_entropy_sums`, `loss_chunks`); 0: whole-batch logits.
  """
  B, T = batch['input_ids'].shape
  n = loss_chunks(B, T, loss_chunk_tokens)
  out, aux = model.apply(
      {'params': params}, batch['input_ids'], positions=batch.get('positions'),
      segment_ids=batch.get('segment_ids'), patches=batch.get('patches'),
      patch_coords=batch.get('patch_coords'), patch_image_ids=batch.get('patch_image_ids'),
      image_grid_hws=batch.get('image_grid_hws'), return_aux=True,
      return_hidden=loss_chunk_tokens > 0)
  with jax.named_scope('loss'):    # the part `parallel.hlo_cost` attributes FLOPs to
    if loss_chunk_tokens > 0:
      head = lambda h: model.apply({'params': params}, h, method='lm_head_logits')
      sums = chunked_cross_entropy_sums(out, head, batch['targets'], batch['loss_mask'], n,
                                        z_loss_weight)
    else:
      sums = cross_entropy_sums(out, batch['targets'], batch['loss_mask'], z_loss_weight)
  balance = jnp.asarray(aux.get('balance_loss', 0.0), jnp.float32) if aux else jnp.float32(0)
  objective = sums['loss_sum'] + balance_loss_weight * balance * sums['tokens']
  out = dict(sums, balance_loss=balance)
  if aux and 'expert_load' in aux:
    out['expert_load'] = aux['expert_load'].astype(jnp.float32)
  return objective, out
