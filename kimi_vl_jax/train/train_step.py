"""The train state and the one train step shared by every LM stage.

`train_step(state, batch) -> (state, metrics)` is pure; `jit_train_step` jits it with in/out
shardings and a donated state, for the loop and the AOT planner alike. What differs between
stages comes in from the config, never from branches here: the loss function (`losses.lm_loss`
for all LM stages), the trainable mask (e.g. the LLM frozen while the vision tower and projector
align) and the optimizer.

One step:
1. split the global batch into `grad_accum` micro-batches and `lax.scan` over them, summing the
   loss numerators, token counts and fp32 gradients (frozen parameters get `stop_gradient`, so
   no gradient is even computed for them);
2. divide by the global number of loss tokens (exact token-weighted mean over accumulation);
3. optimizer update (Moonlight Muon + AdamW, `kimi_vl_jax.optim`);
4. MoE aux-loss-free balancing: the routers' `e_score_correction_bias` moves by
   `rate * sign(mean load - load)` (DeepSeek-V3; `model.moe.update_router_bias`) from the
   step's expert load, outside the gradient;
5. if the loss or any gradient is non-finite, keep the old parameters and optimizer state
   (bitwise) and count the skip.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kimi_vl_jax.data.batch import BatchSpec
from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.model.moe import update_router_bias
from kimi_vl_jax.optim.muon import path_str, trainable_fn
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels
from kimi_vl_jax.train import losses

Array = jax.Array
ROUTER_BIAS_PATH = ('language_model', 'moe_layers', 'mlp', 'gate', 'e_score_correction_bias')
COUNTERS = ('skipped_steps', 'nonfinite_loss', 'nonfinite_grads')


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue bitwise (with the data iterator state).

  step: int32 number of completed train steps (skipped ones included).
  params: plain (unboxed) parameter tree, router biases included (docs/param_tree.md).
  opt_state: the optax state.
  rng: uint32 [2] raw PRNG key (from the seed) for stochastic parts of a loss; no loss has one
    yet, so the step carries it unchanged.
  counters: int32 scalars named in COUNTERS.
  """
  step: Array
  params: Any
  opt_state: Any
  rng: Array
  counters: dict[str, Array]


def new_counters() -> dict[str, Array]:
  return {k: jnp.zeros((), jnp.int32) for k in COUNTERS}


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static options of the step (from `config.train`)."""
  grad_accum: int = 1
  z_loss_weight: float = 0.0
  balance_loss_weight: float = 0.0
  router_bias_rate: float = 1e-3      # 0 disables the aux-loss-free bias update
  # Chunked cross-entropy: at most this many tokens of a micro-batch (all its rows, as the step
  # function sees them) have logits at once; 0 = whole-batch logits (`losses.lm_loss`).
  loss_chunk_tokens: int = 0

  @classmethod
  def from_config(cls, train_cfg, token_shards: int = 1) -> 'StepOptions':
    """Reads the step options of a stage config's `train` section (missing ones default).

    `train.loss_chunk_tokens` counts tokens per device; `token_shards` (the number of devices a
    micro-batch's tokens are split over: batch x context shards) turns it into the step's count.
    """
    d = cls()
    chunk = int(train_cfg.get('loss_chunk_tokens', d.loss_chunk_tokens))
    if chunk < 0:
      raise ValueError(f'train.loss_chunk_tokens must be >= 0 (0 = unchunked), got {chunk}')
    return cls(grad_accum=int(train_cfg.get('grad_accum', d.grad_accum)),
               z_loss_weight=float(train_cfg.get('z_loss_weight', d.z_loss_weight)),
               balance_loss_weight=float(train_cfg.get('balance_loss_weight',
                                                       d.balance_loss_weight)),
               router_bias_rate=float(train_cfg.get('router_bias_rate', d.router_bias_rate)),
               loss_chunk_tokens=chunk * int(token_shards))


def _get_path(tree, path):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _set_path(tree, path, value):
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set_path(tree[path[0]], path[1:], value)}


def _split_micro(batch: dict[str, Array], n: int) -> dict[str, Array]:
  """[B, ...] -> [n, B/n, ...]; row i of micro-batch k is global row k*(B/n) + i."""
  def one(k, x):
    if x.shape[0] % n:
      raise ValueError(f'batch[{k!r}] has {x.shape[0]} rows, not divisible by grad_accum={n}')
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return {k: one(k, v) for k, v in batch.items()}


def _all_finite(tree) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(model, tx: optax.GradientTransformation, opts: StepOptions,
                    trainable: Any = None, lr_fn: Callable | None = None,
                    loss_fn: Callable = losses.lm_loss) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)` (not jitted; the loop jits it).

  Args:
    model: the Linen model (`KimiVL(config)`).
    tx: optimizer over the plain params tree (frozen leaves must get zero updates, as
      `optim.make_optimizer(..., trainable=...)` does).
    opts: StepOptions.
    trainable: pytree of Python bools with the params' structure (None = all train). Frozen
      leaves are held under `stop_gradient`; the router bias only moves if it is trainable.
    lr_fn: schedule `step -> lr`, only for the `lr` metric.
    loss_fn: `(model, params, micro_batch, *, z_loss_weight, balance_loss_weight,
      loss_chunk_tokens) -> (objective_sum, aux)` with aux holding at least `ce_sum`, `z_sum`,
      `tokens`, `correct` and optionally `expert_load` and `metric_sums` (a dict of further
      token-weighted sums, reported divided by the tokens like the loss, e.g. the SigLIP and
      caption terms of MoonViT pre-training).
  """
  bias_trains = True
  if trainable is not None:
    bias_trains = bool(_get_path(trainable, ROUTER_BIAS_PATH)) if _get_path(
        trainable, ROUTER_BIAS_PATH) is not None else False

  def freeze(params):
    if trainable is None:
      return params
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)

  def micro_loss(params, micro):
    return loss_fn(model, freeze(params), micro, z_loss_weight=opts.z_loss_weight,
                   balance_loss_weight=opts.balance_loss_weight,
                   loss_chunk_tokens=opts.loss_chunk_tokens)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def accumulate(params, batch):
    if opts.grad_accum == 1:
      (_, aux), grads = grad_fn(params, batch)
      return grads, aux
    micro = _split_micro(batch, opts.grad_accum)

    def body(carry, mb):
      g_acc, a_acc = carry
      (_, aux), g = grad_fn(params, mb)
      g_acc = jax.tree.map(lambda x, y: x + y.astype(jnp.float32), g_acc, g)
      a_acc = jax.tree.map(jnp.add, a_acc, aux)
      return (g_acc, a_acc), None

    g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    a0 = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro))[0][1])
    a0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), a0)
    (grads, aux), _ = jax.lax.scan(body, (g0, a0), micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if 'expert_load' in aux:
      aux['expert_load'] = aux['expert_load'] / opts.grad_accum
    aux['balance_loss'] = aux['balance_loss'] / opts.grad_accum
    return grads, aux

  def train_step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
    grads, aux = accumulate(state.params, batch)
    n_tok = jnp.maximum(aux['tokens'], 1.0)
    grads = jax.tree.map(lambda g: (g / n_tok).astype(g.dtype), grads)
    loss = aux['loss_sum'] / n_tok

    loss_ok = jnp.isfinite(loss)
    grads_ok = _all_finite(grads)
    ok = loss_ok & grads_ok
    # A non-finite gradient would turn the optimizer state into NaNs even if discarded by the
    # select below under some reductions; feed zeros instead (the result is discarded anyway).
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    with jax.named_scope('optimizer'):  # the part `parallel.hlo_cost` attributes FLOPs to
      updates, new_opt = tx.update(safe_grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)

    load = aux.get('expert_load')
    bias = _get_path(state.params, ROUTER_BIAS_PATH)
    if bias is not None and load is not None and bias_trains and opts.router_bias_rate > 0:
      new_params = _set_path(new_params, ROUTER_BIAS_PATH,
                             update_router_bias(bias, load, opts.router_bias_rate))

    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    counters = dict(state.counters)
    counters['skipped_steps'] = counters['skipped_steps'] + (~ok).astype(jnp.int32)
    counters['nonfinite_loss'] = counters['nonfinite_loss'] + (~loss_ok).astype(jnp.int32)
    counters['nonfinite_grads'] = counters['nonfinite_grads'] + (~grads_ok).astype(jnp.int32)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state), rng=state.rng,
                           counters=counters)

    metrics = {
        'loss': loss,
        'ce_loss': aux['ce_sum'] / n_tok,
        'z_loss': aux['z_sum'] / n_tok,
        'token_accuracy': aux['correct'] / n_tok,
        'loss_tokens': aux['tokens'],
        'grad_norm': jnp.where(ok, optax.global_norm(safe_grads), jnp.nan),
        'update_norm': optax.global_norm(jax.tree.map(lambda n, o: n - o, new_state.params,
                                                      state.params)),
        'param_norm': optax.global_norm(new_state.params),
        'balance_loss': aux['balance_loss'],
        'skipped': (~ok).astype(jnp.int32),
        **{f'counters/{k}': v for k, v in counters.items()},
    }
    metrics.update({k: v / n_tok for k, v in aux.get('metric_sums', {}).items()})
    if lr_fn is not None:
      metrics['lr'] = lr_fn(state.step - state.counters['skipped_steps'])
    if load is not None:
      mean = jnp.maximum(load.mean(-1), 1e-9)                     # [L_moe]
      metrics['moe/max_load_over_mean'] = jnp.mean(load.max(-1) / mean)
      metrics['moe/min_load_over_mean'] = jnp.mean(load.min(-1) / mean)
      metrics['moe/load_cv'] = jnp.mean(load.std(-1) / mean)
    return new_state, metrics

  return train_step


def jit_train_step(factory, mc, train_cfg, batch: BatchSpec) -> Callable:
  """The config's train step, jitted for `factory.mesh`: the state in and out with the factory's
  shardings (donated), every batch array split by rows over the rule preset's `act_batch` axes.

  factory: `train.init.StateFactory` of the run (optimizer, trainable mask, shardings);
  mc: the phase's `KimiVLConfig`; train_cfg: the config's `train` section; batch: its BatchSpec.
  Trace it (first call or `.lower`) under `rules.sharding_context(factory.mesh, factory.rules)`.
  """
  # The model of this phase, with the kernels (attention, expert dispatch, pipeline, context
  # layout) its mesh and rules call for.
  model = KimiVL(mc, kernels=build_kernels(mc, factory.mesh, factory.rules))
  token_axes = (rules_lib.mesh_axes_of(factory.rules, 'act_batch')
                + rules_lib.mesh_axes_of(factory.rules, 'act_len'))
  token_shards = math.prod(factory.mesh.shape[a] for a in dict.fromkeys(token_axes))
  step_fn = make_train_step(model, factory.tx, StepOptions.from_config(train_cfg, token_shards),
                            trainable=factory.trainable, lr_fn=factory.lr_fn)
  bsh = rules_lib.batch_sharding(factory.mesh, factory.rules)
  return jax.jit(step_fn, in_shardings=(factory.shardings, {k: bsh for k in batch.keys}),
                 out_shardings=(factory.shardings, None), donate_argnums=0)


def trainable_tree(params, trainable_patterns=None, frozen_patterns=()) -> Any:
  """Pytree of bools: a leaf trains if it matches any `trainable_patterns` regex (None = all)
  and none of `frozen_patterns` (`optim.muon.trainable_fn`, the rule the optimizer groups by)."""
  is_trainable = trainable_fn(trainable_patterns, frozen_patterns)
  return jax.tree_util.tree_map_with_path(lambda path, _: is_trainable(path_str(path)), params)
