"""Writes tests/fixtures/siglip_tiny/: a tiny random transformers `SiglipModel` and its outputs.

Run with the PyTorch reference venv (torch + transformers >= 5), from anywhere:

    python tests/reference/make_siglip_fixtures.py

The model is transformers' `SiglipModel` (the layout of the SigLIP-SO400M checkpoints MoonViT is
initialised from, Kimi-VL report sec. 2.3) at a tiny shape, every parameter overwritten with
seeded random values rounded to bf16-representable fp32 (`make_vision_fixtures.randomize_`), saved
as its own `model.safetensors` (HF key names, untouched) and `config.json`
(`SiglipConfig.to_dict()`). The tests convert it with `kimi_vl_jax.checkpoint.siglip` and compare.

Fixture contents (`cases.npz`, float32 unless noted):
  pixel_nibbles      uint8 [N * 3 * S * S / 2]: the N images' 16-level pixels, two 4-bit values q
                     per byte (high nibble first), pixel value (q - 7.5) / 4 (exact in fp32)
  patch_embeds       [N, G*G, Dv] the patch conv alone (`embeddings.patch_embedding`, flattened)
  embeddings         [N, G*G, Dv] patch conv + the learned position embedding
  pos_resized/{h}x{w} [Dv, h, w] torch `F.interpolate(bicubic)` of the [G, G] position grid
  vision_hidden      [N, G*G, Dv] `vision_model` output after `post_layernorm` (row-major patches)
  vision_pooled      [N, Dv] `vision_model.head` (attention pooling) output
  text/{name}/input_ids      int64 [K, T] token sequences (T <= max_position_embeddings)
  text/{name}/attention_mask int64 [K, T] (only for the masked case)
  text/{name}/pooled         [K, P] `text_model` pooler output (last position -> head)
  text/{name}/hidden         [K, T, Dt] `text_model` output after `final_layer_norm`
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_vision_fixtures import randomize_  # noqa: E402

OUT_DIR = os.path.join(HERE, '..', 'fixtures', 'siglip_tiny')

GRID = 4  # patches per side: image_size = GRID * patch_size
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              patch_size=14, image_size=14 * GRID, num_channels=3,
              hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)
# projection_size differs from hidden_size so a transposed `head` cannot pass.
TEXT = dict(vocab_size=100, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, projection_size=32,
            hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, pad_token_id=1,
            bos_token_id=98, eos_token_id=99)
N_IMAGES = 3
# Position-grid resizes checked against torch (the converter's MoonViT grid sizes).
RESIZES = [(16, 16), (8, 12), (GRID, GRID)]


def build_model(seed: int):
  from transformers import SiglipConfig, SiglipModel
  cfg = SiglipConfig(text_config=TEXT, vision_config=VISION)
  cfg._attn_implementation = 'eager'
  model = SiglipModel(cfg).eval()
  randomize_(model, torch.Generator().manual_seed(seed))
  return cfg, model


def main():
  torch.manual_seed(0)
  cfg, model = build_model(seed=2504)
  gen = torch.Generator().manual_seed(7)
  s = VISION['image_size']
  q = torch.randint(0, 16, (N_IMAGES, 3, s, s), generator=gen, dtype=torch.uint8)
  flat = q.numpy().reshape(-1, 2)
  arrays = {'pixel_nibbles': ((flat[:, 0] << 4) | flat[:, 1]).astype(np.uint8)}
  pixels = (q.float() - 7.5) / 4

  vm, tm = model.vision_model, model.text_model
  with torch.no_grad():
    patch = vm.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
    arrays['patch_embeds'] = patch.numpy()
    arrays['embeddings'] = vm.embeddings(pixels).numpy()
    grid = vm.embeddings.position_embedding.weight.reshape(GRID, GRID, -1).permute(2, 0, 1)
    for h, w in RESIZES:
      arrays[f'pos_resized/{h}x{w}'] = F.interpolate(grid[None], size=(h, w), mode='bicubic',
                                                     align_corners=False)[0].numpy()
    out = vm(pixel_values=pixels)
    arrays['vision_hidden'] = out.last_hidden_state.numpy()
    arrays['vision_pooled'] = out.pooler_output.numpy()

    v, t = TEXT['vocab_size'], TEXT['max_position_embeddings']
    cases = {
        'full': (torch.randint(0, v, (3, t), generator=gen), None),
        'short': (torch.randint(0, v, (2, 9), generator=gen), None),
        'masked': (torch.randint(0, v, (2, t), generator=gen),
                   torch.tensor([[1] * 10 + [0] * (t - 10), [1] * t])),
    }
    for name, (ids, mask) in cases.items():
      o = tm(input_ids=ids, attention_mask=mask)
      arrays[f'text/{name}/input_ids'] = ids.numpy()
      if mask is not None:
        arrays[f'text/{name}/attention_mask'] = mask.numpy()
      arrays[f'text/{name}/pooled'] = o.pooler_output.numpy()
      arrays[f'text/{name}/hidden'] = o.last_hidden_state.numpy()
      # The pooled token is the last position, as the fixture's tests assume.
      assert torch.allclose(o.pooler_output, tm.head(o.last_hidden_state[:, -1]))
    full = model(input_ids=cases['full'][0][:N_IMAGES], pixel_values=pixels)
    arrays['logits_per_image'] = full.logits_per_image.numpy()

  os.makedirs(OUT_DIR, exist_ok=True)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(OUT_DIR, 'model.safetensors'), metadata={'format': 'pt'})
  arrays = {k: (a.astype(np.float32) if a.dtype == np.float64 else a) for k, a in arrays.items()}
  np.savez_compressed(os.path.join(OUT_DIR, 'cases.npz'), **arrays)
  with open(os.path.join(OUT_DIR, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=str)
  sizes = {f: os.path.getsize(os.path.join(OUT_DIR, f)) for f in sorted(os.listdir(OUT_DIR))}
  print('wrote', OUT_DIR, sizes, 'total', sum(sizes.values()))
  print('keys:', sorted(state))


if __name__ == '__main__':
  main()
