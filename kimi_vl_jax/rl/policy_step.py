"""The RL optimizer step: the mirror-descent surrogate (`rl/mirror_descent.py`) through the train
stack's step (`train/train_step.py`: gradient accumulation, frozen leaves, Muon / AdamW, skip on
non-finite), and the teacher-forced log-probs of pi_i computed once per iteration.

An RL batch is an LM batch (`data/batch.py`: one response per row, prompt + response as one
segment; `loss_mask` 1 on the response tokens this iteration's policy sampled) plus

| key        | shape  | dtype   | meaning                                                   |
|------------|--------|---------|-----------------------------------------------------------|
| `old_logp` | [B, T] | float32 | log pi_i(target), from `token_logprobs` before any update  |
| `rewards`  | [B]    | float32 | the response's total reward                                |
| `valid`    | [B]    | float32 | 1 for a real response, 0 for a padding group's rows        |

with a prompt's k responses in k consecutive rows. The surrogate is normalised by the number of
valid prompt groups (the step's `tokens` normaliser counts groups here).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from kimi_vl_jax.rl.mirror_descent import MirrorDescentConfig, mirror_descent_sums
from kimi_vl_jax.train.train_step import StepOptions, make_train_step

Array = jax.Array
RL_KEYS = ('old_logp', 'rewards', 'valid')


def token_logprobs(model, params: Any, batch: dict[str, Array]) -> tuple[Array, Array]:
  """Teacher-forced log-prob of each row's `targets` and the entropy of the next-token
  distribution, both fp32 [B, T] (temperature 1: the policy itself, not the sampling
  distribution)."""
  logits = model.apply(
      {'params': params}, batch['input_ids'], positions=batch.get('positions'),
      segment_ids=batch.get('segment_ids'), patches=batch.get('patches'),
      patch_coords=batch.get('patch_coords'), patch_image_ids=batch.get('patch_image_ids'),
      image_grid_hws=batch.get('image_grid_hws')).astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, batch['targets'][..., None].astype(jnp.int32), -1)[..., 0]
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = log_z - jnp.sum(probs * logits, axis=-1)
  return target - log_z, entropy


def policy_loss(model, params: Any, batch: dict[str, Array], *, k: int,
                md: MirrorDescentConfig, **_) -> tuple[Array, dict[str, Array]]:
  """`make_train_step`'s loss_fn for RL: (surrogate sum, aux) with aux['tokens'] = groups."""
  logp, _ = token_logprobs(model, params, batch)
  s = mirror_descent_sums(logp, batch['old_logp'], batch['loss_mask'], batch['rewards'], k, md)
  groups = jnp.sum(batch['valid'].astype(jnp.float32)) / k
  zero = jnp.zeros((), jnp.float32)
  return s['loss_sum'], {'loss_sum': s['loss_sum'], 'ce_sum': s['loss_sum'], 'z_sum': zero,
                         'tokens': groups, 'correct': zero, 'balance_loss': zero}


def make_policy_step(model, tx, *, k: int, md: MirrorDescentConfig, grad_accum: int = 1,
                     trainable=None, lr_fn=None):
  """`step(state, rl_batch) -> (state, metrics)` (not jitted). The MoE routers' aux-loss-free
  bias stays fixed during RL (router_bias_rate 0): routing then depends on parameters the
  surrogate differentiates only."""
  opts = StepOptions(grad_accum=grad_accum, router_bias_rate=0.0)
  return make_train_step(model, tx, opts, trainable=trainable, lr_fn=lr_fn,
                         loss_fn=functools.partial(policy_loss, k=k, md=md))


def minibatch_groups(num_groups: int, groups_per_step: int, grad_accum: int = 1) -> list[int]:
  """How many groups each optimizer step of an iteration holds, and the rows (/ k) its batch is
  padded to: full steps of `groups_per_step`, then the rest in the smallest of
  `groups_per_step / 4, / 2, / 1` that holds it (multiples of `grad_accum`), so a short last
  step does not pay for a full batch of padding and the step compiles for at most three shapes.
  Returns one padded size per step: `[groups_per_step] * full + [last bucket]`."""
  if num_groups <= 0:
    return []
  full, rest = divmod(num_groups, groups_per_step)
  sizes = [groups_per_step] * full
  if rest:
    buckets = sorted({b for b in (groups_per_step // 4, groups_per_step // 2, groups_per_step)
                      if b > 0 and b % grad_accum == 0})
    sizes.append(next(b for b in buckets if b >= rest))
  return sizes

