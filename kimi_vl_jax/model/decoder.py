"""The Kimi-VL language model: a DeepSeek-V3-style decoder ("Moonlight"), Kimi-VL report sec. 2.1.

    embed -> [first_k_dense_replace dense layers] -> [MoE layers] -> RMSNorm -> lm_head (fp32)

Each layer is pre-norm: `x += MLA(RMSNorm(x))`, `x += FFN(RMSNorm(x))` with FFN a SwiGLU MLP in the
dense layers and `moe.MoE` in the others (transformers' `DeepseekV3DecoderLayer`). The two stacks
are `nn.scan`s over layers (param axis 0, logical name 'layers'), optionally rematerialised with the
config's remat policy; `scan_layers=False` unrolls them into `dense_layers_{i}` / `moe_layers_{i}`
(convert with `stack_layer_params` / `unstack_layer_params`).

Attention, routed experts and the MoE stack's schedule come from the `Kernels` value the model is
given (`model/kernels.py`; default: one device, `nn.scan`). With a `pipeline` in the kernels
(`parallel.kernels.build_kernels` puts a GPipe schedule there when `config.pipeline_stages > 1`)
the MoE stack runs through it over the same stacked parameters: S stages x M microbatches (x R
circular repeats); the dense layers, the final norm and the head stay outside it. Aux statistics
are recombined over the microbatches (`combine_microbatch_aux`) so they equal the unpipelined
ones.

`mode` (`mla.MODES`) adds KV-cache decoding (`docs/sampling.md`): 'prefill' runs the training
computation and also returns every layer's cache entries; 'decode' takes the stacked per-layer
cache `{'c_kv': [L, B, S, R], 'k_rope': [L, B, S, Hr]}` (dense layers first; each scanned layer
gets its slice) and returns the entries of the new tokens in the same layout. No pipeline and
no permuted sequence layout in those modes (the sampler builds kernels without them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.kernels import Kernels, default_kernels
from kimi_vl_jax.model.layers import Einsum, RMSNorm, constrain, default_kernel_init, layer_stack
from kimi_vl_jax.model.mla import MLA
from kimi_vl_jax.model.moe import MLP, MoE

Array = jax.Array
_ACT = ('act_batch', 'act_len', 'act_embed')


class DecoderLayer(nn.Module):
  """One pre-norm block: (x [B, T, D], positions, segment_ids) -> (x, aux or None).

  `kernels` (default `default_kernels(config)`) computes attention and routed experts; `layout`
  is the order of the rows (`Kernels.layout` of the caller).
  """
  config: KimiVLConfig
  moe: bool
  kernels: Kernels | None = None
  layout: str = 'sequence'
  mode: str = 'train'   # mla.MODES; 'prefill' / 'decode' also return (aux, cache entries)
  absorb: bool = True   # decode: weight-absorbed MLA

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array,
               cache: dict[str, Array] | None = None):
    c, t = self.config, self.config.text
    dt, pdt = c.jnp_dtype, c.jnp_param_dtype
    k = default_kernels(c) if self.kernels is None else self.kernels
    norm = lambda name: RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=dt, param_dtype=pdt,
                                name=name)
    mla = MLA(t, dt, pdt, k, self.layout, self.mode, self.absorb, name='self_attn')
    kv = None if cache is None else (cache['c_kv'], cache['k_rope'])
    h = mla(norm('input_layernorm')(x), positions, segment_ids, kv)
    if self.mode != 'train':
      h, (ckv, k_rope) = h
    x = constrain(x + h, _ACT)
    h = norm('post_attention_layernorm')(x)
    if self.moe:
      h, aux = MoE(t, dt, pdt, k, name='mlp')(h, segment_ids)
    else:
      h, aux = MLP(t.hidden_size, t.intermediate_size, dt, pdt, name='mlp')(h), None
    x = constrain(x + h, _ACT)
    if self.mode == 'train':
      return x, aux
    return x, (aux, {'c_kv': ckv, 'k_rope': k_rope})


class LanguageModel(nn.Module):
  """`embed(input_ids) -> [B, T, D]`; `__call__(inputs_embeds, positions, segment_ids)` ->
  (logits [B, T, V] fp32, aux) with aux = {'expert_load': [Lm, E], 'balance_loss': scalar (mean
  over MoE layers of `moe.sequence_balance_loss`)}.

  positions default to 0..T-1 and segment_ids to 1 (one unpadded sequence per row). `kernels`
  defaults to `default_kernels(config)`; `layout` is the order the rows come in ('sequence', or
  the kernels' `sequence_layout.name` when `KimiVL` has permuted them).
  """
  config: KimiVLConfig
  kernels: Kernels | None = None
  layout: str = 'sequence'
  mode: str = 'train'   # mla.MODES (module docstring)
  absorb: bool = True   # decode: weight-absorbed MLA

  def _kernels(self) -> Kernels:
    return default_kernels(self.config) if self.kernels is None else self.kernels

  def _layer_stack(self, moe: bool, length: int):
    """`length` decoder layers: an nn.scan (scan_layers) or a list, remat by the config. In
    decode mode the scan also slices the per-layer cache."""
    c = self.config
    return layer_stack(DecoderLayer, (c, moe, self._kernels(), self.layout, self.mode,
                                      self.absorb),
                       length=length, scan=c.scan_layers, remat=c.remat_policy, broadcast=2,
                       scanned=int(self.mode == 'decode'))

  def setup(self):
    c, t = self.config, self.config.text
    dt, pdt = c.jnp_dtype, c.jnp_param_dtype
    self.embed_tokens = nn.Embed(
        t.vocab_size, t.hidden_size, dtype=dt, param_dtype=pdt,
        embedding_init=nn.with_logical_partitioning(default_kernel_init, ('vocab', 'embed')))
    self.dense_layers = (self._layer_stack(False, t.num_dense_layers)
                         if t.num_dense_layers else [])
    self.moe_layers = self._layer_stack(True, t.num_moe_layers) if t.num_moe_layers else []
    # Final norm output stays fp32 so the logits see no extra rounding.
    self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=jnp.float32, param_dtype=pdt)
    if not t.tie_word_embeddings:
      self.lm_head = Einsum((t.hidden_size, t.vocab_size), ('embed', 'vocab'), dtype=dt,
                            param_dtype=pdt)

  def embed(self, input_ids: Array) -> Array:
    """input_ids int [B, T] -> embeddings [B, T, D] in the compute dtype."""
    return self.embed_tokens(input_ids)

  def _run(self, stack, x: Array, positions: Array, segment_ids: Array, cache=None):
    """Runs a layer stack (scanned module or list); returns (x, stacked per-layer outputs: aux,
    or (aux, cache entries) outside 'train'; None for a dense stack in 'train')."""
    extra = () if cache is None else (cache,)
    if not isinstance(stack, (list, tuple)):
      return stack(x, positions, segment_ids, *extra)
    outs = []
    for i, layer in enumerate(stack):
      x, out = layer(x, positions, segment_ids,
                     *(jax.tree.map(lambda a, i=i: a[i], e) for e in extra))
      outs.append(out)
    if not outs or outs[0] is None:
      return x, None
    return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

  def _run_pipelined(self, x: Array, positions: Array, segment_ids: Array):
    """The MoE stack through the kernels' pipeline over its stacked params; aux as the scan
    would give it."""
    k = self._kernels()
    params = nn.meta.unbox(self.variables['params']['moe_layers'])
    layer = DecoderLayer(self.config, True, k, self.layout, parent=None)
    return k.pipeline(lambda p, h, pos, seg: layer.apply({'params': p}, h, pos, seg), params, x,
                      positions, segment_ids, combine_aux=combine_microbatch_aux)

  def __call__(self, inputs_embeds: Array, positions: Array | None = None,
               segment_ids: Array | None = None, cache: dict[str, Array] | None = None,
               logit_index: Array | None = None):
    """'train': (logits [B, T, V], aux). 'prefill' / 'decode': (logits, aux, cache entries
    {'c_kv': [L, B, T, R], 'k_rope': [L, B, T, Hr]}); `cache` (decode only) is the stacked
    cache [L, B, S, ...]. `logit_index` [B] (optional): logits [B, V] of that token per row
    only (the vocabulary projection of the other tokens is skipped)."""
    c, t = self.config, self.config.text
    if (cache is not None) != (self.mode == 'decode'):
      raise ValueError(f"LanguageModel: a cache is given exactly in 'decode' mode "
                       f'(mode={self.mode!r})')
    if self.mode != 'train' and (self._kernels().pipeline is not None
                                 or self.layout != 'sequence'):
      raise ValueError(f'mode={self.mode!r} runs without a pipeline schedule and in sequence '
                       'order; build the kernels from a config with pipeline_stages=1 and no '
                       'context-parallel rules')
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != t.hidden_size:
      raise ValueError(f'inputs_embeds must be [B, T, {t.hidden_size}], got {inputs_embeds.shape}')
    B, T, _ = inputs_embeds.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    for name, a in (('positions', positions), ('segment_ids', segment_ids)):
      if a.shape != (B, T):
        raise ValueError(f'{name} must be [B, T] = {(B, T)}, got {a.shape}')
    if self.is_initializing() and not t.tie_word_embeddings:
      # Create the table even though only embeddings come in here.
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))

    x = constrain(inputs_embeds.astype(c.jnp_dtype), _ACT)
    Ld = t.num_dense_layers
    layer_cache = lambda lo, hi: (None if cache is None
                                  else jax.tree.map(lambda a: a[lo:hi], cache))
    entries = []
    if Ld:
      x, out = self._run(self.dense_layers, x, positions, segment_ids, layer_cache(0, Ld))
      if self.mode != 'train':
        entries.append(out[1])
    aux = {'expert_load': jnp.zeros((0, t.n_routed_experts), jnp.float32),
           'balance_loss': jnp.zeros((), jnp.float32)}
    if t.num_moe_layers:
      if self._kernels().pipeline is not None and not self.is_initializing():
        x, moe_aux = self._run_pipelined(x, positions, segment_ids)
      else:
        x, moe_aux = self._run(self.moe_layers, x, positions, segment_ids,
                               layer_cache(Ld, t.num_layers))
      if self.mode != 'train':
        moe_aux, moe_entries = moe_aux
        entries.append(moe_entries)
      aux = {'expert_load': moe_aux['expert_load'],
             'balance_loss': moe_aux['balance_loss'].mean()}
    h = self.norm(x)                                                           # [B, T, D] fp32
    if logit_index is not None:
      h = jnp.take_along_axis(h, logit_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    if t.tie_word_embeddings:
      table = self.embed_tokens.embedding.astype(c.jnp_dtype)
      logits = jnp.einsum('...D,VD->...V', h.astype(c.jnp_dtype), table,
                          preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head('...D,DV->...V', h, preferred_element_type=jnp.float32)
    logits = constrain(logits, ('act_batch', 'act_len', 'act_vocab') if logits.ndim == 3
                       else ('act_batch', 'act_vocab'))
    if self.mode == 'train':
      return logits, aux
    return logits, aux, jax.tree.map(lambda *a: jnp.concatenate(a), *entries)


def combine_microbatch_aux(aux: dict[str, Array], segment_ids: Array) -> dict[str, Array]:
  """Per-microbatch MoE aux (leaves [M, L, ...]) -> the whole batch's (leaves [L, ...]); the
  `combine_aux` a `Kernels.pipeline` applies.

  `moe.expert_load` is a fraction of the non-padding tokens' assignments, so the batch value is
  the microbatch values weighted by their non-padding token counts; `moe.sequence_balance_loss`
  is a mean over packed sequences (distinct non-zero segment ids of a row), so it is weighted
  by each microbatch's number of sequences. segment_ids [M, b, T].
  """
  valid = segment_ids != 0
  ids = jnp.sort(segment_ids, axis=-1)              # distinct ids = starts of runs once sorted
  starts = jnp.concatenate([ids[..., :1] != 0, ids[..., 1:] != ids[..., :-1]], axis=-1)
  tokens = valid.sum((1, 2)).astype(jnp.float32)                              # [M]
  seqs = starts.sum((1, 2)).astype(jnp.float32)                               # [M]
  # Elementwise products, not einsums: no reduced-precision matmul passes on TPU.
  load = (aux['expert_load'] * tokens[:, None, None]).sum(0) / jnp.maximum(tokens.sum(), 1.0)
  balance = (aux['balance_loss'] * seqs[:, None]).sum(0) / jnp.maximum(seqs.sum(), 1.0)
  return {'expert_load': load, 'balance_loss': balance}


# ---------------------------------------------------------------------------------------------
# Scanned <-> unrolled parameter layouts (of the `language_model` subtree).

def _stacks(config: KimiVLConfig):
  t = config.text
  return (('dense_layers', t.num_dense_layers), ('moe_layers', t.num_moe_layers))


def stack_layer_params(params: dict, config: KimiVLConfig) -> dict:
  """Unrolled (`dense_layers_{i}`, `moe_layers_{i}`) -> scanned (`dense_layers`, `moe_layers` with
  a leading layer axis). Other entries are passed through; boxed metadata is dropped."""
  out = dict(nn.meta.unbox(params))
  for prefix, n in _stacks(config):
    if not n:
      continue
    names = [f'{prefix}_{i}' for i in range(n)]
    missing = [k for k in names if k not in out]
    if missing:
      raise ValueError(f'stack_layer_params: no {missing} in params (have {sorted(out)})')
    out[prefix] = jax.tree.map(lambda *a: jnp.stack(a), *[out.pop(k) for k in names])
  return out


def unstack_layer_params(params: dict, config: KimiVLConfig) -> dict:
  """Scanned -> unrolled; the inverse of `stack_layer_params`."""
  out = dict(nn.meta.unbox(params))
  for prefix, n in _stacks(config):
    if not n:
      continue
    if prefix not in out:
      raise ValueError(f'unstack_layer_params: no {prefix!r} in params (have {sorted(out)})')
    stacked = out.pop(prefix)
    lengths = {a.shape[0] for a in jax.tree.leaves(stacked)}
    if lengths != {n}:
      raise ValueError(f'unstack_layer_params: {prefix} has leading sizes {lengths}, expected {n}')
    for i in range(n):
      out[f'{prefix}_{i}'] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return out
