"""Useful FLOPs of a step: 6 x active matmul parameters x tokens + attention, vision included."""

import dataclasses

import pytest

from kimi_vl_jax.model import flops, summary
from kimi_vl_jax.model.config import get_preset


def test_matmul_parameters_are_the_active_parameters_without_tables_norms_and_biases():
  c = get_preset('tiny')
  p = flops.matmul_params(c)
  counts = summary.count(c)
  t, v = c.text, c.vision
  embed = t.vocab_size * t.hidden_size
  norms = (2 * t.num_layers + 1) * t.hidden_size + t.num_layers * t.kv_lora_rank
  router_bias = t.num_moe_layers * t.n_routed_experts
  assert p['text'] == counts['language_model_active'] - embed - norms - router_bias
  conv_free = counts['vision_tower'] - v.pos_emb_height * v.pos_emb_width * v.hidden_size
  # Per block: fc0 bias [F]; fc1, wo, norm0 / norm1 scale and bias [D]; wqkv bias [3D]. Then the
  # patch embedding's bias and the final norm.
  biases_and_norms = v.num_layers * (v.intermediate_size + 9 * v.hidden_size) + 3 * v.hidden_size
  assert p['vision'] == conv_free - biases_and_norms


def test_useful_flops_formula():
  c = get_preset('tiny')
  t, v = c.text, c.vision
  p = flops.matmul_params(c)
  out = flops.useful_flops(c, rows=3, seq_len=8, max_patches=40, image_patches=16)
  assert out['text_matmul'] == 6 * p['text'] * 3 * 8
  # Causal: 8 * 9 / 2 query-key pairs per row, fwd 2 FLOPs per pair per head per dim, x3 train.
  assert out['text_attention'] == pytest.approx(
      3 * 2 * 36 * t.num_heads * (t.qk_head_dim + t.v_head_dim) * t.num_layers * 3)
  # Images of 16 patches: two full ones and one of 8 per row, all pairs inside an image.
  pairs = 2 * 16 * 16 + 8 * 8
  assert out['vision_attention'] == pytest.approx(
      3 * 2 * pairs * v.num_heads * 2 * v.head_dim * v.num_layers * 3)
  assert out['vision_matmul'] == pytest.approx(6 * p['vision'] * 120 + 6 * p['projector'] * 30)
  assert out['total'] == pytest.approx(sum(out[k] for k in (
      'text_matmul', 'text_attention', 'vision_matmul', 'vision_attention')))
  # Known segments shrink the causal attention; no patches, no vision.
  seg = flops.useful_flops(c, rows=3, seq_len=8, segment_len=4)
  assert seg['text_attention'] == pytest.approx(out['text_attention'] * 20 / 36)
  assert seg['vision_matmul'] == seg['vision_attention'] == 0


def test_routed_experts_count_top_k_of_n():
  c = get_preset('tiny')
  more = dataclasses.replace(c, text=dataclasses.replace(c.text, num_experts_per_tok=4))
  t = c.text
  routed = t.num_moe_layers * t.n_routed_experts * 3 * t.hidden_size * t.moe_intermediate_size
  diff = flops.matmul_params(more)['text'] - flops.matmul_params(c)['text']
  assert diff == pytest.approx(routed * 2 / t.n_routed_experts)
