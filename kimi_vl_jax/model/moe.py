"""DeepSeek-V3 MoE feed-forward (DeepSeekMoE, aux-loss-free balancing), DeepSeek-V3 section 2.1.2.

    h = x + sum_i FFN_shared_i(x) + sum_{i in TopK} g_i FFN_routed_i(x)

Router (fp32): `s = sigmoid(x W_gate)`; experts are *chosen* by `s + b` (b =
`e_score_correction_bias`, the aux-loss-free balancing bias, under stop_gradient, updated by the
trainer with `update_router_bias`), optionally restricted to the `topk_group` best of `n_group`
expert groups (group score = sum of its two best `s + b`); the *weights* are the un-biased `s` of
the chosen experts, renormalised (`norm_topk_prob`, + 1e-20) and multiplied by
`routed_scaling_factor`. This matches transformers' `DeepseekV3TopkRouter` / `DeepseekV3MoE`.

Routed experts are a plain function of (tokens, choices, weights, stacked expert weights): the
`routed_experts` of the `Kernels` the layer is given (`model/kernels.py`), by default the
single-device one `TextConfig.moe_impl` names: 'dropless' (sort by expert + `jax.lax.ragged_dot`),
'dropless_blocked' (the same, with block-padded batched matmuls: XLA:CPU runs `ragged_dot` as a
dense product with every expert, so the CPU `demo` preset uses this one) or 'capacity' (fixed
per-expert buffers, overflow dropped in token order). The expert-parallel names ('ep_*') select
`parallel/expert.py`'s dispatch, which `parallel.kernels.build_kernels` puts in the kernels.

Einsum letters: B batch, T tokens, D model, E experts, K top-k, F ffn width, C capacity slots.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.model.config import TextConfig
from kimi_vl_jax.model.layers import Einsum, constrain, default_kernel_init, param_with_axes

if TYPE_CHECKING:
  from kimi_vl_jax.model.kernels import Kernels

Array = jax.Array


class MLP(nn.Module):
  """SwiGLU feed-forward `down(silu(gate(x)) * up(x))`: the dense layers and the shared experts."""
  hidden_size: int
  intermediate_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    D, F = self.hidden_size, self.intermediate_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Einsum((D, F), ('embed', 'mlp'), name='gate_proj', **kw)('BTD,DF->BTF', x)
    up = Einsum((D, F), ('embed', 'mlp'), name='up_proj', **kw)('BTD,DF->BTF', x)
    h = constrain(jax.nn.silu(gate) * up, ('act_batch', 'act_len', 'act_mlp'))
    return Einsum((F, D), ('mlp', 'embed'), name='down_proj', **kw)('BTF,FD->BTD', h)


# ---------------------------------------------------------------------------------------------
# Router.

def select_experts(scores: Array, bias: Array, *, top_k: int, n_group: int = 1,
                   topk_group: int = 1, norm_topk_prob: bool = True,
                   routed_scaling_factor: float = 1.0) -> tuple[Array, Array]:
  """scores [..., E] fp32 (sigmoid), bias [E] -> (topk_idx int32, topk_weights fp32), both [..., K].

  The bias only affects which experts are chosen (it is stop-gradient'ed here); the weights are the
  chosen experts' raw scores, so gradients reach the router through them.
  """
  E = scores.shape[-1]
  choice = scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
  if n_group > 1:  # node-limited routing: keep the experts of the `topk_group` best groups
    grouped = choice.reshape(choice.shape[:-1] + (n_group, E // n_group))
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)                        # [..., G]
    _, top_groups = jax.lax.top_k(group_scores, topk_group)
    group_mask = jax.nn.one_hot(top_groups, n_group, dtype=jnp.bool_).any(-2)  # [..., G]
    expert_mask = jnp.repeat(group_mask, E // n_group, axis=-1)                 # [..., E]
    choice = jnp.where(expert_mask, choice, -jnp.inf)
  _, topk_idx = jax.lax.top_k(choice, top_k)
  weights = jnp.take_along_axis(scores, topk_idx, axis=-1)
  if norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return topk_idx.astype(jnp.int32), weights * routed_scaling_factor


def check_router_config(t: TextConfig) -> None:
  """Clear errors for routing settings the reference would reject or silently misbehave on."""
  E, G = t.n_routed_experts, t.n_group
  if E % G:
    raise ValueError(f'n_routed_experts={E} is not divisible by n_group={G}')
  if G > 1 and E // G < 2:
    raise ValueError(f'group-limited routing needs >= 2 experts per group (E={E}, n_group={G})')
  if not 1 <= t.topk_group <= G:
    raise ValueError(f'topk_group={t.topk_group} must be in [1, n_group={G}]')
  if not 1 <= t.num_experts_per_tok <= t.topk_group * (E // G):
    raise ValueError(f'num_experts_per_tok={t.num_experts_per_tok} must be in [1, '
                     f'topk_group * E / n_group = {t.topk_group * (E // G)}]')


# ---------------------------------------------------------------------------------------------
# Routed experts: x [T, D] (all tokens flattened), topk_idx / topk_weights [T, K],
# w_gate / w_up [E, D, F], w_down [E, F, D] -> [T, D]. `token_mask` [T] (bool) zeroes padding
# tokens' routed output (and, for 'capacity', keeps them out of the buffers). The per-device
# pieces below (SwiGLU over groups or buffers, capacity slots, the weighted combine) are also the
# bodies of the expert-parallel dispatch (`parallel/expert.py`).

def swiglu_grouped(xs: Array, w_gate: Array, w_up: Array, w_down: Array, group_sizes: Array
                   ) -> Array:
  """Per-group SwiGLU on rows sorted by expert: xs [M, D] -> [M, D] (grouped matmuls,
  `ragged_dot`; group e is the next group_sizes[e] rows, expert e's weights)."""
  gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)                      # [M, F]
  up = jax.lax.ragged_dot(xs, w_up, group_sizes)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [M, D]


def swiglu_batched(h: Array, w_gate: Array, w_up: Array, w_down: Array) -> Array:
  """SwiGLU of G row buffers, each through its own weights: h [G, R, D], w_gate / w_up
  [G, D, F], w_down [G, F, D] -> [G, R, D] (batched matmuls)."""
  gate = jnp.einsum('GRD,GDF->GRF', h, w_gate)
  up = jnp.einsum('GRD,GDF->GRF', h, w_up)
  return jnp.einsum('GRF,GFD->GRD', jax.nn.silu(gate) * up, w_down)


def combine(ys: Array, weights: Array, dtype) -> Array:
  """ys [T, K, D] (each assignment's expert output), weights [T, K] -> [T, D], summed in fp32."""
  return jnp.einsum('TKD,TK->TD', ys.astype(jnp.float32),
                    weights.astype(jnp.float32)).astype(dtype)


def block_rows(num_rows: int, num_experts: int) -> int:
  """Rows per block of `swiglu_blocked`: about num_rows / (8 E), a power of two in [8, 256],
  so per-expert padding costs at most ~1/8 extra compute."""
  target = max(1, num_rows // (8 * num_experts))
  return int(min(256, max(8, 2 ** int(math.log2(target)))))


def swiglu_blocked(xs: Array, w_gate: Array, w_up: Array, w_down: Array, group_sizes: Array
                   ) -> Array:
  """The same function as `swiglu_grouped`, as batched matmuls over fixed-size row blocks.

  Each expert's rows are padded to a multiple of the block size, so every block belongs to one
  expert; a block multiplies by its expert's gathered weights. Static shapes: at most
  ceil(M / block) + E blocks. XLA:CPU lowers `ragged_dot` to a dense product with every expert
  (E times the work); this costs M + about E * block rows instead. The gathered weights are
  [blocks, D, F], so this suits small models (the CPU configs), not the full model on TPU.
  """
  M, D = xs.shape
  E = w_gate.shape[0]
  b = block_rows(M, E)
  nb = -(-M // b) + E
  padded = (group_sizes + b - 1) // b * b                                 # [E]
  pad_end = jnp.cumsum(padded)
  start = jnp.cumsum(group_sizes) - group_sizes
  row_e = jnp.repeat(jnp.arange(E), group_sizes, total_repeat_length=M)  # expert of sorted row
  dest = (pad_end - padded)[row_e] + jnp.arange(M) - start[row_e]        # row -> padded slot
  buf = jnp.zeros((nb * b, D), xs.dtype).at[dest].set(xs, unique_indices=True).reshape(nb, b, D)
  block_e = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(nb) * b, side='right'), E - 1)
  out = swiglu_batched(buf, w_gate[block_e], w_up[block_e], w_down[block_e])
  return out.reshape(nb * b, D)[dest]


def inverse_permutation(perm: Array) -> Array:
  """`inv` [n] with `inv[perm[i]] = i`, for a permutation `perm` [n] (a 1-D integer scatter)."""
  n = perm.shape[0]
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(n, dtype=perm.dtype), unique_indices=True)


@jax.custom_vjp
def permute_rows(x: Array, perm: Array, inv: Array) -> Array:
  """`x[perm]` for a permutation `perm` of x's rows whose inverse is `inv`.

  Forward and backward are both row gathers: the cotangent goes back as `g[inv]` (autodiff would
  transpose the gather into a scatter-add). Un-permuting is `permute_rows(y, inv, perm)`.
  """
  return x[perm]


def _permute_rows_fwd(x, perm, inv):
  return x[perm], (perm, inv)


def _permute_rows_bwd(res, g):
  perm, inv = res
  return g[inv], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def sort_by_expert(x: Array, flat_e: Array, K: int) -> tuple[Array, Array, Array]:
  """The T*K assignments (token-major, expert ids `flat_e` [T*K]) of tokens x [T, D] sorted by
  expert: (rows [T*K, D], order, inv) with `rows = repeat(x, K)[order]`; `permute_rows(y, inv,
  order)` puts per-row results back in token-major order. The K copies of a token are a
  broadcast, so the gradient sums them with a reshape instead of a scatter-add."""
  order = jnp.argsort(flat_e, stable=True)
  inv = inverse_permutation(order)
  return permute_rows(jnp.repeat(x, K, axis=0), order, inv), order, inv


def routed_experts_dropless(x: Array, topk_idx: Array, topk_weights: Array, w_gate: Array,
                            w_up: Array, w_down: Array, *, token_mask: Array | None = None,
                            capacity_factor: float | None = None, dtype=jnp.float32,
                            grouped: Callable = swiglu_grouped) -> Array:
  """Every assignment is computed: sort the T*K (token, expert) pairs by expert, run grouped
  matmuls (`ragged_dot`, or `grouped`), unsort (a gather by the inverse permutation) and combine
  with the router weights (in fp32)."""
  del capacity_factor
  T, K = topk_idx.shape
  E = w_gate.shape[0]
  flat_e = topk_idx.reshape(-1)                                    # [T*K], token-major
  xs, order, inv = sort_by_expert(jnp.asarray(x, dtype), flat_e, K)   # [T*K, D] by expert
  group_sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
  ys = grouped(xs, w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype), group_sizes)
  ys = permute_rows(ys, inv, order).reshape(T, K, -1)
  weights = topk_weights.astype(jnp.float32)
  if token_mask is not None:
    weights = weights * token_mask[:, None]
  return combine(ys, weights, dtype)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert: ceil(capacity_factor * tokens * k / E)."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_dispatch(x: Array, topk_idx: Array, token_mask: Array, num_experts: int,
                      capacity: int, dtype) -> tuple[Array, tuple[Array, Array, Array]]:
  """Fixed buffers [E, C, D]: assignment (t, k) takes the next free slot of its expert in
  token-major order; once an expert is full, later assignments are dropped.

  Returns (buffers, slots) with slots = (expert [T*K], slot [T*K] (C = dropped), keep [T*K]),
  which `capacity_combine` uses to read each assignment's output back.
  """
  T, K = topk_idx.shape
  E, C = num_experts, capacity
  flat_e = topk_idx.reshape(-1)                                               # [T*K]
  valid = jnp.repeat(token_mask.astype(jnp.bool_), K)
  onehot = jax.nn.one_hot(flat_e, E, dtype=jnp.int32) * valid[:, None]       # [T*K, E]
  slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), flat_e[:, None], 1)[:, 0] - 1
  keep = valid & (slot < C)
  slot = jnp.where(keep, slot, C)                                             # C = out of bounds
  buf = jnp.zeros((E, C, x.shape[-1]), dtype).at[flat_e, slot].set(
      jnp.asarray(x, dtype)[jnp.arange(T * K) // K], mode='drop')             # [E, C, D]
  return buf, (flat_e, slot, keep)


def capacity_combine(out: Array, slots: tuple[Array, Array, Array], topk_weights: Array,
                     dtype) -> Array:
  """out [E, C, D] (the experts' outputs of `capacity_dispatch`'s buffers) -> [T, D]; dropped
  assignments contribute 0 (the residual and shared experts still carry the token)."""
  flat_e, slot, keep = slots
  T, K = topk_weights.shape
  ys = out.at[flat_e, slot].get(mode='fill', fill_value=0).reshape(T, K, -1)
  return combine(ys, topk_weights.astype(jnp.float32) * keep.reshape(T, K), dtype)


def routed_experts_capacity(x: Array, topk_idx: Array, topk_weights: Array, w_gate: Array,
                            w_up: Array, w_down: Array, *, token_mask: Array | None = None,
                            capacity_factor: float = 1.25, dtype=jnp.float32) -> Array:
  """Fixed [E, C, D] buffers (C from `expert_capacity`, slots by `capacity_dispatch`), overflow
  dropped in token order."""
  T, K = topk_idx.shape
  E = w_gate.shape[0]
  C = expert_capacity(T, K, E, capacity_factor)
  mask = jnp.ones((T,), jnp.bool_) if token_mask is None else token_mask
  buf, slots = capacity_dispatch(x, topk_idx, mask, E, C, dtype)
  out = swiglu_batched(buf, w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype))
  return capacity_combine(out, slots, topk_weights, dtype)


RoutedExpertsFn = Callable[..., Array]
# The single-device implementations, by `TextConfig.moe_impl`.
LOCAL_ROUTED_EXPERTS: dict[str, RoutedExpertsFn] = {
    'dropless': routed_experts_dropless,
    # Exactly 'dropless', with block-padded batched matmuls instead of `ragged_dot` (fast on CPU).
    'dropless_blocked': functools.partial(routed_experts_dropless, grouped=swiglu_blocked),
    'capacity': routed_experts_capacity,
}
# `moe_impl` names of the expert-parallel dispatch (`parallel/expert.py`, selected by
# `parallel.kernels.build_kernels` on a mesh with an 'expert' axis > 1) and the single-device
# computation each equals.
EXPERT_PARALLEL_IMPLS = {'ep_dropless': 'dropless', 'ep_ragged': 'dropless',
                         'ep_capacity': 'capacity'}


def local_routed_experts(moe_impl: str) -> RoutedExpertsFn:
  """The single-device routed-experts function of `TextConfig.moe_impl` (an expert-parallel
  name gives the computation it distributes)."""
  name = EXPERT_PARALLEL_IMPLS.get(moe_impl, moe_impl)
  if name not in LOCAL_ROUTED_EXPERTS:
    raise ValueError(f'unknown moe_impl {moe_impl!r}; choose one of '
                     f'{sorted(LOCAL_ROUTED_EXPERTS) + sorted(EXPERT_PARALLEL_IMPLS)}')
  return LOCAL_ROUTED_EXPERTS[name]


def routed_experts(x: Array, topk_idx: Array, topk_weights: Array, w_gate: Array, w_up: Array,
                   w_down: Array, *, impl: str = 'dropless', **kw) -> Array:
  """`local_routed_experts(impl)` applied to the arguments."""
  return local_routed_experts(impl)(x, topk_idx, topk_weights, w_gate, w_up, w_down, **kw)


# ---------------------------------------------------------------------------------------------
# Balancing statistics and the aux-loss-free bias update.

def expert_load(topk_idx: Array, num_experts: int, token_mask: Array) -> Array:
  """Fraction of the routed assignments of non-padding tokens that went to each expert: [E].

  topk_idx [..., K], token_mask [...] (bool). Sums to 1 (all zeros if there is no real token).
  """
  onehot = jax.nn.one_hot(topk_idx, num_experts, dtype=jnp.float32)          # [..., K, E]
  counts = jnp.einsum('...KE,...->E', onehot, token_mask.astype(jnp.float32))
  return counts / jnp.maximum(counts.sum(), 1.0)


def sequence_balance_loss(scores: Array, topk_idx: Array, segment_ids: Array) -> Array:
  """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), mean over sequences.

  Per packed sequence (the tokens of one row sharing a non-zero segment id; they need not be
  contiguous, so the load-balanced context-parallel layout gives the same value) of T tokens:
  `f_i = E / (K T) * #{t: i chosen for t}`, `P_i = mean_t s_it / sum_j s_jt`, loss = `sum_i f_i P_i`
  (1 when perfectly balanced). Multiply by the balance factor alpha in the trainer. f_i counts the
  experts actually chosen (with the bias), as the trainer's routing does.
  scores [B, T, E] fp32, topk_idx [B, T, K], segment_ids [B, T] -> scalar.
  """
  B, T, E = scores.shape
  K = topk_idx.shape[-1]
  n = B * (T + 1)
  # One bucket per (row, segment id); padding (id 0) goes to an extra bucket that is dropped.
  segment_ids = segment_ids.astype(jnp.int32)
  key = jnp.arange(B)[:, None] * (T + 1) + segment_ids
  run = jnp.where(segment_ids != 0, key, n).reshape(-1)
  chosen = jax.nn.one_hot(topk_idx, E, dtype=jnp.float32).sum(-2)            # [B, T, E]
  probs = scores / scores.sum(-1, keepdims=True)
  count = jax.ops.segment_sum(chosen.reshape(B * T, E), run, n)             # [n, E]
  prob_sum = jax.ops.segment_sum(probs.reshape(B * T, E), run, n)
  length = jax.ops.segment_sum(jnp.ones((B * T,), jnp.float32), run, n)     # [n]
  inv_len = 1.0 / jnp.maximum(length, 1.0)
  f = count * (E / K) * inv_len[:, None]
  p = prob_sum * inv_len[:, None]
  per_seq = (f * p).sum(-1)
  has = length > 0
  return jnp.where(has, per_seq, 0.0).sum() / jnp.maximum(has.sum(), 1)


def update_router_bias(bias: Array, load: Array, rate: float) -> Array:
  """DeepSeek-V3's aux-loss-free rule: `b_i += rate * sign(mean(load) - load_i)` (per layer).

  bias, load [..., E] (e.g. [Lm, E] for the stacked MoE layers); under-loaded experts get a larger
  bias and so are chosen more often.
  """
  load = load.astype(jnp.float32)
  delta = jnp.sign(load.mean(-1, keepdims=True) - load)
  return (bias.astype(jnp.float32) + rate * delta).astype(bias.dtype)


# ---------------------------------------------------------------------------------------------

class Router(nn.Module):
  """`gate/kernel [D, E]` and `gate/e_score_correction_bias [E]`; everything in fp32."""
  num_experts: int
  hidden_size: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    """x [B, T, D] -> (sigmoid scores [B, T, E] fp32, bias [E] fp32)."""
    # Replicated (no 'expert' axis): the router is tiny and top-k wants all experts locally.
    kernel = param_with_axes(self, 'kernel', default_kernel_init,
                             (self.hidden_size, self.num_experts), self.param_dtype,
                             ('embed', None))
    bias = param_with_axes(self, 'e_score_correction_bias', nn.initializers.zeros,
                           (self.num_experts,), jnp.float32, (None,))
    logits = jnp.einsum('BTD,DE->BTE', x.astype(jnp.float32), kernel.astype(jnp.float32))
    return jax.nn.sigmoid(logits), bias.astype(jnp.float32)


class MoE(nn.Module):
  """x [B, T, D], segment_ids [B, T] -> (y [B, T, D], aux).

  aux = {'expert_load': [E] (fraction of non-padding assignments per expert),
         'balance_loss': scalar (`sequence_balance_loss`)}.
  """
  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  # `Kernels` (model/kernels.py) whose `routed_experts` computes the experts; None: the
  # single-device function of `config.moe_impl`.
  kernels: Kernels | None = None

  @nn.compact
  def __call__(self, x: Array, segment_ids: Array) -> tuple[Array, dict[str, Array]]:
    t = self.config
    check_router_config(t)
    B, T, D = x.shape
    E, F, K = t.n_routed_experts, t.moe_intermediate_size, t.num_experts_per_tok
    scores, bias = Router(E, D, self.param_dtype, name='gate')(x)
    topk_idx, topk_weights = select_experts(
        scores, bias, top_k=K, n_group=t.n_group, topk_group=t.topk_group,
        norm_topk_prob=t.norm_topk_prob, routed_scaling_factor=t.routed_scaling_factor)

    w_gate, w_up, w_down = _ExpertWeights(E, D, F, self.param_dtype, name='experts')()
    token_mask = segment_ids != 0
    experts = (local_routed_experts(t.moe_impl) if self.kernels is None
               else self.kernels.routed_experts)
    y = experts(x.reshape(B * T, D), topk_idx.reshape(B * T, K), topk_weights.reshape(B * T, K),
                w_gate, w_up, w_down, token_mask=token_mask.reshape(B * T),
                capacity_factor=t.capacity_factor, dtype=self.dtype).reshape(B, T, D)
    if t.n_shared_experts:
      y = y + MLP(D, F * t.n_shared_experts, self.dtype, self.param_dtype,
                  name='shared_experts')(x)
    aux = {'expert_load': expert_load(topk_idx, E, token_mask),
           'balance_loss': sequence_balance_loss(scores, topk_idx, segment_ids)}
    return constrain(y, ('act_batch', 'act_len', 'act_embed')), aux


class _ExpertWeights(nn.Module):
  """`experts/{gate_proj, up_proj}` [E, D, F] and `experts/down_proj` [E, F, D]."""
  num_experts: int
  hidden_size: int
  intermediate_size: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[Array, Array, Array]:
    E, D, F = self.num_experts, self.hidden_size, self.intermediate_size
    up_axes, down_axes = ('expert', 'embed', 'expert_mlp'), ('expert', 'expert_mlp', 'embed')
    return (param_with_axes(self, 'gate_proj', default_kernel_init, (E, D, F), self.param_dtype,
                            up_axes),
            param_with_axes(self, 'up_proj', default_kernel_init, (E, D, F), self.param_dtype,
                            up_axes),
            param_with_axes(self, 'down_proj', default_kernel_init, (E, F, D), self.param_dtype,
                            down_axes))
