"""Model hyper-parameters: one frozen dataclass per component.

Built from a preset (`tiny`, `small`, `kimi_vl_a3b`) or from an HF `config.json` (the
`moonshotai/Kimi-VL-A3B-*` layout: `vision_config`, `text_config` with DeepSeek-V3 field names,
`media_placeholder_token_id`). The A3B values are the released checkpoint's `config.json`
(Kimi-VL report, arXiv 2504.07491, sec. 2.1: MoonViT 400M, 2.8B activated of 16B MoE parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """MoonViT (Kimi-VL report sec. 2.1)."""
  patch_size: int = 14
  hidden_size: int = 1152
  num_layers: int = 27
  num_heads: int = 16
  intermediate_size: int = 4304
  pos_emb_height: int = 64
  pos_emb_width: int = 64
  merge_kernel: tuple[int, int] = (2, 2)
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'gelu_pytorch_tanh'

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return 3 * self.patch_size * self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """DeepSeek-V3-style MLA + MoE decoder ("Moonlight", Kimi-VL report sec. 2.1); the fields up to
  `tie_word_embeddings` are the HF `text_config` ones."""
  vocab_size: int = 163840
  hidden_size: int = 2048
  num_layers: int = 27
  num_heads: int = 16
  q_lora_rank: int | None = None
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  intermediate_size: int = 11264
  moe_intermediate_size: int = 1408
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  num_experts_per_tok: int = 6
  first_k_dense_replace: int = 1
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.446
  rope_theta: float = 800000.0
  # HF `rope_scaling` as a sorted tuple of (key, value) pairs so the config stays hashable;
  # None = plain RoPE. Use `rope_scaling_dict` to read it.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  kv_lora_norm_eps: float = 1e-6
  max_position_embeddings: int = 131072
  tie_word_embeddings: bool = False
  # Implementation choices (not in HF configs).
  moe_impl: str = 'dropless'  # 'dropless' (ragged_dot) | 'dropless_blocked' | 'capacity'
  capacity_factor: float = 1.25
  # Attention when the rules split the sequence over the 'context' mesh axis (parallel/context.py):
  # 'all_gather' (each shard keeps its queries, gathers K/V) or 'none' (leave it to XLA's sharding
  # propagation). Either is the plain single-device computation without a context axis.
  context_parallel: str = 'all_gather'

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - self.first_k_dense_replace if self.n_routed_experts else 0

  @property
  def num_dense_layers(self) -> int:
    return self.num_layers - self.num_moe_layers

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)


ATTENTION_IMPLS = ('dense', 'flash')


def check_pipeline(num_layers: int, stages: int, microbatches: int, repeats: int = 1,
                   batch: int | None = None) -> int:
  """Validates a pipeline schedule (the `pipeline_*` fields) for `num_layers` pipelined layers
  and, if given, a batch of `batch` rows; returns the layers per stage and repeat.

  S stages x R circular repeats must divide the layers, M microbatches the batch, and a circular
  schedule (R > 1) needs M >= S: a microbatch must leave the last stage before stage 0 needs it
  for its next repeat.
  """
  S, M, R = stages, microbatches, repeats
  for name, v in (('pipeline_stages', S), ('pipeline_microbatches', M),
                  ('pipeline_repeats', R)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f'{name} must be a positive int, got {v!r}')
  if num_layers % (S * R):
    raise ValueError(
        f'the MoE stack has {num_layers} layers, not divisible by pipeline_stages x '
        f'pipeline_repeats = {S} x {R}; every stage must run the same number of layers per repeat')
  if batch is not None and batch % M:
    raise ValueError(f'the batch has {batch} rows, not divisible by pipeline_microbatches={M}; '
                     f'use a batch size that is a multiple of {M}')
  if R > 1 and M < S:
    raise ValueError(
        f'circular pipelining (pipeline_repeats={R}) needs pipeline_microbatches >= '
        f'pipeline_stages, got {M} < {S}: a microbatch must leave the last stage before '
        'stage 0 needs it for its next repeat')
  return num_layers // (S * R)


@dataclasses.dataclass(frozen=True)
class KimiVLConfig:
  """The whole model plus the numerics / memory knobs that are not part of the checkpoint."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  media_placeholder_token_id: int = 163605
  projector_ln_eps: float = 1e-5
  dtype: str = 'float32'        # compute dtype of matmuls / activations
  param_dtype: str = 'float32'  # storage dtype of parameters
  scan_layers: bool = True
  # Remat policy name: 'none' (no remat), 'full' (save nothing), or any name in
  # `jax.checkpoint_policies` (e.g. 'dots_with_no_batch_dims_saveable').
  remat_policy: str = 'none'
  # Under context parallelism (text.context_parallel != 'none' and a 'context' mesh axis > 1), run
  # the decoder on rows in the load-balanced "dual chunk swap" order (parallel/context.py).
  context_load_balance: bool = True
  # Pipeline parallelism over the MoE layer stack (parallel/pipeline.py): S stages (the stage
  # axis maps to the 'pipeline' mesh axis), M microbatches (a split of the batch), R circular
  # repeats (each stage holds R non-adjacent blocks of layers). S=1 is the plain nn.scan.
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1
  pipeline_repeats: int = 1
  # Attention kernel of MLA and MoonViT: 'dense' materialises [B, N, T, S] fp32 scores; 'flash'
  # (model/flash.py) runs blocks of attention_block_q queries x attention_block_kv keys with an
  # online softmax and a recomputing backward, so memory is O(T x block) (long-context training).
  attention_impl: str = 'dense'
  attention_block_q: int = 512
  attention_block_kv: int = 512

  def __post_init__(self):
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}')
    for name in ('attention_block_q', 'attention_block_kv'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f'{name} must be a positive int, got {getattr(self, name)!r}')
    if self.pipeline_stages > 1 and not self.scan_layers:
      raise ValueError('pipeline_stages > 1 needs scan_layers=True (the pipeline splits the '
                       'stacked [L, ...] MoE layer parameters into stages)')
    check_pipeline(self.text.num_moe_layers if self.pipeline_stages > 1 else 0,
                   self.pipeline_stages, self.pipeline_microbatches, self.pipeline_repeats)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> 'KimiVLConfig':
    return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------------------------
# Presets.

def kimi_vl_a3b() -> KimiVLConfig:
  """The released Kimi-VL-A3B (`moonshotai/Kimi-VL-A3B-Instruct` config.json)."""
  return KimiVLConfig()


def small() -> KimiVLConfig:
  """A ~200M-parameter model with the same structure, for benchmarks."""
  return KimiVLConfig(
      vision=VisionConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536),
      text=TextConfig(vocab_size=32768, hidden_size=768, num_layers=8, num_heads=8,
                      kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                      v_head_dim=64, intermediate_size=3072, moe_intermediate_size=512,
                      n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                      rope_theta=50000.0, max_position_embeddings=32768),
      media_placeholder_token_id=32767,  # inside the 32K vocab (the default is the A3B's id)
  )


def tiny() -> KimiVLConfig:
  """A few-hundred-K-parameter model that exercises every code path, for tests and CPU demos."""
  return KimiVLConfig(
      vision=VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                          pos_emb_height=16, pos_emb_width=16),
      text=TextConfig(vocab_size=1024, hidden_size=64, num_layers=3, num_heads=4,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                      first_k_dense_replace=1, routed_scaling_factor=2.446,
                      rope_theta=10000.0, max_position_embeddings=4096),
      media_placeholder_token_id=1023,
  )


PRESETS = {'kimi_vl_a3b': kimi_vl_a3b, 'small': small, 'tiny': tiny}


def get_preset(name: str, **overrides) -> KimiVLConfig:
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {sorted(PRESETS)}')
  return PRESETS[name]().replace(**overrides)


# --------------------------------------------------------------------------------------------
# HF config.json <-> KimiVLConfig.

_TEXT_FIELDS = {  # HF text_config key -> TextConfig field
    'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
    'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
    'q_lora_rank': 'q_lora_rank', 'kv_lora_rank': 'kv_lora_rank',
    'qk_nope_head_dim': 'qk_nope_head_dim', 'qk_rope_head_dim': 'qk_rope_head_dim',
    'v_head_dim': 'v_head_dim', 'intermediate_size': 'intermediate_size',
    'moe_intermediate_size': 'moe_intermediate_size', 'n_routed_experts': 'n_routed_experts',
    'n_shared_experts': 'n_shared_experts', 'num_experts_per_tok': 'num_experts_per_tok',
    'first_k_dense_replace': 'first_k_dense_replace', 'n_group': 'n_group',
    'topk_group': 'topk_group', 'norm_topk_prob': 'norm_topk_prob',
    'routed_scaling_factor': 'routed_scaling_factor', 'rope_theta': 'rope_theta',
    'rms_norm_eps': 'rms_norm_eps', 'max_position_embeddings': 'max_position_embeddings',
    'tie_word_embeddings': 'tie_word_embeddings',
}
_VISION_FIELDS = {
    'patch_size': 'patch_size', 'hidden_size': 'hidden_size',
    'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
    'intermediate_size': 'intermediate_size', 'init_pos_emb_height': 'pos_emb_height',
    'init_pos_emb_width': 'pos_emb_width', 'merge_kernel_size': 'merge_kernel',
}


def _check_supported_text(tc: dict) -> None:
  """Refuse HF options this implementation does not reproduce, instead of silently differing."""
  checks = [
      ('scoring_func', 'sigmoid'), ('topk_method', 'noaux_tc'), ('hidden_act', 'silu'),
      ('moe_layer_freq', 1), ('attention_bias', False), ('ep_size', 1),
  ]
  for key, want in checks:
    if key in tc and tc[key] is not None and tc[key] != want:
      raise ValueError(f'text_config.{key}={tc[key]!r} is not supported (only {want!r})')
  if tc.get('rope_interleave', True) is False:
    raise ValueError('text_config.rope_interleave=False is not supported: DeepSeek-V3 '
                     'checkpoints store the rope part of q/k interleaved')


def from_hf_dict(cfg: dict, **overrides) -> KimiVLConfig:
  """Builds a KimiVLConfig from the dict of an HF Kimi-VL `config.json`."""
  if 'text_config' not in cfg or 'vision_config' not in cfg:
    raise ValueError('an HF Kimi-VL config.json needs `text_config` and `vision_config`; '
                     f'got keys {sorted(cfg)}')
  tc, vc = dict(cfg['text_config']), dict(cfg['vision_config'])
  _check_supported_text(tc)
  text = {f: tc[k] for k, f in _TEXT_FIELDS.items() if k in tc}
  # transformers >= 5 may carry rope settings in `rope_parameters`.
  rp = tc.get('rope_parameters')
  if isinstance(rp, dict):
    if 'rope_theta' in rp:
      text['rope_theta'] = rp['rope_theta']
    if rp.get('rope_type', 'default') != 'default':
      tc.setdefault('rope_scaling', rp)
  rs = tc.get('rope_scaling')
  if rs:
    rs = dict(rs)
    rs.setdefault('rope_type', rs.get('type', 'default'))
    rs.pop('type', None)
    if rs['rope_type'] != 'default':
      text['rope_scaling'] = tuple(sorted((k, v) for k, v in rs.items() if k != 'rope_theta'))
  if text.get('n_routed_experts') is None:
    text['n_routed_experts'] = 0
  vision = {f: vc[k] for k, f in _VISION_FIELDS.items() if k in vc}
  if 'merge_kernel' in vision:
    vision['merge_kernel'] = tuple(vision['merge_kernel'])
  if 'hidden_act' in vc:
    vision['hidden_act'] = vc['hidden_act']
  top = {}
  if 'media_placeholder_token_id' in cfg:
    top['media_placeholder_token_id'] = cfg['media_placeholder_token_id']
  config = KimiVLConfig(vision=VisionConfig(**vision), text=TextConfig(**text), **top)
  return config.replace(**overrides)


def from_hf_json(path: str, **overrides) -> KimiVLConfig:
  """`path` is a `config.json` or a directory holding one."""
  if os.path.isdir(path):
    path = os.path.join(path, 'config.json')
  with open(path) as f:
    return from_hf_dict(json.load(f), **overrides)


def to_hf_dict(config: KimiVLConfig) -> dict:
  """The HF `config.json` dict of a KimiVLConfig (inverse of `from_hf_dict`)."""
  t, v = config.text, config.vision
  text = {k: getattr(t, f) for k, f in _TEXT_FIELDS.items()}
  text.update(model_type='deepseek_v3', hidden_act='silu', scoring_func='sigmoid',
              topk_method='noaux_tc', moe_layer_freq=1, attention_bias=False,
              rope_scaling=t.rope_scaling_dict, kv_lora_norm_eps=t.kv_lora_norm_eps)
  vision = {k: getattr(v, f) for k, f in _VISION_FIELDS.items()}
  vision['merge_kernel_size'] = list(v.merge_kernel)
  vision.update(model_type='moonvit', hidden_act=v.hidden_act)
  return {
      'architectures': ['KimiVLForConditionalGeneration'],
      'model_type': 'kimi_vl',
      'media_placeholder_token_id': config.media_placeholder_token_id,
      'text_config': text,
      'vision_config': vision,
  }


def demo() -> KimiVLConfig:
  """A 2.3M-parameter model (1.6M active) for the CPU joint-SFT demo (configs/joint_sft.py:tiny):
  `tiny` with a wider vision tower and decoder, 8 narrow attention heads."""
  t = tiny()
  return t.replace(
      vision=dataclasses.replace(t.vision, hidden_size=96, num_layers=3, intermediate_size=256),
      text=dataclasses.replace(t.text, hidden_size=128, num_layers=4, num_heads=8,
                               kv_lora_rank=96, qk_rope_head_dim=16, intermediate_size=384,
                               moe_intermediate_size=96,
                               moe_impl='dropless_blocked'))  # exact dropless, fast on CPU


PRESETS['demo'] = demo


# --------------------------------------------------------------------------------------------
# SigLIP text tower (MoonViT pre-training, Kimi-VL report sec. 2.3: both encoders start from
# SigLIP-SO400M).

@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
  """SigLIP's text encoder (`model/siglip_text.py`); field names follow the HF `text_config`
  of a `SiglipModel` checkpoint (`siglip_text_from_hf_dict`). Defaults: SigLIP-SO400M/14."""
  vocab_size: int = 32000
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 27
  num_heads: int = 16
  max_position_embeddings: int = 64
  projection_size: int = 1152
  layer_norm_eps: float = 1e-6
  hidden_act: str = 'gelu_pytorch_tanh'

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'SigLIP text hidden_size {self.hidden_size} is not divisible by '
                       f'num_heads {self.num_heads}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def siglip_so400m_text() -> SiglipTextConfig:
  """The text tower of `siglip-so400m-patch14-384` (and -224): width 1152, 27 layers, 16 heads,
  MLP 4304, 32000 tokens, 64 positions, projected to 1152 (the vision width)."""
  return SiglipTextConfig()


def siglip_tiny_text() -> SiglipTextConfig:
  """A few-thousand-parameter text tower for tests, projecting to tiny().vision's width."""
  return SiglipTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, max_position_embeddings=16, projection_size=64)


SIGLIP_TEXT_PRESETS = {'so400m': siglip_so400m_text, 'tiny': siglip_tiny_text}

_SIGLIP_TEXT_FIELDS = {  # HF SiglipTextConfig key -> SiglipTextConfig field
    'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
    'intermediate_size': 'intermediate_size', 'num_hidden_layers': 'num_layers',
    'num_attention_heads': 'num_heads', 'max_position_embeddings': 'max_position_embeddings',
    'projection_size': 'projection_size', 'layer_norm_eps': 'layer_norm_eps',
    'hidden_act': 'hidden_act',
}
# HF defaults of the keys a SigLIP config.json may leave out (transformers' SiglipTextConfig).
_SIGLIP_TEXT_HF_DEFAULTS = {'vocab_size': 32000, 'hidden_size': 768, 'intermediate_size': 3072,
                            'num_hidden_layers': 12, 'num_attention_heads': 12,
                            'max_position_embeddings': 64, 'layer_norm_eps': 1e-6,
                            'hidden_act': 'gelu_pytorch_tanh'}


def siglip_text_from_hf_dict(text_config: dict) -> SiglipTextConfig:
  """The `text_config` dict of an HF SigLIP `config.json` -> SiglipTextConfig (HF's defaults for
  absent keys; `projection_size` defaults to `hidden_size` as in HF)."""
  tc = {**_SIGLIP_TEXT_HF_DEFAULTS, **{k: v for k, v in text_config.items() if v is not None}}
  tc.setdefault('projection_size', tc['hidden_size'])
  return SiglipTextConfig(**{f: tc[k] for k, f in _SIGLIP_TEXT_FIELDS.items()})
