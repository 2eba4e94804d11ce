"""The one table mapping HF Kimi-VL checkpoint keys to `KimiVL` parameter paths.

Each `Rule` names an HF key template (with `{layer}` / `{expert}` placeholders), the parameter path
(docs/param_tree.md) and how a tensor is re-laid out:

* `linear`: a PyTorch Linear weight `[out, in]` <-> a kernel `[*in_axes, *out_axes]` whose first
  `n_in` axes (after the stacking axes) are the input;
* `conv`: the MoonViT patch conv `[Dv, 3, p, p]` <-> a kernel `[3*p*p, Dv]` (flattened in
  (channel, y, x) order, the order `data/` uses to flatten a patch);
* `vector`: a 1-D HF tensor <-> a param slice of any shape (e.g. the wqkv bias `[3, Nv, Hv]`);
* `copy`: same shape on both sides.

Scanned layers are stacked on axis 0 of the parameter (HF layer `l` goes to `dense_layers[l]` when
`l < first_k_dense_replace`, else to `moe_layers[l - first_k_dense_replace]`); experts are stacked
on the axis after it. Head layouts are kept exactly as in the checkpoint (see docs/param_tree.md).

Import goes by block: `plan` matches the checkpoint's keys and shapes against the config, and
`read_block` builds any block of a parameter (e.g. one device's shard) from only the row / column
ranges of the HF tensors that block covers, so a sharded load never holds a whole parameter.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Iterable, Iterator, Protocol

import numpy as np

from kimi_vl_jax.model.config import KimiVLConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                 # HF key template, relative to its prefix
  path: tuple[str, ...]   # parameter path
  kind: str               # 'linear' | 'conv' | 'vector' | 'copy'
  n_in: int = 1           # for 'linear': how many leading (unstacked) kernel axes are the input
  stack: str | None = None  # None | 'vision' | 'dense' | 'moe': which layer stack {layer} indexes
  experts: bool = False   # whether {expert} indexes the axis after the layer axis


def _attn_rules(stack: str, config: KimiVLConfig) -> list[Rule]:
  prefix = 'language_model.model.layers.{layer}.'
  base = ('language_model', f'{stack}_layers')
  r = [
      Rule(prefix + 'input_layernorm.weight', base + ('input_layernorm', 'scale'), 'vector',
           stack=stack),
      Rule(prefix + 'post_attention_layernorm.weight',
           base + ('post_attention_layernorm', 'scale'), 'vector', stack=stack),
      Rule(prefix + 'self_attn.kv_a_proj_with_mqa.weight',
           base + ('self_attn', 'kv_a_proj_with_mqa', 'kernel'), 'linear', stack=stack),
      Rule(prefix + 'self_attn.kv_a_layernorm.weight',
           base + ('self_attn', 'kv_a_layernorm', 'scale'), 'vector', stack=stack),
      Rule(prefix + 'self_attn.kv_b_proj.weight', base + ('self_attn', 'kv_b_proj', 'kernel'),
           'linear', stack=stack),
      Rule(prefix + 'self_attn.o_proj.weight', base + ('self_attn', 'o_proj', 'kernel'), 'linear',
           n_in=2, stack=stack),
  ]
  if config.text.q_lora_rank is None:
    r.append(Rule(prefix + 'self_attn.q_proj.weight', base + ('self_attn', 'q_proj', 'kernel'),
                  'linear', stack=stack))
  else:
    r += [
        Rule(prefix + 'self_attn.q_a_proj.weight', base + ('self_attn', 'q_a_proj', 'kernel'),
             'linear', stack=stack),
        Rule(prefix + 'self_attn.q_a_layernorm.weight',
             base + ('self_attn', 'q_a_layernorm', 'scale'), 'vector', stack=stack),
        Rule(prefix + 'self_attn.q_b_proj.weight', base + ('self_attn', 'q_b_proj', 'kernel'),
             'linear', stack=stack),
    ]
  return r


def _mlp_rules(prefix: str, base: tuple[str, ...], stack: str) -> list[Rule]:
  return [Rule(f'{prefix}.{name}.weight', base + (name, 'kernel'), 'linear', stack=stack)
          for name in ('gate_proj', 'up_proj', 'down_proj')]


def text_rules(config: KimiVLConfig) -> list[Rule]:
  t = config.text
  rules = [
      Rule('language_model.model.embed_tokens.weight',
           ('language_model', 'embed_tokens', 'embedding'), 'copy'),
      Rule('language_model.model.norm.weight', ('language_model', 'norm', 'scale'), 'vector'),
  ]
  if not t.tie_word_embeddings:
    rules.append(Rule('language_model.lm_head.weight', ('language_model', 'lm_head', 'kernel'),
                      'linear'))
  layer = 'language_model.model.layers.{layer}.mlp'
  if t.num_dense_layers:
    rules += _attn_rules('dense', config)
    rules += _mlp_rules(layer, ('language_model', 'dense_layers', 'mlp'), 'dense')
  if t.num_moe_layers:
    rules += _attn_rules('moe', config)
    moe = ('language_model', 'moe_layers', 'mlp')
    rules += [
        Rule(layer + '.gate.weight', moe + ('gate', 'kernel'), 'linear', stack='moe'),
        Rule(layer + '.gate.e_score_correction_bias', moe + ('gate', 'e_score_correction_bias'),
             'vector', stack='moe'),
    ]
    rules += [Rule(f'{layer}.experts.{{expert}}.{name}.weight', moe + ('experts', name), 'linear',
                   stack='moe', experts=True) for name in ('gate_proj', 'up_proj', 'down_proj')]
    if t.n_shared_experts:
      rules += _mlp_rules(layer + '.shared_experts', moe + ('shared_experts',), 'moe')
  return rules


def vision_rules(config: KimiVLConfig) -> list[Rule]:
  del config
  vt, blk = ('vision_tower',), ('vision_tower', 'blocks')
  b = 'vision_tower.encoder.blocks.{layer}.'
  rules = [
      Rule('vision_tower.patch_embed.proj.weight', vt + ('patch_embed', 'kernel'), 'conv'),
      Rule('vision_tower.patch_embed.proj.bias', vt + ('patch_embed', 'bias'), 'vector'),
      Rule('vision_tower.patch_embed.pos_emb.weight', vt + ('pos_emb',), 'copy'),
      Rule('vision_tower.encoder.final_layernorm.weight', vt + ('final_layernorm', 'scale'),
           'vector'),
      Rule('vision_tower.encoder.final_layernorm.bias', vt + ('final_layernorm', 'bias'), 'vector'),
      Rule(b + 'wqkv.weight', blk + ('wqkv', 'kernel'), 'linear', stack='vision'),
      Rule(b + 'wqkv.bias', blk + ('wqkv', 'bias'), 'vector', stack='vision'),
      Rule(b + 'wo.weight', blk + ('wo', 'kernel'), 'linear', n_in=2, stack='vision'),
      Rule(b + 'wo.bias', blk + ('wo', 'bias'), 'vector', stack='vision'),
  ]
  for norm in ('norm0', 'norm1'):
    rules += [Rule(b + f'{norm}.weight', blk + (norm, 'scale'), 'vector', stack='vision'),
              Rule(b + f'{norm}.bias', blk + (norm, 'bias'), 'vector', stack='vision')]
  for fc in ('fc0', 'fc1'):
    rules += [Rule(b + f'mlp.{fc}.weight', blk + ('mlp', fc, 'kernel'), 'linear', stack='vision'),
              Rule(b + f'mlp.{fc}.bias', blk + ('mlp', fc, 'bias'), 'vector', stack='vision')]
  pj = ('projector',)
  rules += [
      Rule('multi_modal_projector.pre_norm.weight', pj + ('pre_norm', 'scale'), 'vector'),
      Rule('multi_modal_projector.pre_norm.bias', pj + ('pre_norm', 'bias'), 'vector'),
  ]
  for lin in ('linear_1', 'linear_2'):
    rules += [Rule(f'multi_modal_projector.{lin}.weight', pj + (lin, 'kernel'), 'linear'),
              Rule(f'multi_modal_projector.{lin}.bias', pj + (lin, 'bias'), 'vector')]
  return rules


def rules_for(config: KimiVLConfig, include_vision: bool = True) -> list[Rule]:
  return text_rules(config) + (vision_rules(config) if include_vision else [])


# ---------------------------------------------------------------------------------------------
# Expanding templates into concrete keys.

@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one HF tensor lives: the param path and the index into its stacking axes."""
  rule: Rule
  index: tuple[int, ...]  # () | (layer,) | (layer, expert)


def _layer_ids(stack: str, config: KimiVLConfig) -> list[tuple[int, int]]:
  """(hf layer number, index in the stack) pairs."""
  t = config.text
  if stack == 'vision':
    return [(i, i) for i in range(config.vision.num_layers)]
  if stack == 'dense':
    return [(i, i) for i in range(t.num_dense_layers)]
  return [(t.num_dense_layers + i, i) for i in range(t.num_moe_layers)]


def expand(rules: list[Rule], config: KimiVLConfig) -> Iterator[tuple[str, Slot]]:
  """Yields (concrete HF key, Slot) for every tensor the checkpoint holds."""
  for rule in rules:
    if rule.stack is None:
      yield rule.hf, Slot(rule, ())
      continue
    for hf_layer, idx in _layer_ids(rule.stack, config):
      if rule.experts:
        for e in range(config.text.n_routed_experts):
          yield rule.hf.format(layer=hf_layer, expert=e), Slot(rule, (idx, e))
      else:
        yield rule.hf.format(layer=hf_layer), Slot(rule, (idx,))


def slice_shape(rule: Rule, param_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of one HF tensor's slice of the (stacked) parameter."""
  n_stack = (rule.stack is not None) + rule.experts
  return tuple(param_shape[n_stack:])


def hf_shape(rule: Rule, slice_shp: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that maps onto a parameter slice of shape `slice_shp`."""
  if rule.kind == 'linear':
    return (math.prod(slice_shp[rule.n_in:]), math.prod(slice_shp[:rule.n_in]))
  if rule.kind == 'conv':
    patch_dim, width = slice_shp
    p = math.isqrt(patch_dim // 3)
    return (width, 3, p, p)
  if rule.kind == 'vector':
    return (math.prod(slice_shp),)
  return tuple(slice_shp)


def to_param(rule: Rule, tensor: np.ndarray, slice_shp: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> parameter slice."""
  if rule.kind == 'linear':
    return tensor.T.reshape(slice_shp)
  if rule.kind == 'conv':
    return tensor.reshape(tensor.shape[0], -1).T
  return tensor.reshape(slice_shp)


def to_hf(rule: Rule, value: np.ndarray) -> np.ndarray:
  """Parameter slice -> HF tensor (the inverse of `to_param`)."""
  shape = hf_shape(rule, value.shape)
  if rule.kind == 'linear':
    return np.ascontiguousarray(value.reshape(shape[1], shape[0]).T)
  if rule.kind == 'conv':
    return np.ascontiguousarray(value.T.reshape(shape))
  return np.ascontiguousarray(value.reshape(shape))


def strip_prefix(keys, config: KimiVLConfig) -> str:
  """Detects whether a checkpoint is a bare DeepSeek-V3 text model (`model.layers...`) rather than
  Kimi-VL (`language_model.model.layers...`); returns the prefix to prepend to its keys."""
  del config
  keys = list(keys)
  if any(k.startswith('language_model.') for k in keys):
    return ''
  if any(re.match(r'model\.(layers|embed_tokens|norm)', k) for k in keys):
    return 'language_model.'
  return ''


# ---------------------------------------------------------------------------------------------
# Parameter shapes from the config (docs/param_tree.md in code; the model tests check that
# `KimiVL.init` produces exactly these).

def param_shapes(config: KimiVLConfig, include_vision: bool = True) -> dict[tuple[str, ...], tuple]:
  """Flat {path: shape} of every parameter the mapping knows."""
  t, v = config.text, config.vision
  D, N, V = t.hidden_size, t.num_heads, t.vocab_size
  shapes: dict[tuple[str, ...], tuple] = {
      ('language_model', 'embed_tokens', 'embedding'): (V, D),
      ('language_model', 'norm', 'scale'): (D,),
  }
  if not t.tie_word_embeddings:
    shapes[('language_model', 'lm_head', 'kernel')] = (D, V)
  for stack, L in (('dense', t.num_dense_layers), ('moe', t.num_moe_layers)):
    if not L:
      continue
    base = ('language_model', f'{stack}_layers')
    a = base + ('self_attn',)
    shapes.update({
        base + ('input_layernorm', 'scale'): (L, D),
        base + ('post_attention_layernorm', 'scale'): (L, D),
        a + ('kv_a_proj_with_mqa', 'kernel'): (L, D, t.kv_lora_rank + t.qk_rope_head_dim),
        a + ('kv_a_layernorm', 'scale'): (L, t.kv_lora_rank),
        a + ('kv_b_proj', 'kernel'): (L, t.kv_lora_rank, N, t.qk_nope_head_dim + t.v_head_dim),
        a + ('o_proj', 'kernel'): (L, N, t.v_head_dim, D),
    })
    if t.q_lora_rank is None:
      shapes[a + ('q_proj', 'kernel')] = (L, D, N, t.qk_head_dim)
    else:
      shapes[a + ('q_a_proj', 'kernel')] = (L, D, t.q_lora_rank)
      shapes[a + ('q_a_layernorm', 'scale')] = (L, t.q_lora_rank)
      shapes[a + ('q_b_proj', 'kernel')] = (L, t.q_lora_rank, N, t.qk_head_dim)
    m = base + ('mlp',)
    if stack == 'dense':
      F = t.intermediate_size
      shapes.update({m + ('gate_proj', 'kernel'): (L, D, F), m + ('up_proj', 'kernel'): (L, D, F),
                     m + ('down_proj', 'kernel'): (L, F, D)})
    else:
      E, Fe = t.n_routed_experts, t.moe_intermediate_size
      shapes.update({
          m + ('gate', 'kernel'): (L, D, E),
          m + ('gate', 'e_score_correction_bias'): (L, E),
          m + ('experts', 'gate_proj'): (L, E, D, Fe),
          m + ('experts', 'up_proj'): (L, E, D, Fe),
          m + ('experts', 'down_proj'): (L, E, Fe, D),
      })
      if t.n_shared_experts:
        Fs = Fe * t.n_shared_experts
        s = m + ('shared_experts',)
        shapes.update({s + ('gate_proj', 'kernel'): (L, D, Fs),
                       s + ('up_proj', 'kernel'): (L, D, Fs),
                       s + ('down_proj', 'kernel'): (L, Fs, D)})
  if include_vision:
    Dv, Nv, Lv, Fv = v.hidden_size, v.num_heads, v.num_layers, v.intermediate_size
    Hv, M = v.head_dim, v.merge_kernel[0] * v.merge_kernel[1]
    vt, b = ('vision_tower',), ('vision_tower', 'blocks')
    shapes.update({
        vt + ('patch_embed', 'kernel'): (v.patch_dim, Dv),
        vt + ('patch_embed', 'bias'): (Dv,),
        vt + ('pos_emb',): (v.pos_emb_height, v.pos_emb_width, Dv),
        vt + ('final_layernorm', 'scale'): (Dv,),
        vt + ('final_layernorm', 'bias'): (Dv,),
        b + ('norm0', 'scale'): (Lv, Dv), b + ('norm0', 'bias'): (Lv, Dv),
        b + ('norm1', 'scale'): (Lv, Dv), b + ('norm1', 'bias'): (Lv, Dv),
        b + ('wqkv', 'kernel'): (Lv, Dv, 3, Nv, Hv), b + ('wqkv', 'bias'): (Lv, 3, Nv, Hv),
        b + ('wo', 'kernel'): (Lv, Nv, Hv, Dv), b + ('wo', 'bias'): (Lv, Dv),
        b + ('mlp', 'fc0', 'kernel'): (Lv, Dv, Fv), b + ('mlp', 'fc0', 'bias'): (Lv, Fv),
        b + ('mlp', 'fc1', 'kernel'): (Lv, Fv, Dv), b + ('mlp', 'fc1', 'bias'): (Lv, Dv),
        ('projector', 'pre_norm', 'scale'): (Dv,), ('projector', 'pre_norm', 'bias'): (Dv,),
        ('projector', 'linear_1', 'kernel'): (M * Dv, M * Dv),
        ('projector', 'linear_1', 'bias'): (M * Dv,),
        ('projector', 'linear_2', 'kernel'): (M * Dv, D),
        ('projector', 'linear_2', 'bias'): (D,),
    })
  return shapes


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  flat = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, prefix + (name,)))
    else:
      flat[prefix + (name,)] = value
  return flat


# Kept in fp32 whatever the storage dtype: the router bias moves by +-rate per step under the
# aux-loss-free rule, increments that bf16 would mostly round away.
FP32_PARAMS = frozenset({'e_score_correction_bias'})


class CheckpointMismatch(ValueError):
  """A checkpoint tensor is missing, unexpected or has the wrong shape."""


class TensorSource(Protocol):
  """Read access to a checkpoint's tensors by slice (e.g. `hf.SafetensorsReader`)."""

  def keys(self) -> Iterable[str]: ...

  def shape(self, key: str) -> tuple[int, ...]: ...

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] (basic slices over the leading dims; the rest whole) as a host array."""


class ArraySource:
  """A TensorSource over an in-memory mapping {HF key: array}."""

  def __init__(self, tensors):
    self._tensors = tensors

  def keys(self):
    return self._tensors.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(np.shape(self._tensors[key]))

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    return np.asarray(self._tensors[key])[index]


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter: its shape, its rule and the HF tensors stacked into it."""
  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  rule: Rule
  keys: dict[tuple[int, ...], str]  # stacking index (() | (layer,) | (layer, expert)) -> source key

  @property
  def n_stack(self) -> int:
    return (self.rule.stack is not None) + self.rule.experts


def plan(source: TensorSource, config: KimiVLConfig, include_vision: bool = True,
         dtype=None) -> dict[tuple[str, ...], Leaf]:
  """Matches the checkpoint's keys and shapes against the config (no tensor data is read) and
  returns {param path: Leaf}, in the order of docs/param_tree.md's table.

  Raises CheckpointMismatch naming the key and both shapes on any missing, unexpected or
  mis-shaped tensor. `dtype` (default: the config's param_dtype) is the dtype of every leaf except
  FP32_PARAMS.
  """
  dtype = np.dtype(dtype or config.param_dtype)
  keys = list(source.keys())
  prefix = strip_prefix(keys, config)
  shapes = param_shapes(config, include_vision)
  slots = dict(expand(rules_for(config, include_vision), config))
  available = {prefix + k: k for k in keys}
  missing = [k for k in slots if k not in available]
  unexpected = [k for k in available if k not in slots]
  if not include_vision:
    unexpected = [k for k in unexpected
                  if not k.startswith(('vision_tower.', 'multi_modal_projector.'))]
  if missing or unexpected:
    raise CheckpointMismatch(
        f'checkpoint does not match the config: {len(missing)} missing tensors '
        f'{missing[:8]}{" ..." if len(missing) > 8 else ""}, {len(unexpected)} unexpected tensors '
        f'{unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')
  leaves: dict[tuple[str, ...], Leaf] = {}
  for key, slot in slots.items():
    path = slot.rule.path
    got = tuple(source.shape(available[key]))
    want = hf_shape(slot.rule, slice_shape(slot.rule, shapes[path]))
    if got != want:
      raise CheckpointMismatch(f'{key}: checkpoint shape {got} but the config '
                               f'expects {want} (param {"/".join(path)})')
    if path not in leaves:
      leaves[path] = Leaf(path, tuple(shapes[path]),
                          np.dtype(np.float32) if path[-1] in FP32_PARAMS else dtype,
                          slot.rule, {})
    leaves[path].keys[slot.index] = available[key]
  return leaves


def _flat_index(shape: tuple[int, ...], block: tuple[range, ...]) -> np.ndarray:
  """Row-major flat indices into `shape` of the elements of `block`, in the block's order."""
  idx = np.zeros((), np.int64)
  for n, r in zip(shape, block):
    idx = idx[..., None] * n + np.asarray(r, np.int64)
  return idx.reshape(-1)


def _runs(idx: np.ndarray) -> Iterator[tuple[int, int, int]]:
  """Splits an index array into runs of consecutive values: (position, end, first value)."""
  cuts = np.flatnonzero(np.diff(idx) != 1) + 1
  bounds = [0, *cuts.tolist(), len(idx)]
  for a, b in zip(bounds[:-1], bounds[1:]):
    yield a, b, int(idx[a])


def read_block(leaf: Leaf, block: tuple[slice, ...], source: TensorSource) -> np.ndarray:
  """The block `block` (one slice per dim of `leaf.shape`) of a parameter in `leaf.dtype`, read
  from the HF tensors it covers and nothing else.

  Each stacked HF tensor (layer, expert) is read by contiguous row / column ranges: for a `linear`
  kernel the block's input dims select columns of the `[out, in]` weight and its output dims select
  rows; a `vector` block selects a set of flat positions; `copy` reads the same slices. The patch
  conv `[Dv, 3, p, p]` is read by whole output channel (3*p*p values each). Each piece is cast
  into the result as it arrives, so the host holds the result plus one piece.
  """
  ranges = tuple(range(*s.indices(n)) for s, n in zip(block, leaf.shape))
  out = np.empty(tuple(len(r) for r in ranges), leaf.dtype)
  stack, inner = ranges[:leaf.n_stack], ranges[leaf.n_stack:]
  rule, shp = leaf.rule, leaf.shape[leaf.n_stack:]
  for pos in itertools.product(*(range(len(r)) for r in stack)):
    key = leaf.keys[tuple(r[i] for r, i in zip(stack, pos))]
    piece = out[pos]
    if rule.kind in ('linear', 'conv'):
      n_in = rule.n_in if rule.kind == 'linear' else 1
      cols, rows = _flat_index(shp[:n_in], inner[:n_in]), _flat_index(shp[n_in:], inner[n_in:])
      dst = piece.reshape(len(cols), len(rows))    # param [in, out] = weight [out, in].T
      for o, o_end, r in _runs(rows):
        rows_sl = slice(r, r + o_end - o)
        if rule.kind == 'conv':
          dst[:, o:o_end] = source.read(key, (rows_sl,)).reshape(o_end - o, -1)[:, cols].T
          continue
        for i, i_end, c in _runs(cols):
          dst[i:i_end, o:o_end] = source.read(key, (rows_sl, slice(c, c + i_end - i))).T
    elif rule.kind == 'vector':
      dst = piece.reshape(-1)
      for i, i_end, c in _runs(_flat_index(shp, inner)):
        dst[i:i_end] = source.read(key, (slice(c, c + i_end - i),))
    else:
      piece[...] = source.read(key, tuple(slice(r.start, r.stop) for r in inner))
  return out


def hf_to_params(tensors, config: KimiVLConfig, include_vision: bool = True,
                 dtype=None) -> dict:
  """Builds the nested param dict of host arrays from a TensorSource or a mapping
  {HF key: array}, one parameter at a time (see `plan` for the checks and `dtype`)."""
  source = tensors if hasattr(tensors, 'read') else ArraySource(tensors)
  leaves = plan(source, config, include_vision, dtype)
  return unflatten({path: read_block(leaf, (slice(None),) * len(leaf.shape), source)
                    for path, leaf in leaves.items()})


def params_to_hf(params: dict, config: KimiVLConfig, include_vision: bool = True
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF key, tensor) for every tensor of the checkpoint, one at a time."""
  flat = flatten(params)
  for key, slot in expand(rules_for(config, include_vision), config):
    if slot.rule.path not in flat:
      raise CheckpointMismatch(f'params have no {"/".join(slot.rule.path)} (needed for {key})')
    value = np.asarray(flat[slot.rule.path])
    yield key, to_hf(slot.rule, value[slot.index] if slot.index else value)
