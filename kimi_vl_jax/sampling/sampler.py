"""`Sampler`: batched KV-cache generation for Kimi-VL from HF-style prompts or chat messages.

    sampler = Sampler(config, params, tokenizer=tok)             # mesh=, rules= to shard
    out = sampler.generate([Prompt(ids), messages, ...], SamplingParams(temperature=0.7, n=4))
    out.tokens, out.logprobs, out.texts, out.finish_reasons      # prompt-major, n per prompt

Prompts are cut into groups of at most the largest batch bucket of rows; each group is one
prefill (`decode.prefill`, rows and prompt length padded up to `batch_buckets` /
`prompt_buckets`, so a handful of shapes compile) followed by the jitted, state-donating decode
loop (`decode.decode_loop`). With `on_token` the loop runs `stream_chunk` steps per call and the
new tokens are handed over between calls.

On a mesh the decode rows (and the prefill rows) are split over the mesh axes of `act_batch` in
`rules`, parameters are placed by their logical axes, and the routed experts run expert-parallel
(`ep_dropless`: dropless all-to-all) when the mesh has an 'expert' axis > 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.kimi_vl import KimiVL, init_params
from kimi_vl_jax.parallel import context, expert
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.parallel.kernels import build_kernels
from kimi_vl_jax.sampling import decode
from kimi_vl_jax.sampling.prompts import Prompt, as_prompt, bucket, prefill_batch

_RUN_TO_END = 2 ** 30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample (the same for every prompt of a `generate` call).

  temperature 0 is greedy; top_k 0 and top_p 1.0 switch those truncations off
  (`truncation.py`). n samples per prompt share one prefill. stop_token_ids None: the
  tokenizer's `<|im_end|>` and `[EOS]` (no stop token without a tokenizer).
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  n: int = 1
  seed: int = 0
  stop_token_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.max_new_tokens < 1 or self.n < 1:
      raise ValueError(f'max_new_tokens and n must be >= 1, got {self.max_new_tokens}, {self.n}')
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f'need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got '
                       f'{self.temperature}, {self.top_k}, {self.top_p}')


@dataclasses.dataclass
class GenerateOutput:
  """Per sample (len(prompts) * n, prompt-major): generated ids (stop token included if hit),
  their log-probs (`truncation.py`), texts (stop token stripped; None without a tokenizer),
  'stop' | 'length'."""
  tokens: list[np.ndarray]
  logprobs: list[np.ndarray]
  texts: list[str] | None
  finish_reasons: list[str]


def _row_shards(mesh: Mesh | None, rules) -> int:
  if mesh is None or rules is None:
    return 1
  return math.prod(mesh.shape[a] for a in rules_lib.mesh_axes_of(rules, 'act_batch')
                   if a in mesh.shape)


class Sampler:
  """Generation for one model and parameter set (see the module docstring).

  config, params: the model (params as from `init_params` or `checkpoint.hf.load`, boxed or not).
  mesh, rules: run on a mesh under these logical-axis rules (a preset name or list); rules that
    split `act_len` (context parallelism) are refused.
  max_len: cache slots per row (prompt + generated tokens).
  prompt_buckets, batch_buckets: padded prompt lengths / row counts (rows rounded up to the
    number of row shards of the mesh).
  cache_dtype: default the config's compute dtype.
  tokenizer: for chat-message prompts, default stop tokens and texts.
  absorb: decode with weight absorption (False: expand the latent cache each step; same logits).
  stream_chunk: decode steps per loop call when streaming (`generate(on_token=...)`).
  """

  def __init__(self, config: KimiVLConfig, params, *, mesh: Mesh | None = None, rules=None,
               max_len: int = 4096, prompt_buckets: Sequence[int] = (64, 128, 256, 512, 1024,
                                                                     2048, 4096),
               batch_buckets: Sequence[int] = (1, 8, 64), cache_dtype=None, tokenizer=None,
               absorb: bool = True, stream_chunk: int = 8, image_root: str | None = None):
    if max_len < 2:
      raise ValueError(f'max_len must be >= 2, got {max_len}')
    cfg = decode.sampling_config(config)
    if mesh is not None:
      rules = rules_lib.get_rules(rules if rules is not None else 'dp')
      if context.context_size(mesh, rules) > 1:
        raise ValueError('the sampler does not split sequences over a context axis; use rules '
                         'without an act_len rule (e.g. dp, dp_ep, fsdp_ep)')
      if (mesh.shape.get(expert.EXPERT_AXIS, 1) > 1
          and cfg.text.moe_impl in ('dropless', 'dropless_blocked')):
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, moe_impl='ep_dropless'))
    self.config, self.mesh, self.rules = cfg, mesh, rules
    self.max_len, self.tokenizer, self.stream_chunk = int(max_len), tokenizer, int(stream_chunk)
    self.prompt_buckets, self.batch_buckets = tuple(prompt_buckets), tuple(batch_buckets)
    self.row_multiple = _row_shards(mesh, rules)
    self.cache_dtype = jnp.dtype(cache_dtype or cfg.dtype)
    self.image_root = image_root
    kernels = build_kernels(cfg, mesh, rules)
    self.prefill_model = KimiVL(cfg, kernels, mode='prefill')
    self.decode_model = KimiVL(cfg, kernels, mode='decode', absorb=absorb)
    self.params = self._place(params)
    self._start = jax.jit(self._start_fn, static_argnames=('truncate',))
    self._loop = jax.jit(self._loop_fn, static_argnames=('truncate',), donate_argnums=(1,))

  # -- placement ------------------------------------------------------------------------------

  def _place(self, params):
    params = nn.meta.unbox(params)
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, params)
    abstract = jax.eval_shape(lambda: init_params(self.config, jax.random.key(0),
                                                  with_images='vision_tower' in params))
    if jax.tree.structure(nn.meta.unbox(abstract)) != jax.tree.structure(params):
      raise ValueError('params do not have the tree of the sampler config '
                       '(compare with init_params(config, ...))')
    return jax.device_put(params, rules_lib.param_shardings(abstract, self.mesh, self.rules))

  def load_params(self, params) -> None:
    """Decode with new parameters from now on (an RL iteration's updated policy): arrays already
    on the devices move device to device into the sampler's shardings (nothing when they match),
    never through the host; the compiled prefill and decode are reused."""
    self.params = self._place(params)

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return rules_lib.sharding_context(self.mesh, self.rules)

  # -- jitted pieces --------------------------------------------------------------------------

  def _start_fn(self, params, batch, row_prompt, settings, *, truncate):
    logits, entries = decode.prefill(self.prefill_model, params, batch)
    return decode.init_state(logits, entries, batch['lengths'], row_prompt, settings,
                             cache_len=self.max_len, cache_dtype=self.cache_dtype,
                             truncate=truncate)

  def _loop_fn(self, params, state, until_step, *, truncate):
    return decode.decode_loop(self.decode_model, params, state, until_step, truncate=truncate)

  # -- generation -----------------------------------------------------------------------------

  def stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
    if params.stop_token_ids is not None:
      return tuple(int(i) for i in params.stop_token_ids)
    if self.tokenizer is None:
      return ()
    return tuple(int(self.tokenizer.special[k]) for k in ('<|im_end|>', '[EOS]')
                 if k in self.tokenizer.special)

  def generate(self, prompts: Sequence[Any], params: SamplingParams | None = None,
               on_token: Callable[[int, int], None] | None = None) -> GenerateOutput:
    """Samples `params.n` continuations of each prompt (a `Prompt`, a dict of its fields or a
    list of chat messages). `on_token(row, token_id)` is called as tokens are produced, row
    indexing the output lists."""
    params = params or SamplingParams()
    prompts = [as_prompt(p, self.tokenizer, image_root=self.image_root) for p in prompts]
    if not prompts:
      raise ValueError('generate: no prompts')
    for i, p in enumerate(prompts):
      if len(p.input_ids) >= self.max_len:
        raise ValueError(f'prompt {i} has {len(p.input_ids)} tokens; max_len={self.max_len} '
                         'leaves no room to generate')
    n = params.n
    most_rows = bucket(max(self.batch_buckets), self.batch_buckets, multiple=self.row_multiple)
    per_group = max(1, most_rows // n)
    tokens, logprobs = [], []
    for g in range(0, len(prompts), per_group):
      t, lp = self._generate_group(prompts[g:g + per_group], g, params, on_token)
      tokens += t
      logprobs += lp
    stops = set(self.stop_ids(params))
    reasons = ['stop' if len(t) and int(t[-1]) in stops else 'length' for t in tokens]
    texts = None
    if self.tokenizer is not None:
      texts = [self.tokenizer.decode([int(i) for i in (t[:-1] if r == 'stop' else t)])
               for t, r in zip(tokens, reasons)]
    return GenerateOutput(tokens, logprobs, texts, reasons)

  def _generate_group(self, prompts: list[Prompt], first: int, params: SamplingParams,
                      on_token) -> tuple[list[np.ndarray], list[np.ndarray]]:
    n = params.n
    rows = len(prompts) * n
    Bp = bucket(len(prompts), self.batch_buckets, multiple=self.row_multiple, what='batch')
    Bd = bucket(rows, self.batch_buckets, multiple=self.row_multiple, what='batch')
    longest = max(len(p.input_ids) for p in prompts)
    T = min(bucket(longest, self.prompt_buckets, what='prompt length'), self.max_len)
    batch = prefill_batch(prompts, Bp, T, self.config)
    stops = self.stop_ids(params)
    K = max(8, -(-len(stops) // 8) * 8)
    active = np.arange(Bd) < rows
    base = jax.random.PRNGKey(params.seed)
    sample_index = first * n + np.arange(Bd)
    settings = {
        'rng': jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(sample_index)),
        'temperature': np.full(Bd, params.temperature, np.float32),
        'top_k': np.full(Bd, params.top_k, np.int32),
        'top_p': np.full(Bd, params.top_p, np.float32),
        'max_new': np.where(active, params.max_new_tokens, 0).astype(np.int32),
        'stop_ids': np.broadcast_to(np.asarray(list(stops) + [-1] * (K - len(stops)), np.int32),
                                    (Bd, K)).copy(),
        'active': active,
    }
    row_prompt = np.where(active, np.arange(Bd) // n, 0).astype(np.int32)
    truncate = params.top_k > 0 or params.top_p < 1.0
    with self._context():
      state = self._start(self.params, batch, row_prompt, settings, truncate=truncate)
      emitted = np.zeros(Bd, np.int64)
      if on_token is not None:
        emitted = self._emit(state, emitted, rows, first * n, on_token)
      while True:
        step = int(state.step)
        until = step + self.stream_chunk if on_token is not None else _RUN_TO_END
        state = self._loop(self.params, state, jnp.int32(until), truncate=truncate)
        if on_token is not None:
          emitted = self._emit(state, emitted, rows, first * n, on_token)
        if bool(jnp.all(state.done)):
          break
    num, toks, lps = jax.device_get((state.num_tokens, state.tokens, state.logprobs))
    return ([np.asarray(toks[r, :num[r]]) for r in range(rows)],
            [np.asarray(lps[r, :num[r]]) for r in range(rows)])

  @staticmethod
  def _emit(state, emitted, rows, offset, on_token):
    num, toks = jax.device_get((state.num_tokens, state.tokens))
    for i in range(int(num[:rows].max(initial=0))):
      for r in range(rows):
        if emitted[r] <= i < num[r]:
          on_token(offset + r, int(toks[r, i]))
    return np.maximum(emitted, num)
