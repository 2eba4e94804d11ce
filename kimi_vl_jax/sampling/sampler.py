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
  tokenizer's `<|im_end|>` and `[EOS]` (no stop token without a tokenizer). A row also ends
  ('length') after max_new_tokens or when its cache (`Sampler.max_len`) is full.
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

  def generate(self, prompts: Sequence[Any],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               on_token: Callable[[int, int], None] | None = None) -> GenerateOutput:
    """Samples `n` continuations of each prompt (a `Prompt`, a dict of its fields or a list of
    chat messages). `params` is one `SamplingParams` for all prompts or one per prompt (each row
    then has its own budget, stop set, temperature, top-k / top-p, n and seed). Sample j of
    prompt i draws from the key `fold_in(PRNGKey(seed), j)`, so it reproduces with the same
    seed whatever it is batched with. `on_token(row, token_id)` is called as tokens are
    produced, `row` indexing the output lists."""
    prompts = [as_prompt(p, self.tokenizer, image_root=self.image_root) for p in prompts]
    if not prompts:
      raise ValueError('generate: no prompts')
    if params is None or isinstance(params, SamplingParams):
      params = [params or SamplingParams()] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
      raise ValueError(f'{len(params)} SamplingParams for {len(prompts)} prompts')
    for i, p in enumerate(prompts):
      if len(p.input_ids) >= self.max_len:
        raise ValueError(f'prompt {i} has {len(p.input_ids)} tokens; max_len={self.max_len} '
                         'leaves no room to generate')
    most_rows = bucket(max(self.batch_buckets), self.batch_buckets, multiple=self.row_multiple)
    groups, start = [], 0
    for i in range(1, len(prompts) + 1):  # consecutive prompts while their rows fit
      if i == len(prompts) or sum(sp.n for sp in params[start:i + 1]) > most_rows:
        groups.append((start, i))
        start = i
    tokens, logprobs, row = [], [], 0
    for lo, hi in groups:
      t, lp = self._generate_group(prompts[lo:hi], params[lo:hi], row, on_token)
      tokens += t
      logprobs += lp
      row += len(t)
    stops = [set(self.stop_ids(sp)) for sp in params for _ in range(sp.n)]
    reasons = ['stop' if len(t) and int(t[-1]) in st else 'length' for t, st in zip(tokens, stops)]
    texts = None
    if self.tokenizer is not None:
      texts = [self.tokenizer.decode([int(i) for i in (t[:-1] if r == 'stop' else t)])
               for t, r in zip(tokens, reasons)]
    return GenerateOutput(tokens, logprobs, texts, reasons)

  def _settings(self, params: list[SamplingParams], Bd: int) -> dict[str, Any]:
    """Per decode row (prompt-major, n rows per prompt, then padding rows): the loop's settings
    and `row_prompt`, the prompt each row continues."""
    per_row = [(i, j, sp) for i, sp in enumerate(params) for j in range(sp.n)]
    pad = Bd - len(per_row)
    stops = [self.stop_ids(sp) for _, _, sp in per_row]
    K = max(8, -(-max(map(len, stops)) // 8) * 8)
    col = lambda f, dtype, fill: np.asarray([f(sp) for _, _, sp in per_row] + [fill] * pad, dtype)
    keys = [jax.random.fold_in(jax.random.PRNGKey(sp.seed), j) for _, j, sp in per_row]
    return {
        'rng': jnp.stack(keys + [jax.random.PRNGKey(0)] * pad),
        'temperature': col(lambda sp: sp.temperature, np.float32, 0.0),
        'top_k': col(lambda sp: sp.top_k, np.int32, 0),
        'top_p': col(lambda sp: sp.top_p, np.float32, 1.0),
        'max_new': col(lambda sp: sp.max_new_tokens, np.int32, 0),
        'stop_ids': np.asarray([list(s) + [-1] * (K - len(s)) for s in stops]
                               + [[-1] * K] * pad, np.int32),
        'active': np.arange(Bd) < len(per_row),
    }, np.asarray([i for i, _, _ in per_row] + [0] * pad, np.int32)

  def _generate_group(self, prompts: list[Prompt], params: list[SamplingParams], first_row: int,
                      on_token) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rows = sum(sp.n for sp in params)
    Bp = bucket(len(prompts), self.batch_buckets, multiple=self.row_multiple, what='batch')
    Bd = bucket(rows, self.batch_buckets, multiple=self.row_multiple, what='batch')
    longest = max(len(p.input_ids) for p in prompts)
    T = min(bucket(longest, self.prompt_buckets, what='prompt length'), self.max_len)
    batch = prefill_batch(prompts, Bp, T, self.config)
    settings, row_prompt = self._settings(params, Bd)
    truncate = any(sp.top_k > 0 or sp.top_p < 1.0 for sp in params)
    with self._context():
      state = self._start(self.params, batch, row_prompt, settings, truncate=truncate)
      emitted = np.zeros(Bd, np.int64)
      while True:
        if on_token is not None:
          emitted = self._emit(state, emitted, rows, first_row, on_token)
        if bool(jnp.all(state.done)):
          break
        until = int(state.step) + self.stream_chunk if on_token is not None else _RUN_TO_END
        state = self._loop(self.params, state, jnp.int32(until), truncate=truncate)
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
