"""Abstract KimiVL parameter tree built from docs/param_tree.md (shapes + logical axis names).

Lets the optimizer grouping be tested on the real `kimi_vl_a3b` shapes without the model
modules; `real_abstract_params` uses the model itself when it is importable.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_vl_jax.model.config import KimiVLConfig


def _leaf(shape, axes):
  assert len(shape) == len(axes), (shape, axes)
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(tuple(shape), jnp.float32), tuple(axes))


def doc_abstract_params(config: KimiVLConfig) -> dict:
  """Boxed ShapeDtypeStructs following docs/param_tree.md exactly."""
  v, t = config.vision, config.text
  Dv, Nv, Hv, Fv, Lv = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size, v.num_layers
  D, N, V = t.hidden_size, t.num_heads, t.vocab_size
  R, Hr, Hn, Hvt = t.kv_lora_rank, t.qk_rope_head_dim, t.qk_nope_head_dim, t.v_head_dim
  E, Fe = t.n_routed_experts, t.moe_intermediate_size
  Fs = t.n_shared_experts * Fe
  ln = lambda *lead: {'scale': _leaf(lead + (Dv,), ('layers',) * len(lead) + ('norm',)),
                      'bias': _leaf(lead + (Dv,), ('layers',) * len(lead) + ('norm',))}
  vision = {
      'patch_embed': {'kernel': _leaf((v.patch_dim, Dv), ('patch', 'vit_embed')),
                      'bias': _leaf((Dv,), ('vit_embed',))},
      'pos_emb': _leaf((v.pos_emb_height, v.pos_emb_width, Dv), (None, None, 'vit_embed')),
      'blocks': {
          'norm0': ln(Lv), 'norm1': ln(Lv),
          'wqkv': {'kernel': _leaf((Lv, Dv, 3, Nv, Hv),
                                   ('layers', 'vit_embed', 'vit_qkv', 'vit_heads', 'vit_kv')),
                   'bias': _leaf((Lv, 3, Nv, Hv), ('layers', 'vit_qkv', 'vit_heads', 'vit_kv'))},
          'wo': {'kernel': _leaf((Lv, Nv, Hv, Dv), ('layers', 'vit_heads', 'vit_kv', 'vit_embed')),
                 'bias': _leaf((Lv, Dv), ('layers', 'vit_embed'))},
          'mlp': {'fc0': {'kernel': _leaf((Lv, Dv, Fv), ('layers', 'vit_embed', 'vit_mlp')),
                          'bias': _leaf((Lv, Fv), ('layers', 'vit_mlp'))},
                  'fc1': {'kernel': _leaf((Lv, Fv, Dv), ('layers', 'vit_mlp', 'vit_embed')),
                          'bias': _leaf((Lv, Dv), ('layers', 'vit_embed'))}},
      },
      'final_layernorm': ln(),
  }
  M = 4 * Dv
  projector = {
      'pre_norm': ln(),
      'linear_1': {'kernel': _leaf((M, M), ('mm_embed', 'mm_embed')),
                   'bias': _leaf((M,), ('mm_embed',))},
      'linear_2': {'kernel': _leaf((M, D), ('mm_embed', 'embed')), 'bias': _leaf((D,), ('embed',))},
  }

  def attn(L):
    a = {'kv_a_proj_with_mqa': {'kernel': _leaf((L, D, R + Hr), ('layers', 'embed', 'kv_lora'))},
         'kv_a_layernorm': {'scale': _leaf((L, R), ('layers', 'norm'))},
         'kv_b_proj': {'kernel': _leaf((L, R, N, Hn + Hvt), ('layers', 'kv_lora', 'heads', 'kv'))},
         'o_proj': {'kernel': _leaf((L, N, Hvt, D), ('layers', 'heads', 'kv', 'embed'))}}
    if t.q_lora_rank is None:
      a['q_proj'] = {'kernel': _leaf((L, D, N, Hn + Hr), ('layers', 'embed', 'heads', 'kv'))}
    else:
      Rq = t.q_lora_rank
      a['q_a_proj'] = {'kernel': _leaf((L, D, Rq), ('layers', 'embed', 'q_lora'))}
      a['q_a_layernorm'] = {'scale': _leaf((L, Rq), ('layers', 'norm'))}
      a['q_b_proj'] = {'kernel': _leaf((L, Rq, N, Hn + Hr), ('layers', 'q_lora', 'heads', 'kv'))}
    return a

  def norms(L):
    return {'input_layernorm': {'scale': _leaf((L, D), ('layers', 'norm'))},
            'post_attention_layernorm': {'scale': _leaf((L, D), ('layers', 'norm'))}}

  def ffn(L, F):
    return {'gate_proj': {'kernel': _leaf((L, D, F), ('layers', 'embed', 'mlp'))},
            'up_proj': {'kernel': _leaf((L, D, F), ('layers', 'embed', 'mlp'))},
            'down_proj': {'kernel': _leaf((L, F, D), ('layers', 'mlp', 'embed'))}}

  Ld, Lm = t.num_dense_layers, t.num_moe_layers
  ex = ('layers', 'expert')
  lm = {
      'embed_tokens': {'embedding': _leaf((V, D), ('vocab', 'embed'))},
      'dense_layers': {**norms(Ld), 'self_attn': attn(Ld), 'mlp': ffn(Ld, t.intermediate_size)},
      'moe_layers': {**norms(Lm), 'self_attn': attn(Lm), 'mlp': {
          'gate': {'kernel': _leaf((Lm, D, E), ('layers', 'embed', 'expert')),
                   'e_score_correction_bias': _leaf((Lm, E), ex)},
          'experts': {'gate_proj': _leaf((Lm, E, D, Fe), ex + ('embed', 'expert_mlp')),
                      'up_proj': _leaf((Lm, E, D, Fe), ex + ('embed', 'expert_mlp')),
                      'down_proj': _leaf((Lm, E, Fe, D), ex + ('expert_mlp', 'embed'))},
          'shared_experts': ffn(Lm, Fs)}},
      'norm': {'scale': _leaf((D,), ('norm',))},
  }
  if not t.tie_word_embeddings:
    lm['lm_head'] = {'kernel': _leaf((D, V), ('embed', 'vocab'))}
  return {'vision_tower': vision, 'projector': projector, 'language_model': lm}


def real_abstract_params(config: KimiVLConfig):
  """The model's own boxed abstract params, or None while the model modules are missing."""
  try:
    from kimi_vl_jax.model.kimi_vl import KimiVL, dummy_inputs
  except ImportError:
    return None
  return jax.eval_shape(
      lambda: KimiVL(config).init(jax.random.key(0), **dummy_inputs(config)))['params']
