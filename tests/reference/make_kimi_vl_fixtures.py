"""Writes tests/fixtures/kimi_vl_tiny/: a whole tiny Kimi-VL checkpoint (sharded) + reference logits.

Run with the PyTorch reference venv (torch + transformers >= 5.23), from anywhere:

    python tests/reference/make_kimi_vl_fixtures.py

Reference model: transformers' `Kimi_K25ForConditionalGeneration` (MoonViT vision tower, patch-merge
projector, DeepSeek-V3 language model, separate LM head), fp32, eager attention, with
  * vision = tiny().vision (make_vision_fixtures.VISION), projector LayerNorm eps 1e-5;
  * text   = tiny().text of kimi_vl_jax/model/config.py (TEXT below: vocab 1024, hidden 64,
             3 layers, 4 heads, kv_lora 32, nope 16, rope 8, v 16, intermediate 128,
             moe_intermediate 32, 8 routed experts + 1 shared, top-2, first_k_dense_replace 1,
             routed_scaling 2.446, rope_theta 10000, rms eps 1e-5) with a random non-zero
             e_score_correction_bias;
  * media placeholder id 1023 (`image_token_id`).
The weights are written in the **Kimi-VL HF layout** (docs/param_tree.md): `vision_tower.*` and
`multi_modal_projector.*` converted from K2.5 names (q/k row permutation documented in
make_vision_fixtures.py), `language_model.model.*` with per-expert MLP keys (transformers fuses
experts into `gate_up_proj [E, 2F, D]` / `down_proj [E, D, F]` in memory) and
`language_model.lm_head.weight`, split over 3 safetensors shards with `model.safetensors.index.json`.
`config.json` is a Kimi-VL style config (`vision_config` with MoonViT field names, `text_config`
with DeepSeek-V3 field names, `media_placeholder_token_id`).

Inputs (`inputs.npz`): `input_ids` int32 [2, 40] with the placeholder expanded to h*w/4 copies per
image, wrapped as media_start(1020) content(1021) pads media_end(1022); three images: 4x6 and 6x8
in row 0, 8x4 in row 1 (they fill placeholders in batch-flattened order, as HF does);
`pixel_values` float16 [L, 3, 14, 14] (values (q - 7.5) / 4, exact in fp16 and fp32; cast to fp32)
in HF order (row-major per image, images concatenated); `image_grid_hws` int64 [3, 2].
Outputs (`outputs.npz`): `logits` float32 [2, 40, 1024] and `image_features` float32 [26, 64] (the
projector output, for localising a mismatch).

A seed is rejected when any MoE router's top-k choice has a margin below MIN_MARGIN (checked on
every token of every MoE layer with the reference's own router inputs), so fp32 rounding
differences between implementations cannot flip an expert choice.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_vision_fixtures as mv  # noqa: E402  (shared MoonViT helpers)

OUT_DIR = os.path.join(HERE, '..', 'fixtures', 'kimi_vl_tiny')
MIN_MARGIN = 2e-4
N_SHARDS = 3
PLACEHOLDER = 1023
MEDIA_START, MEDIA_CONTENT, MEDIA_END = 1020, 1021, 1022

# kimi_vl_jax.model.config.tiny().text in DeepSeek-V3 field names.
TEXT = dict(
    vocab_size=1024, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128, moe_intermediate_size=32,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.446,
    rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
    hidden_act='silu', attention_bias=False, rope_interleave=True,
)
ROPE_THETA = 10000.0
ROWS = [[(4, 6), (6, 8)], [(8, 4)]]  # images per batch row
SEQ_LEN = 40


def build_model(seed: int):
  from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config
  from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25ForConditionalGeneration
  text = dict(TEXT, model_type='deepseek_v3',
              rope_parameters={'rope_type': 'default', 'rope_theta': ROPE_THETA})
  cfg = Kimi_K25Config(text_config=text, vision_config=mv.k25_vision_config().to_dict(),
                       projection_hidden_size=mv.VISION['hidden_size'],
                       projection_layer_norm_eps=mv.LN_EPS, image_token_id=PLACEHOLDER,
                       tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = Kimi_K25ForConditionalGeneration(cfg).float().eval()
  model.set_attn_implementation('eager')
  gen = torch.Generator().manual_seed(seed)
  mv.randomize_(model, gen)
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith('e_score_correction_bias'):
        buf.copy_((0.1 * torch.randn(buf.shape, generator=gen)).to(torch.bfloat16).float())
  assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
  return model


def make_inputs(rng: np.random.Generator, gen: torch.Generator):
  rows, grids = [], []
  for images in ROWS:
    ids = []
    for h, w in images:
      ids += list(rng.integers(0, 1000, size=3))
      ids += [MEDIA_START, MEDIA_CONTENT] + [PLACEHOLDER] * (h * w // 4) + [MEDIA_END]
      grids.append((h, w))
    ids += list(rng.integers(0, 1000, size=SEQ_LEN - len(ids)))
    assert len(ids) == SEQ_LEN, len(ids)
    rows.append(ids)
  n = sum(h * w for h, w in grids)
  _, pixel_values = mv.make_pixels(gen, n)
  return np.array(rows, np.int32), pixel_values, np.array(grids, np.int64)


def router_margin(gate, hidden: torch.Tensor) -> float:
  """Smallest gap between the k-th and (k+1)-th expert score-for-choice over tokens (n_group 1)."""
  assert gate.num_group == 1
  scores = torch.sigmoid(hidden.reshape(-1, gate.hidden_dim).float() @ gate.weight.float().T)
  choice = (scores + gate.e_score_correction_bias).sort(-1, descending=True)[0]
  return (choice[:, gate.top_k - 1] - choice[:, gate.top_k]).min().item()


def run(model, input_ids, pixel_values, grids):
  margins = []
  lm = model.model.language_model
  hooks = [lm.layers[i].mlp.gate.register_forward_hook(
      lambda mod, args, out: margins.append(router_margin(mod, args[0])))
      for i in range(TEXT['first_k_dense_replace'], TEXT['num_hidden_layers'])]
  grid_thw = torch.tensor([[1, h, w] for h, w in grids])
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(input_ids).long(), pixel_values=pixel_values,
                   image_grid_thw=grid_thw).logits.float()
    feats = torch.cat(model.model.get_image_features(pixel_values, grid_thw).pooler_output)
  for h in hooks:
    h.remove()
  return logits.numpy(), feats.float().numpy(), min(margins)


def kimivl_state_dict(model) -> dict:
  """Kimi_K25ForConditionalGeneration state dict -> Kimi-VL checkpoint tensors."""
  sd = model.state_dict()
  out = mv.k25_vision_to_kimivl(sd, mv.VISION['num_attention_heads'],
                                prefix_in='model.vision_tower.')
  out.update(mv.k25_projector_to_kimivl(sd, prefix_in='model.mm_projector.'))
  fe = TEXT['moe_intermediate_size']
  for name, t in sd.items():
    t = t.detach().float().contiguous()
    if name == 'lm_head.weight':
      out['language_model.lm_head.weight'] = t
      continue
    if not name.startswith('model.language_model.'):
      continue
    name = 'language_model.model.' + name[len('model.language_model.'):]
    if name.endswith('mlp.experts.gate_up_proj'):  # [E, 2F, D], rows gate | up
      stem = name[:-len('gate_up_proj')]
      for e in range(t.shape[0]):
        out[f'{stem}{e}.gate_proj.weight'] = t[e, :fe].clone()
        out[f'{stem}{e}.up_proj.weight'] = t[e, fe:].clone()
    elif name.endswith('mlp.experts.down_proj'):  # [E, D, F]
      stem = name[:-len('down_proj')]
      for e in range(t.shape[0]):
        out[f'{stem}{e}.down_proj.weight'] = t[e].clone()
    else:
      out[name] = t
  return {k: v.contiguous() for k, v in out.items()}


def kimivl_config() -> dict:
  text = dict(TEXT, model_type='deepseek_v3', rope_theta=ROPE_THETA, rope_scaling=None,
              scoring_func='sigmoid', topk_method='noaux_tc', moe_layer_freq=1, ep_size=1)
  vision = dict(mv.VISION, model_type='moonvit')
  return {'architectures': ['KimiVLForConditionalGeneration'], 'model_type': 'kimi_vl',
          'media_placeholder_token_id': PLACEHOLDER, 'vision_config': vision, 'text_config': text}


def save_sharded(tensors: dict, out_dir: str, n_shards: int) -> None:
  """Greedy split in key order into `n_shards` files of about equal size + the HF index json."""
  total = sum(t.numel() * t.element_size() for t in tensors.values())
  names = [f'model-{i + 1:05d}-of-{n_shards:05d}.safetensors' for i in range(n_shards)]
  shards, size, weight_map = [{} for _ in range(n_shards)], 0, {}
  for key in sorted(tensors):
    i = min(n_shards - 1, size * n_shards // total)
    shards[i][key] = tensors[key]
    weight_map[key] = names[i]
    size += tensors[key].numel() * tensors[key].element_size()
  for name, shard in zip(names, shards):
    assert shard, 'empty shard'
    save_file(shard, os.path.join(out_dir, name), metadata={'format': 'pt'})
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=1)


def main():
  for seed in range(50):
    model = build_model(seed)
    input_ids, pixel_values, grids = make_inputs(np.random.default_rng(seed),
                                                 torch.Generator().manual_seed(seed))
    logits, feats, margin = run(model, input_ids, pixel_values, grids)
    if margin >= MIN_MARGIN:
      break
    print(f'seed {seed}: router margin {margin:.2e} < {MIN_MARGIN}; reseeding')
  else:
    raise RuntimeError(f'no seed with router margins >= {MIN_MARGIN}')

  tensors = kimivl_state_dict(model)
  # Cross-check the vision + projector part against the independent Kimi-VL re-implementation.
  with torch.no_grad():
    ref_vis = mv.kimivl_moonvit_forward(tensors, pixel_values, grids.tolist(),
                                        mv.VISION['num_attention_heads'])
    ref_feats = mv.kimivl_projector_forward(tensors, ref_vis, grids.tolist())
  err = np.abs(ref_feats.numpy() - feats).max()
  assert err < 1e-4, f'image features disagree with the Kimi-VL re-implementation: {err}'
  assert (input_ids == PLACEHOLDER).sum() == len(feats)

  os.makedirs(OUT_DIR, exist_ok=True)
  for f in os.listdir(OUT_DIR):
    if f.endswith('.safetensors'):
      os.remove(os.path.join(OUT_DIR, f))
  save_sharded(tensors, OUT_DIR, N_SHARDS)
  with open(os.path.join(OUT_DIR, 'config.json'), 'w') as f:
    json.dump(kimivl_config(), f, indent=1)
  assert torch.equal(pixel_values.half().float(), pixel_values)
  np.savez(os.path.join(OUT_DIR, 'inputs.npz'), input_ids=input_ids,
           pixel_values=pixel_values.half().numpy(), image_grid_hws=grids)
  np.savez(os.path.join(OUT_DIR, 'outputs.npz'), logits=logits.astype(np.float32),
           image_features=feats.astype(np.float32))
  print(f'seed {seed}: min router margin {margin:.2e}, logits std {logits.std():.3f}, image '
        f'features vs re-implementation {err:.1e}, {len(tensors)} tensors')
  print('wrote', os.path.normpath(OUT_DIR),
        {f: os.path.getsize(os.path.join(OUT_DIR, f)) for f in sorted(os.listdir(OUT_DIR))})


if __name__ == '__main__':
  main()
