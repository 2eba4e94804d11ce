"""MoonViT pre-training initialised from an HF SigLIP checkpoint (`SiglipModel`, e.g.
siglip-so400m-patch14-384). Kimi-VL report, arXiv 2504.07491, sec. 2.3: the image and text encoders
of the SigLIP + caption pre-training both start from SigLIP-SO400M.

    from kimi_vl_jax.checkpoint import siglip
    init = siglip.load('/path/to/siglip-so400m-patch14-384')
    init.vision, init.text       # VisionConfig (MoonViT), SiglipTextConfig
    init.params['vision_tower']  # MoonViT (docs/param_tree.md `vision_tower/`)
    init.params['image_pooling'] # model/image_pooling.py AttentionPoolingHead
    init.params['text_tower']    # model/siglip_text.py SiglipTextTower
    init.params['siglip_loss']   # {'log_temperature': t', 'bias': b} of the SigLIP loss

The whole mapping is `rules()` below. HF tensor -> parameter:

    vision_model.embeddings.patch_embedding [Dv, 3, p, p]  vision_tower/patch_embed/kernel [3pp, Dv]
        (conv as a Linear on the (channel, y, x)-flattened patch, as for Kimi-VL's MoonViT)
    vision_model.embeddings.position_embedding [G*G, Dv]   vision_tower/pos_emb [H0, W0, Dv]:
        the row-major G x G grid (G = 27 at 384 px, 16 at 224 px) resized to MoonViT's H0 x W0
        (64 x 64) by `vision.interpolate_pos_emb`, the same PyTorch bicubic (A = -0.75,
        half-pixel, border clamp, no antialias) MoonViT applies per image; identity when equal
    vision_model.encoder.layers.{i}.layer_norm1 / 2         vision_tower/blocks/norm0 / norm1 [i]
    vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj  vision_tower/blocks/wqkv [i][:, 0|1|2]
        (kernel [Dv, 3, N, H]: each Linear [N*H, Dv] transposed, heads split head-major: no
        permutation; biases into wqkv/bias [i][0|1|2])
    vision_model.encoder.layers.{i}.self_attn.out_proj      vision_tower/blocks/wo [i] ([N, H, Dv])
    vision_model.encoder.layers.{i}.mlp.fc1 / fc2           vision_tower/blocks/mlp/fc0 / fc1 [i]
    vision_model.post_layernorm                             vision_tower/final_layernorm
    vision_model.head.probe [1, 1, Dv]                      image_pooling/probe [Dv]
    vision_model.head.attention.in_proj_{weight,bias}       rows q -> image_pooling/wq,
                                                            rows k | v -> image_pooling/wkv[:, 0|1]
    vision_model.head.attention.out_proj                    image_pooling/wo
    vision_model.head.layernorm / mlp.fc1 / mlp.fc2         image_pooling/norm / mlp/fc0 / mlp/fc1
    text_model.embeddings.token_embedding / position_embedding
                                                            text_tower/token_embedding
                                                            / position_embedding (copied)
    text_model.encoder.layers.{i}.*                         text_tower/layers/* [i] (as the vision
                                                            layers)
    text_model.final_layer_norm / head                      text_tower/final_layernorm / head
    logit_scale [1], logit_bias [1]                         siglip_loss/log_temperature, bias []
        (t' = logit_scale and b = logit_bias as HF stores them: the logits are
        z_img . z_txt * exp(t') + b)

What the initialised MoonViT computes. SigLIP's ViT has no rotary embedding; MoonViT adds 2D RoPE
to q and k in every block (`vision.apply_rope_2d`). The weights carry over unchanged, so the
initialised MoonViT is SigLIP's function with each query / key head rotated pairwise by angles
proportional to the patch's (row, col): attention between patches at the same position is
unchanged, and the further apart two patches are, the more their pretrained q.k score is
perturbed (fastest in the high-frequency slots, whose angles change by up to 1 rad per patch).
It is therefore *not* SigLIP's function at initialisation: the absolute position embedding
(resized) and every weight are kept, and the continued pre-training adapts the attention to the
rotation. The tests check the conversion exactly where SigLIP and MoonViT do agree: MoonViT's
blocks with zero rotation angles and an unresized grid reproduce SigLIP's vision tower and
pooled embedding (`tests/checkpoint/test_siglip.py`). The LayerNorm eps is MoonViT's own (the
VisionConfig's, 1e-5 by default; SigLIP uses 1e-6), so the model trained from this
initialisation is the one Kimi-VL's MoonViT layout stores; pass `vision_config` to choose.

A missing, unexpected or mis-shaped tensor raises `hf_mapping.CheckpointMismatch` naming the key
and both shapes. The checkpoint is read one tensor at a time (`hf.SafetensorsReader`); the result
is a tree of host numpy arrays (SO400M: about 0.9 B parameters, 3.6 GB in fp32).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from kimi_vl_jax.checkpoint import hf, hf_mapping
from kimi_vl_jax.checkpoint.hf_mapping import CheckpointMismatch
from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.config import SiglipTextConfig, VisionConfig
from kimi_vl_jax.model.layers import ACTIVATIONS
from kimi_vl_jax.storage import files as storage_files
from kimi_vl_jax.storage import paths as storage_paths

# Non-persistent buffers some exports still carry; not weights, ignored when present.
IGNORED_SUFFIXES = ('.position_ids',)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor (or a block of its rows) -> one parameter (or one slice of it).

  kind: 'linear' | 'conv' | 'vector' | 'copy' (as in `hf_mapping`), 'pos_grid' (the G*G x D
  position table resized to the parameter's grid) or 'squeeze' (same values, size-1 axes
  dropped: the probe [1, 1, D] and the logit scalars [1]).
  stack: None | 'vision' | 'text': `{layer}` indexes axis 0 of the parameter.
  part: (axis, index): the HF tensor fills `param[layer][(:,) * axis + (index,)]`.
  rows: (index, count): the HF tensor has `count` equal blocks of rows; this rule reads block
  `index` (the fused in_proj of torch's MultiheadAttention).
  """
  hf: str
  path: tuple[str, ...]
  kind: str
  n_in: int = 1
  stack: str | None = None
  part: tuple[int, int] | None = None
  rows: tuple[int, int] | None = None


def _layer_rules(prefix: str, base: tuple[str, ...], stack: str) -> list[Rule]:
  r = []
  for t, leaf, kind in (('weight', 'kernel', 'linear'), ('bias', 'bias', 'vector')):
    axis = 1 if t == 'weight' else 0   # kernel [D, 3, N, H], bias [3, N, H]
    r += [Rule(f'{prefix}self_attn.{x}_proj.{t}', base + ('wqkv', leaf), kind, stack=stack,
               part=(axis, i)) for i, x in enumerate('qkv')]
    r.append(Rule(f'{prefix}self_attn.out_proj.{t}', base + ('wo', leaf), kind, n_in=2,
                  stack=stack))
    for src, dst in (('fc1', 'fc0'), ('fc2', 'fc1')):
      r.append(Rule(f'{prefix}mlp.{src}.{t}', base + ('mlp', dst, leaf), kind, stack=stack))
  for t, leaf in (('weight', 'scale'), ('bias', 'bias')):
    r += [Rule(f'{prefix}layer_norm1.{t}', base + ('norm0', leaf), 'vector', stack=stack),
          Rule(f'{prefix}layer_norm2.{t}', base + ('norm1', leaf), 'vector', stack=stack)]
  return r


def rules() -> list[Rule]:
  """The whole SigLIP -> (MoonViT, pooling head, text tower, loss scalars) table."""
  vt, ip, tt = ('vision_tower',), ('image_pooling',), ('text_tower',)
  r = [
      Rule('vision_model.embeddings.patch_embedding.weight', vt + ('patch_embed', 'kernel'),
           'conv'),
      Rule('vision_model.embeddings.patch_embedding.bias', vt + ('patch_embed', 'bias'),
           'vector'),
      Rule('vision_model.embeddings.position_embedding.weight', vt + ('pos_emb',), 'pos_grid'),
  ]
  r += _layer_rules('vision_model.encoder.layers.{layer}.', vt + ('blocks',), 'vision')
  h = 'vision_model.head.'
  r += [
      Rule(h + 'probe', ip + ('probe',), 'squeeze'),
      Rule(h + 'attention.in_proj_weight', ip + ('wq', 'kernel'), 'linear', rows=(0, 3)),
      Rule(h + 'attention.in_proj_weight', ip + ('wkv', 'kernel'), 'linear', part=(1, 0),
           rows=(1, 3)),
      Rule(h + 'attention.in_proj_weight', ip + ('wkv', 'kernel'), 'linear', part=(1, 1),
           rows=(2, 3)),
      Rule(h + 'attention.in_proj_bias', ip + ('wq', 'bias'), 'vector', rows=(0, 3)),
      Rule(h + 'attention.in_proj_bias', ip + ('wkv', 'bias'), 'vector', part=(0, 0),
           rows=(1, 3)),
      Rule(h + 'attention.in_proj_bias', ip + ('wkv', 'bias'), 'vector', part=(0, 1),
           rows=(2, 3)),
      Rule(h + 'attention.out_proj.weight', ip + ('wo', 'kernel'), 'linear', n_in=2),
      Rule(h + 'attention.out_proj.bias', ip + ('wo', 'bias'), 'vector'),
  ]
  for t, leaf, kind in (('weight', 'kernel', 'linear'), ('bias', 'bias', 'vector')):
    r += [Rule(f'{h}mlp.{src}.{t}', ip + ('mlp', dst, leaf), kind)
          for src, dst in (('fc1', 'fc0'), ('fc2', 'fc1'))]
  for t, leaf in (('weight', 'scale'), ('bias', 'bias')):
    r += [Rule(f'vision_model.post_layernorm.{t}', vt + ('final_layernorm', leaf), 'vector'),
          Rule(f'{h}layernorm.{t}', ip + ('norm', leaf), 'vector'),
          Rule(f'text_model.final_layer_norm.{t}', tt + ('final_layernorm', leaf), 'vector')]
  r += [
      Rule('text_model.embeddings.token_embedding.weight', tt + ('token_embedding',), 'copy'),
      Rule('text_model.embeddings.position_embedding.weight', tt + ('position_embedding',),
           'copy'),
      Rule('text_model.head.weight', tt + ('head', 'kernel'), 'linear'),
      Rule('text_model.head.bias', tt + ('head', 'bias'), 'vector'),
      Rule('logit_scale', ('siglip_loss', 'log_temperature'), 'squeeze'),
      Rule('logit_bias', ('siglip_loss', 'bias'), 'squeeze'),
  ]
  r += _layer_rules('text_model.encoder.layers.{layer}.', tt + ('layers',), 'text')
  return r


def param_shapes(vision: VisionConfig, text: SiglipTextConfig) -> dict[tuple[str, ...], tuple]:
  """Flat {path: shape} of every parameter `load` returns (the modules' `init` gives the same:
  tests/checkpoint/test_siglip.py)."""
  # MoonViT's own shapes come from the Kimi-VL table (the text config there is irrelevant).
  shapes = {p: s for p, s in hf_mapping.param_shapes(config_lib.KimiVLConfig(vision=vision))
            .items() if p[0] == 'vision_tower'}
  D, N, H, F = vision.hidden_size, vision.num_heads, vision.head_dim, vision.intermediate_size
  ip = ('image_pooling',)
  shapes.update({
      ip + ('probe',): (D,),
      ip + ('wq', 'kernel'): (D, N, H), ip + ('wq', 'bias'): (N, H),
      ip + ('wkv', 'kernel'): (D, 2, N, H), ip + ('wkv', 'bias'): (2, N, H),
      ip + ('wo', 'kernel'): (N, H, D), ip + ('wo', 'bias'): (D,),
      ip + ('norm', 'scale'): (D,), ip + ('norm', 'bias'): (D,),
      ip + ('mlp', 'fc0', 'kernel'): (D, F), ip + ('mlp', 'fc0', 'bias'): (F,),
      ip + ('mlp', 'fc1', 'kernel'): (F, D), ip + ('mlp', 'fc1', 'bias'): (D,),
  })
  L, Dt, Nt, Ht, Ft = text.num_layers, text.hidden_size, text.num_heads, text.head_dim, \
      text.intermediate_size
  tt, ly = ('text_tower',), ('text_tower', 'layers')
  shapes.update({
      tt + ('token_embedding',): (text.vocab_size, Dt),
      tt + ('position_embedding',): (text.max_position_embeddings, Dt),
      ly + ('norm0', 'scale'): (L, Dt), ly + ('norm0', 'bias'): (L, Dt),
      ly + ('norm1', 'scale'): (L, Dt), ly + ('norm1', 'bias'): (L, Dt),
      ly + ('wqkv', 'kernel'): (L, Dt, 3, Nt, Ht), ly + ('wqkv', 'bias'): (L, 3, Nt, Ht),
      ly + ('wo', 'kernel'): (L, Nt, Ht, Dt), ly + ('wo', 'bias'): (L, Dt),
      ly + ('mlp', 'fc0', 'kernel'): (L, Dt, Ft), ly + ('mlp', 'fc0', 'bias'): (L, Ft),
      ly + ('mlp', 'fc1', 'kernel'): (L, Ft, Dt), ly + ('mlp', 'fc1', 'bias'): (L, Dt),
      tt + ('final_layernorm', 'scale'): (Dt,), tt + ('final_layernorm', 'bias'): (Dt,),
      tt + ('head', 'kernel'): (Dt, text.projection_size),
      tt + ('head', 'bias'): (text.projection_size,),
      ('siglip_loss', 'log_temperature'): (),
      ('siglip_loss', 'bias'): (),
  })
  return shapes


# ---------------------------------------------------------------------------------------------
# Configs.

def configs_from_hf_dict(cfg: dict, vision: VisionConfig | None = None
                         ) -> tuple[VisionConfig, SiglipTextConfig, int]:
  """An HF SigLIP `config.json` dict -> (MoonViT VisionConfig, SiglipTextConfig, G), G the
  checkpoint's position grid side, image_size // patch_size (the conv drops the remainder:
  384 px / 14 -> 27).

  Without `vision`, MoonViT takes SigLIP's width, depth, heads, MLP width, patch size and
  activation and keeps its own 64 x 64 grid, RoPE theta, merge kernel and LayerNorm eps (module
  docstring). A given `vision` is used as is (its shapes are checked against the tensors).
  """
  if 'vision_config' not in cfg or 'text_config' not in cfg:
    raise ValueError('an HF SigLIP config.json needs `vision_config` and `text_config`; got '
                     f'keys {sorted(cfg)}')
  vc = {'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12,
        'num_attention_heads': 12, 'num_channels': 3, 'image_size': 224, 'patch_size': 16,
        'hidden_act': 'gelu_pytorch_tanh', 'vision_use_head': True}  # HF defaults
  vc.update({k: v for k, v in cfg['vision_config'].items() if v is not None})
  if vc['num_channels'] != 3:
    raise ValueError(f'SigLIP vision_config.num_channels={vc["num_channels"]}; MoonViT takes '
                     'RGB patches (3 channels)')
  if not vc['vision_use_head']:
    raise ValueError('SigLIP vision_config.vision_use_head=False: the checkpoint has no '
                     'attention-pooling head to initialise image_pooling from')
  for name, act in (('vision', vc['hidden_act']),
                    ('text', cfg['text_config'].get('hidden_act') or 'gelu_pytorch_tanh')):
    if act not in ACTIVATIONS:
      raise ValueError(f'SigLIP {name}_config.hidden_act={act!r} is not supported; use one of '
                       f'{sorted(ACTIVATIONS)}')
  size, patch = vc['image_size'], vc['patch_size']
  if not isinstance(size, int) or not isinstance(patch, int) or size < patch:
    raise ValueError(f'SigLIP vision_config image_size={size!r} / patch_size={patch!r}: need '
                     'square int sizes, image_size >= patch_size')
  if vision is None:
    vision = VisionConfig(patch_size=patch, hidden_size=vc['hidden_size'],
                          num_layers=vc['num_hidden_layers'],
                          num_heads=vc['num_attention_heads'],
                          intermediate_size=vc['intermediate_size'], hidden_act=vc['hidden_act'])
  text = config_lib.siglip_text_from_hf_dict(cfg['text_config'])
  return vision, text, size // patch


# ---------------------------------------------------------------------------------------------
# Conversion.

def _slice_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of the part of a parameter one HF tensor (block) fills."""
  shp = list(shape[1:] if rule.stack else shape)
  if rule.part is not None:
    del shp[rule.part[0]]
  return tuple(shp)


def _hf_shape(rule: Rule, slice_shp: tuple[int, ...], grid: int) -> tuple[int, ...]:
  """The HF tensor shape that maps onto `slice_shp` (for `rows`: the whole fused tensor)."""
  if rule.kind == 'pos_grid':
    return (grid * grid, slice_shp[-1])
  if rule.kind == 'squeeze':
    return {'probe': (1, 1) + slice_shp}.get(rule.path[-1], (1,) + slice_shp)
  shp = hf_mapping.hf_shape(hf_mapping.Rule(rule.hf, rule.path, rule.kind, rule.n_in), slice_shp)
  if rule.rows is not None:
    shp = (shp[0] * rule.rows[1],) + shp[1:]
  return shp


def _to_param(rule: Rule, tensor: np.ndarray, slice_shp: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> the parameter part it fills."""
  if rule.rows is not None:
    index, count = rule.rows
    n = tensor.shape[0] // count
    tensor = tensor[index * n:(index + 1) * n]
  if rule.kind == 'pos_grid':
    return resize_position_grid(tensor, slice_shp[0], slice_shp[1])
  if rule.kind == 'squeeze':
    return tensor.reshape(slice_shp)
  return hf_mapping.to_param(hf_mapping.Rule(rule.hf, rule.path, rule.kind, rule.n_in), tensor,
                             slice_shp)


def resize_position_grid(table: np.ndarray, height: int, width: int) -> np.ndarray:
  """SigLIP's row-major position table [G*G, D] -> MoonViT's grid [height, width, D], resized by
  `vision.interpolate_pos_emb` (PyTorch's bicubic, what MoonViT applies per image)."""
  import jax.numpy as jnp
  from kimi_vl_jax.model import vision
  n, d = table.shape
  g = int(round(n ** 0.5))
  if g * g != n:
    raise ValueError(f'position table has {n} rows, not a square grid')
  grid = np.asarray(table, np.float32).reshape(g, g, d)
  if (g, g) == (height, width):
    return grid
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  coords = np.stack([rows, cols], -1).astype(np.int32)
  hw = np.broadcast_to(np.array([height, width], np.int32), coords.shape)
  return np.asarray(vision.interpolate_pos_emb(jnp.asarray(grid), jnp.asarray(coords),
                                               jnp.asarray(hw)))


def _expand(vision: VisionConfig, text: SiglipTextConfig):
  """(concrete HF key, rule, layer index or None) for every rule."""
  layers = {'vision': vision.num_layers, 'text': text.num_layers}
  for rule in rules():
    if rule.stack is None:
      yield rule.hf, rule, None
    else:
      for i in range(layers[rule.stack]):
        yield rule.hf.format(layer=i), rule, i


def convert(tensors, vision: VisionConfig, text: SiglipTextConfig, grid: int,
            dtype=np.float32) -> dict:
  """A TensorSource (e.g. `hf.SafetensorsReader`) or a mapping {HF key: array} of a SigLIP
  checkpoint with a `grid` x `grid` position table -> the nested params dict (module docstring),
  in `dtype` except the two loss scalars (fp32). Checks every key and shape before reading."""
  source = tensors if hasattr(tensors, 'read') else hf_mapping.ArraySource(tensors)
  shapes = param_shapes(vision, text)
  entries = list(_expand(vision, text))
  expected = {key: _hf_shape(rule, _slice_shape(rule, shapes[rule.path]), grid)
              for key, rule, _ in entries}
  keys = [k for k in source.keys() if not k.endswith(IGNORED_SUFFIXES)]
  missing = [f'{k} {expected[k]}' for k in sorted(expected.keys() - set(keys))]
  unexpected = [f'{k} {tuple(source.shape(k))}' for k in sorted(set(keys) - expected.keys())]
  if missing or unexpected:
    raise CheckpointMismatch(
        f'SigLIP checkpoint does not match the configs: {len(missing)} missing tensors (with '
        f'the shapes the configs expect) '
        f'{missing[:8]}{" ..." if len(missing) > 8 else ""}, {len(unexpected)} unexpected '
        f'tensors (with their shapes) {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')
  for key, rule, _ in entries:
    want = expected[key]
    got = tuple(source.shape(key))
    if got != want:
      raise CheckpointMismatch(f'{key}: checkpoint shape {got} but the configs expect {want} '
                               f'(param {"/".join(rule.path)})')
  out: dict[tuple[str, ...], np.ndarray] = {}
  fp32 = {('siglip_loss', 'log_temperature'), ('siglip_loss', 'bias')}
  for key, rule, layer in entries:
    path = rule.path
    if path not in out:
      out[path] = np.zeros(shapes[path], np.float32 if path in fp32 else dtype)
    tensor = np.asarray(source.read(key, (slice(None),)), np.float32)
    index = () if layer is None else (layer,)
    if rule.part is not None:
      axis, i = rule.part
      index += (slice(None),) * axis + (i,)
    out[path][index] = _to_param(rule, tensor, _slice_shape(rule, shapes[path]))
  return hf_mapping.unflatten(out)


@dataclasses.dataclass(frozen=True)
class SiglipInit:
  """What `load` returns: the two configs and the params (module docstring)."""
  vision: VisionConfig
  text: SiglipTextConfig
  params: dict


def load(path: str, *, vision_config: VisionConfig | None = None, dtype=np.float32
         ) -> SiglipInit:
  """Reads an HF SigLIP directory (`config.json` + `*.safetensors`, local or s3:// / gs://).
  `vision_config`: the MoonViT to initialise (default: `configs_from_hf_dict`'s). Raises
  CheckpointMismatch naming key and shapes on any missing, unexpected or mis-shaped tensor."""
  path = storage_files.fetch_tree(path, 'hf') if storage_paths.is_remote(path) else path
  with open(os.path.join(path, 'config.json')) as f:
    vision, text, grid = configs_from_hf_dict(json.load(f), vision_config)
  reader = hf.SafetensorsReader(path)
  try:
    params = convert(reader, vision, text, grid, dtype)
  finally:
    reader.close()
  return SiglipInit(vision, text, params)
