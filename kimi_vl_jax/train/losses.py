"""Losses of the language-model stages: masked next-token cross-entropy (+ optional z-loss).

Every LM stage of Kimi-VL (joint pre-training, cooldown, long context, SFT, long-CoT SFT;
Kimi-VL report section 2.3) trains the same objective, next-token prediction; they differ in which
tokens count (SFT: assistant turns only), which the data pipeline encodes in `loss_mask`.

The loss is returned as a *sum* over masked tokens together with the token count, so that
gradient accumulation over micro-batches and data-parallel shards divides by the global number of
loss tokens exactly once (a mean of per-micro-batch means would weight short micro-batches up).
Everything here runs in fp32 whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Any

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


def lm_loss(model, params: Any, batch: dict[str, Array], *, z_loss_weight: float = 0.0,
            balance_loss_weight: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """The LM stages' loss function: forward the packed batch, masked CE sums + MoE aux outputs.

  Returns (objective to differentiate, aux) where the objective is a *sum* (see module
  docstring); `aux` holds the sums above plus `expert_load` [L_moe, E] and `balance_loss`.
  The sequence-wise balance loss (DeepSeek-V3, weight 0 by default: Kimi-VL relies on the
  aux-loss-free bias) is per batch, so it is scaled by the batch's token count to sit in the sum.
  """
  logits, aux = model.apply(
      {'params': params}, batch['input_ids'], positions=batch.get('positions'),
      segment_ids=batch.get('segment_ids'), patches=batch.get('patches'),
      patch_coords=batch.get('patch_coords'), patch_image_ids=batch.get('patch_image_ids'),
      image_grid_hws=batch.get('image_grid_hws'), return_aux=True)
  with jax.named_scope('loss'):    # the part `parallel.hlo_cost` attributes FLOPs to
    sums = cross_entropy_sums(logits, batch['targets'], batch['loss_mask'], z_loss_weight)
  balance = jnp.asarray(aux.get('balance_loss', 0.0), jnp.float32) if aux else jnp.float32(0)
  objective = sums['loss_sum'] + balance_loss_weight * balance * sums['tokens']
  out = dict(sums, balance_loss=balance)
  if aux and 'expert_load' in aux:
    out['expert_load'] = aux['expert_load'].astype(jnp.float32)
  return objective, out
