"""KV-cache decoding for Kimi-VL: prefill once, then decode token by token in a `lax.while_loop`.

    prompts -> prefill (training-form attention over the bucketed prompt batch; MoonViT and
               the projector once per prompt) -> cache rows, repeated n times per prompt
            -> first token sampled from each row's last prompt logits
            -> while not every row is done: decode one token per row (MLA over the latent
               cache, absorbed by default), sample, write, check the row's stop set / budget.

The loop's state is the flax struct `SamplerState`; `decode_loop` is jitted with the state
donated, so the cache is updated in place. Cache layout, absorption and the state's fields:
`docs/sampling.md`. The model side (`mode='prefill' | 'decode'`) is `model/mla.py`,
`model/decoder.py`, `model/kimi_vl.py`.

Per row: its own length (cache slot of the next token = its position), stop-token set, token
budget, temperature / top-k / top-p and PRNG key (seed, sample index), so each row stops on its
own and a sample reproduces whatever it is batched with. MoE routing is dropless at decode
(`sampling_config`), else sampler and trainer log-probs would disagree.

Einsum letters: L layers, B rows, S cache slots, R kv lora rank, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.kimi_vl import KimiVL
from kimi_vl_jax.sampling.truncation import sample

Array = jax.Array

# moe_impl -> the dropless computation of the same routing (capacity dropping would make the
# sampler's log-probs depend on which other tokens share the batch).
DROPLESS = {'capacity': 'dropless', 'ep_capacity': 'ep_dropless'}


def sampling_config(config: KimiVLConfig) -> KimiVLConfig:
  """The config the sampler runs: dropless routing, no pipeline schedule, no remat (same
  parameters, same numbers as the trainer's forward)."""
  t = config.text
  return config.replace(
      text=dataclasses.replace(t, moe_impl=DROPLESS.get(t.moe_impl, t.moe_impl)),
      pipeline_stages=1, pipeline_microbatches=1, pipeline_repeats=1, remat_policy='none')


@flax.struct.dataclass
class SamplerState:
  """The decode loop's carry; every leaf has the rows B first except `cache` ([L, B, ...]) and
  the scalar `step`.

  tokens [B, N] int32    generated tokens (row b's first `num_tokens[b]` are valid)
  logprobs [B, N] fp32   their log-probs (`truncation.py` says under which distribution)
  num_tokens [B] int32   tokens generated so far
  lengths [B] int32      tokens in the cache: prompt + generated - 1 (the last generated token is
                         fed at slot `lengths`, which is also its position)
  done [B] bool          the row stopped (stop token, budget or full cache)
  cache                  {'c_kv': [L, B, S, R], 'k_rope': [L, B, S, Hr]}: normalised latent and
                         rotated rope key per slot (slot s = position s)
  rng [B, 2] uint32      per-row key; token i is drawn with fold_in(rng[b], i)
  temperature, top_p [B] fp32, top_k [B] int32   per-row sampling settings
  max_new [B] int32      per-row token budget
  stop_ids [B, K] int32  per-row stop tokens (-1 = none)
  step () int32          decode steps run
  """
  tokens: Array
  logprobs: Array
  num_tokens: Array
  lengths: Array
  done: Array
  cache: dict[str, Array]
  rng: Array
  temperature: Array
  top_k: Array
  top_p: Array
  max_new: Array
  stop_ids: Array
  step: Array


def _constrain_rows(state: SamplerState) -> SamplerState:
  """Rows over the batch mesh axes (a no-op outside a mesh + rules context)."""
  cache = jax.tree.map(lambda a: nn.with_logical_constraint(a, (None, 'act_batch', None, None)),
                       state.cache)
  return state.replace(cache=cache)


def _finished(state: SamplerState, token: Array) -> Array:
  """[B] bool: the token just generated ends its row (stop set, budget, no slot to feed it)."""
  S = state.cache['c_kv'].shape[2]
  stop = jnp.any(token[:, None] == state.stop_ids, axis=-1)
  return stop | (state.num_tokens >= state.max_new) | (state.lengths >= S)


def _record(state: SamplerState, token: Array, logprob: Array, active: Array) -> SamplerState:
  """Writes row b's new token at index num_tokens[b] where `active`."""
  B, N = state.tokens.shape
  rows = jnp.arange(B)
  idx = jnp.where(active, state.num_tokens, N)          # N: out of bounds, dropped
  state = state.replace(tokens=state.tokens.at[rows, idx].set(token, mode='drop'),
                        logprobs=state.logprobs.at[rows, idx].set(logprob, mode='drop'),
                        num_tokens=state.num_tokens + active)
  return state.replace(done=state.done | (active & _finished(state, token)))


def prefill(model: KimiVL, params, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
  """model in mode 'prefill'; batch from `prompts.prefill_batch` -> (last-prompt-token logits
  [Bp, V], cache entries {'c_kv': [L, Bp, T, R], 'k_rope': [L, Bp, T, Hr]})."""
  images = {k: batch[k] for k in ('patches', 'patch_coords', 'patch_image_ids', 'image_grid_hws')
            if k in batch}
  return model.apply({'params': params}, batch['input_ids'], positions=batch['positions'],
                     segment_ids=batch['segment_ids'], logit_index=batch['lengths'] - 1,
                     **images)


def init_state(logits: Array, entries: dict[str, Array], prompt_lengths: Array,
               row_prompt: Array, settings: dict[str, Array], *, cache_len: int,
               cache_dtype, truncate: bool) -> SamplerState:
  """The decode rows' state after prefill: row r copies the cache rows and last logits of prompt
  `row_prompt[r]` (n samples of a prompt share one prefill) and samples its first token.

  settings: per decode row, 'rng' [B, 2], 'temperature', 'top_k', 'top_p', 'max_new' [B],
  'stop_ids' [B, K], 'active' [B] bool (False: a padding row, done from the start).
  """
  B = row_prompt.shape[0]
  T = entries['c_kv'].shape[2]
  if T > cache_len:
    raise ValueError(f'prefill length {T} exceeds the cache length {cache_len}')

  def rows(a):                                          # [L, Bp, T, X] -> [L, B, S, X]
    a = a[:, row_prompt].astype(cache_dtype)
    return jnp.pad(a, ((0, 0), (0, 0), (0, cache_len - T), (0, 0)))

  lengths = prompt_lengths[row_prompt]
  state = SamplerState(
      tokens=jnp.zeros((B, cache_len), jnp.int32), logprobs=jnp.zeros((B, cache_len), jnp.float32),
      num_tokens=jnp.zeros((B,), jnp.int32), lengths=lengths.astype(jnp.int32),
      done=~settings['active'], cache=jax.tree.map(rows, entries), rng=settings['rng'],
      temperature=settings['temperature'].astype(jnp.float32),
      top_k=settings['top_k'].astype(jnp.int32), top_p=settings['top_p'].astype(jnp.float32),
      max_new=settings['max_new'].astype(jnp.int32),
      stop_ids=settings['stop_ids'].astype(jnp.int32), step=jnp.zeros((), jnp.int32))
  return _constrain_rows(_sample_and_record(state, logits[row_prompt], truncate))


def _sample_and_record(state: SamplerState, logits: Array, truncate: bool) -> SamplerState:
  keys = jax.vmap(jax.random.fold_in)(state.rng, state.num_tokens)
  token, logprob = sample(keys, logits, state.temperature, state.top_k, state.top_p,
                          truncate=truncate)
  return _record(state, token, logprob, ~state.done)


def decode_step(model: KimiVL, params, state: SamplerState, *, truncate: bool) -> SamplerState:
  """One token for every row: feed each row's last token at slot `lengths`, write its cache
  entries there, sample the next token (done rows compute but change nothing)."""
  B = state.lengths.shape[0]
  rows = jnp.arange(B)
  last = state.tokens[rows, jnp.maximum(state.num_tokens - 1, 0)]
  pos = state.lengths
  logits, entries = model.apply({'params': params}, last[:, None], positions=pos[:, None],
                                segment_ids=jnp.ones((B, 1), jnp.int32), cache=state.cache)
  active = ~state.done
  # Done rows keep their cache: their write goes out of bounds and is dropped.
  slot = jnp.where(active, pos, state.cache['c_kv'].shape[2])
  cache = jax.tree.map(lambda c, e: c.at[:, rows, slot].set(e[:, :, 0].astype(c.dtype),
                                                            mode='drop'),
                       state.cache, entries)
  state = state.replace(cache=cache, lengths=state.lengths + active, step=state.step + 1)
  return _constrain_rows(_sample_and_record(state, logits[:, 0], truncate))


def decode_loop(model: KimiVL, params, state: SamplerState, until_step: Array, *,
                truncate: bool) -> SamplerState:
  """`decode_step` while some row is running and `state.step < until_step`."""
  def cond(s):
    return jnp.any(~s.done) & (s.step < until_step)

  return jax.lax.while_loop(cond, functools.partial(decode_step, model, params,
                                                    truncate=truncate), state)
