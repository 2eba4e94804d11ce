"""Writes tests/fixtures/vision_tiny/: a tiny random MoonViT + projector and reference outputs.

Run with the PyTorch reference venv (torch + transformers >= 5.23), from anywhere:

    python tests/reference/make_vision_fixtures.py

The reference implementation is transformers' `Kimi_K25VisionModel` (one frame, t = 1) and
`Kimi_K25MultimodalProjection`: the same MoonViT function as Kimi-VL's original `moonvit.py`, with
different parameter names and a different RoPE layout. The weights are saved in the **Kimi-VL HF
layout** (docs/param_tree.md), converted from the K2.5 layout as follows:

  K2.5 (transformers)                          Kimi-VL (saved)
  patch_embed.proj.{weight,bias}               vision_tower.patch_embed.proj.{weight,bias}
  patch_embed.pos_emb.position_embeddings      vision_tower.patch_embed.pos_emb.weight  [H0, W0, Dv]
  layers.{i}.norm1 / norm2                     vision_tower.encoder.blocks.{i}.norm0 / norm1
  layers.{i}.attn.{q,k,v}_proj                 vision_tower.encoder.blocks.{i}.wqkv (rows q | k | v)
  layers.{i}.attn.proj                         vision_tower.encoder.blocks.{i}.wo
  layers.{i}.mlp.fc1 / fc2                     vision_tower.encoder.blocks.{i}.mlp.fc0 / fc1
  final_layernorm                              vision_tower.encoder.final_layernorm
  mm_projector.pre_norm / in_proj / out_proj   multi_modal_projector.pre_norm / linear_1 / linear_2

RoPE conversion (the only non-renaming step). Per head of dim d, Kimi-VL's MoonViT rotates
*interleaved* pairs: complex slot j = (x[2j], x[2j+1]) turns by angle a_j, with a_{2i} = col * f_i
and a_{2i+1} = row * f_i, f_i = theta^(-4i/d), i < d/4. K2.5 uses *rotate-half*: dims (j, j + d/2)
form the pair turned by angle b_j, and its `recomposition_frequencies` builds
b = flatten(flip(stack([row * f, col * f]))) = [col f_0, row f_0, col f_1, row f_1, ...], i.e.
b_j = a_j. So the K2.5 function equals the Kimi-VL function when, in every head of q and k,
    k25_row[j]       = kimivl_row[2j]        (j < d/2)
    k25_row[j + d/2] = kimivl_row[2j + 1]
(weights and biases alike; v is not permuted). Scores q.k are unchanged because q and k get the
same permutation. Going back: kimivl = k25.view(N, 2, d/2).transpose(1, 2).reshape(N * d).
`kimivl_moonvit_forward` below re-implements the original Kimi-VL MoonViT (complex interleaved RoPE,
`F.interpolate` bicubic pos-emb, per-image attention) on the saved Kimi-VL weights and the script
asserts it reproduces the K2.5 model, which checks this conversion.

Fixture contents (all float32 unless noted):
  model.safetensors   vision_tower.* and multi_modal_projector.* (Kimi-VL names)
  config.json         the tiny vision numbers (Kimi-VL `vision_config` names) + projector dims
  cases.npz           `pixel_nibbles` uint8 [Lmax * 588 / 2]: a pool of 16-level pixels, two 4-bit
                      values q per byte (high nibble first), unpacked to [Lmax, 3, 14, 14] with
                      pixel value (q - 7.5) / 4 (exact in fp32); case c uses the first L patches
                      of the pool. For each case c in CASES: `{c}/grid_hws` int64 [N, 2],
                      `{c}/vision_out` [L, Dv] (HF row-major-per-image patch order, after the final
                      LayerNorm) and `{c}/projector_out` [L / 4, D]. Plus `interp/*`: torch
                      `F.interpolate` bicubic resizes of `interp/grid` [C, H0, W0] to odd sizes.

Weights are rounded to bf16-representable values (stored as fp32), which changes nothing for the
parity tests and lets git compress the files.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, '..', 'fixtures', 'vision_tiny')

# tiny().vision of kimi_vl_jax/model/config.py.
VISION = dict(patch_size=14, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, init_pos_emb_height=16, init_pos_emb_width=16,
              merge_kernel_size=[2, 2], hidden_act='gelu_pytorch_tanh')
TEXT_HIDDEN = 64  # tiny().text.hidden_size: the projector's output width.
ROPE_THETA = 10000.0
LN_EPS = 1e-5

# name -> list of (h, w) images packed together.
CASES = {
    'nonsquare_6x10': [(6, 10)],
    'grid_16x16': [(16, 16)],
    'upsample_20x18': [(20, 18)],
    'packed_4x8_10x6': [(4, 8), (10, 6)],
}
# Odd output sizes for the raw bicubic check (down, up, mixed, 1-pixel).
INTERP_SIZES = [(5, 7), (3, 17), (21, 9), (1, 1), (16, 16), (13, 19)]


def k25_vision_config():
  from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig
  return Kimi_K25VisionConfig(
      patch_size=VISION['patch_size'], hidden_size=VISION['hidden_size'],
      num_hidden_layers=VISION['num_hidden_layers'],
      num_attention_heads=VISION['num_attention_heads'],
      intermediate_size=VISION['intermediate_size'], pos_emb_height=VISION['init_pos_emb_height'],
      pos_emb_width=VISION['init_pos_emb_width'], merge_kernel_size=VISION['merge_kernel_size'],
      hidden_act=VISION['hidden_act'], rope_parameters={'rope_type': 'axial',
                                                        'rope_theta': ROPE_THETA})


def randomize_(module: torch.nn.Module, gen: torch.Generator, std: float = 0.08) -> None:
  """Overwrites every parameter with non-zero random values rounded to bf16-representable fp32.

  LayerNorm / RMSNorm weights are drawn around 1 so the network stays well conditioned; biases
  and the position grid are non-zero so a dropped term shows up in the outputs.
  """
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith('weight') and 'norm' in name.split('.')[-2]:
        v = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
      elif 'position_embeddings' in name:
        v = 0.5 * torch.randn(p.shape, generator=gen)
      elif name.endswith('bias'):
        v = 0.1 * torch.randn(p.shape, generator=gen)
      else:
        fan_in = p.shape[-1] if p.ndim >= 2 else 1
        if p.ndim == 4:  # conv [Dv, 3, 14, 14]
          fan_in = int(np.prod(p.shape[1:]))
        v = torch.randn(p.shape, generator=gen) * max(std, 1.0 / math.sqrt(fan_in))
      p.copy_(v.to(torch.bfloat16).to(torch.float32))


def rope_k25_to_kimivl(w: torch.Tensor, num_heads: int) -> torch.Tensor:
  """q/k rows in K2.5 rotate-half order -> Kimi-VL interleaved order (module docstring)."""
  d = w.shape[0] // num_heads
  rest = w.shape[1:]
  return w.reshape(num_heads, 2, d // 2, *rest).transpose(1, 2).reshape(num_heads * d, *rest)


def rope_kimivl_to_k25(w: torch.Tensor, num_heads: int) -> torch.Tensor:
  """Inverse of `rope_k25_to_kimivl`."""
  d = w.shape[0] // num_heads
  rest = w.shape[1:]
  return w.reshape(num_heads, d // 2, 2, *rest).transpose(1, 2).reshape(num_heads * d, *rest)


def k25_vision_to_kimivl(sd: dict, num_heads: int, prefix_in: str = '') -> dict:
  """K2.5 vision-tower state dict -> Kimi-VL `vision_tower.*` tensors."""
  g = lambda k: sd[prefix_in + k].detach().clone().float().contiguous()
  out = {
      'vision_tower.patch_embed.proj.weight': g('patch_embed.proj.weight'),
      'vision_tower.patch_embed.proj.bias': g('patch_embed.proj.bias'),
      'vision_tower.patch_embed.pos_emb.weight': g('patch_embed.pos_emb.position_embeddings'),
      'vision_tower.encoder.final_layernorm.weight': g('final_layernorm.weight'),
      'vision_tower.encoder.final_layernorm.bias': g('final_layernorm.bias'),
  }
  n_layers = 1 + max(int(k[len(prefix_in):].split('.')[1]) for k in sd
                     if k.startswith(prefix_in + 'layers.'))
  for i in range(n_layers):
    src, dst = f'layers.{i}.', f'vision_tower.encoder.blocks.{i}.'
    for t in ('weight', 'bias'):
      out[dst + f'norm0.{t}'] = g(src + f'norm1.{t}')
      out[dst + f'norm1.{t}'] = g(src + f'norm2.{t}')
      q = rope_k25_to_kimivl(g(src + f'attn.q_proj.{t}'), num_heads)
      k = rope_k25_to_kimivl(g(src + f'attn.k_proj.{t}'), num_heads)
      v = g(src + f'attn.v_proj.{t}')
      out[dst + f'wqkv.{t}'] = torch.cat([q, k, v], dim=0).contiguous()
      out[dst + f'wo.{t}'] = g(src + f'attn.proj.{t}')
      out[dst + f'mlp.fc0.{t}'] = g(src + f'mlp.fc1.{t}')
      out[dst + f'mlp.fc1.{t}'] = g(src + f'mlp.fc2.{t}')
  return {k: v.contiguous() for k, v in out.items()}


def k25_projector_to_kimivl(sd: dict, prefix_in: str = '') -> dict:
  names = {'pre_norm': 'pre_norm', 'in_proj': 'linear_1', 'out_proj': 'linear_2'}
  return {f'multi_modal_projector.{dst}.{t}': sd[f'{prefix_in}{src}.{t}'].detach().clone().float()
          for src, dst in names.items() for t in ('weight', 'bias')}


# ------------------------------------------------------------------------------------------
# Independent re-implementation of Kimi-VL's original MoonViT on Kimi-VL-layout weights.

def kimivl_moonvit_forward(w: dict, pixel_values: torch.Tensor, grid_hws: list, num_heads: int,
                           theta: float = ROPE_THETA) -> torch.Tensor:
  """MoonViT as in Kimi-VL's `modeling_kimi_vl.py` / vllm `moonvit.py` (packed, HF patch order)."""
  p = 'vision_tower.'
  x = F.conv2d(pixel_values, w[p + 'patch_embed.proj.weight'], w[p + 'patch_embed.proj.bias'],
               stride=VISION['patch_size']).flatten(1)
  grid = w[p + 'patch_embed.pos_emb.weight']  # [H0, W0, D]
  pos = []
  for h, wd in grid_hws:
    if (h, wd) == tuple(grid.shape[:2]):
      pos.append(grid.flatten(0, 1))
    else:
      pos.append(F.interpolate(grid.permute(2, 0, 1)[None], size=(h, wd), mode='bicubic')[0]
                 .permute(1, 2, 0).flatten(0, 1))
  x = x + torch.cat(pos)
  d_model = x.shape[-1]
  hd = d_model // num_heads
  freqs = 1.0 / theta ** (torch.arange(0, hd, 4)[: hd // 4].float() / hd)
  cis = []
  for h, wd in grid_hws:
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(wd).float(), indexing='ij')
    xc = torch.polar(torch.ones(h * wd, hd // 4), torch.outer(xs.flatten(), freqs))
    yc = torch.polar(torch.ones(h * wd, hd // 4), torch.outer(ys.flatten(), freqs))
    cis.append(torch.stack([xc, yc], dim=-1).reshape(h * wd, hd // 2))  # slot 2i: col, 2i+1: row
  cis = torch.cat(cis)[:, None, :]
  lens = [h * wd for h, wd in grid_hws]
  n_layers = 1 + max(int(k.split('.')[3]) for k in w if k.startswith(p + 'encoder.blocks.'))

  def rope(t):
    tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
    return torch.view_as_real(tc * cis).flatten(-2)

  for i in range(n_layers):
    b = f'{p}encoder.blocks.{i}.'
    ln = lambda t, n: F.layer_norm(t, (d_model,), w[b + n + '.weight'], w[b + n + '.bias'], LN_EPS)
    qkv = F.linear(ln(x, 'norm0'), w[b + 'wqkv.weight'], w[b + 'wqkv.bias'])
    q, k, v = qkv.view(-1, 3, num_heads, hd).unbind(1)
    q, k = rope(q), rope(k)
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens)):
      att = torch.softmax(torch.einsum('snh,tnh->nst', qs, ks) / math.sqrt(hd), dim=-1)
      outs.append(torch.einsum('nst,tnh->snh', att, vs).reshape(-1, d_model))
    x = x + F.linear(torch.cat(outs), w[b + 'wo.weight'], w[b + 'wo.bias'])
    hmid = F.gelu(F.linear(ln(x, 'norm1'), w[b + 'mlp.fc0.weight'], w[b + 'mlp.fc0.bias']),
                  approximate='tanh')
    x = x + F.linear(hmid, w[b + 'mlp.fc1.weight'], w[b + 'mlp.fc1.bias'])
  return F.layer_norm(x, (d_model,), w[p + 'encoder.final_layernorm.weight'],
                      w[p + 'encoder.final_layernorm.bias'], LN_EPS)


def kimivl_projector_forward(w: dict, vision_out: torch.Tensor, grid_hws: list) -> torch.Tensor:
  """Kimi-VL: per-image 2x2 patch merge of the per-patch-normalised features, MLP (GELU erf)."""
  p = 'multi_modal_projector.'
  d = vision_out.shape[-1]
  x = F.layer_norm(vision_out, (d,), w[p + 'pre_norm.weight'], w[p + 'pre_norm.bias'], LN_EPS)
  merged, start = [], 0
  for h, wd in grid_hws:
    s = x[start:start + h * wd].view(h // 2, 2, wd // 2, 2, d).permute(0, 2, 1, 3, 4)
    merged.append(s.reshape(-1, 4 * d))
    start += h * wd
  x = torch.cat(merged)
  x = F.gelu(F.linear(x, w[p + 'linear_1.weight'], w[p + 'linear_1.bias']))
  return F.linear(x, w[p + 'linear_2.weight'], w[p + 'linear_2.bias'])


def make_pixels(gen: torch.Generator, n_patches: int) -> tuple[np.ndarray, torch.Tensor]:
  """Random 16-level pixels: nibble-packed uint8 [L * 588 / 2] and fp32 (q - 7.5) / 4."""
  ps = VISION['patch_size']
  q = torch.randint(0, 16, (n_patches, 3, ps, ps), generator=gen, dtype=torch.uint8)
  flat = q.numpy().reshape(-1, 2)
  packed = (flat[:, 0] << 4) | flat[:, 1]
  return packed.astype(np.uint8), (q.float() - 7.5) / 4


def build_k25_vision_and_projector(seed: int):
  from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config
  from transformers.models.kimi_k25.modeling_kimi_k25 import (Kimi_K25MultimodalProjection,
                                                              Kimi_K25VisionModel)
  vcfg = k25_vision_config()
  vcfg._attn_implementation = 'eager'
  vision = Kimi_K25VisionModel(vcfg).eval()
  cfg = Kimi_K25Config(vision_config=vcfg.to_dict(), text_config={'hidden_size': TEXT_HIDDEN},
                       projection_hidden_size=VISION['hidden_size'],
                       projection_layer_norm_eps=LN_EPS)
  projector = Kimi_K25MultimodalProjection(cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  randomize_(vision, gen)
  randomize_(projector, gen)
  return vision, projector


def run_k25(vision, projector, pixel_values: torch.Tensor, grid_hws: list):
  grid_thw = torch.tensor([[1, h, w] for h, w in grid_hws])
  with torch.no_grad():
    out = vision(pixel_values, grid_thw=grid_thw)
    proj = projector(out.pooler_output).squeeze(1)
  return out.last_hidden_state, proj


def main():
  torch.manual_seed(0)
  vision, projector = build_k25_vision_and_projector(seed=1234)
  nh = VISION['num_attention_heads']
  weights = k25_vision_to_kimivl(vision.state_dict(), nh)
  weights.update(k25_projector_to_kimivl(projector.state_dict()))
  # The conversion round-trips.
  for i in range(VISION['num_hidden_layers']):
    q = weights[f'vision_tower.encoder.blocks.{i}.wqkv.weight'][:VISION['hidden_size']]
    assert torch.equal(rope_kimivl_to_k25(q, nh), vision.layers[i].attn.q_proj.weight)

  gen = torch.Generator().manual_seed(99)
  arrays = {}
  worst = 0.0
  n_max = max(sum(h * w for h, w in grids) for grids in CASES.values())
  packed, pool = make_pixels(gen, n_max)
  arrays['pixel_nibbles'] = packed
  for name, grids in CASES.items():
    pixel_values = pool[:sum(h * w for h, w in grids)]
    vis_out, proj_out = run_k25(vision, projector, pixel_values, grids)
    with torch.no_grad():
      ref_vis = kimivl_moonvit_forward(weights, pixel_values, grids, nh)
      ref_proj = kimivl_projector_forward(weights, ref_vis, grids)
    d_vis = (ref_vis - vis_out).abs().max().item()
    d_proj = (ref_proj - proj_out).abs().max().item()
    worst = max(worst, d_vis, d_proj)
    print(f'{name}: grids {grids} vision {tuple(vis_out.shape)} |K2.5 - KimiVL re-impl| '
          f'{d_vis:.2e}, projector {tuple(proj_out.shape)} {d_proj:.2e}')
    arrays[f'{name}/grid_hws'] = np.array(grids, dtype=np.int64)
    arrays[f'{name}/vision_out'] = vis_out.numpy().astype(np.float32)
    arrays[f'{name}/projector_out'] = proj_out.numpy().astype(np.float32)
  assert worst < 1e-4, f'K2.5 model and Kimi-VL re-implementation disagree: {worst}'

  grid = torch.randn(8, VISION['init_pos_emb_height'], VISION['init_pos_emb_width'],
                     generator=gen)
  arrays['interp/grid'] = grid.numpy()
  for h, w in INTERP_SIZES:
    arrays[f'interp/{h}x{w}'] = F.interpolate(grid[None], size=(h, w), mode='bicubic',
                                              align_corners=False)[0].numpy()

  os.makedirs(OUT_DIR, exist_ok=True)
  save_file(weights, os.path.join(OUT_DIR, 'model.safetensors'))
  np.savez_compressed(os.path.join(OUT_DIR, 'cases.npz'), **arrays)
  config = {'vision_config': dict(VISION, model_type='moonvit'),
            'text_hidden_size': TEXT_HIDDEN, 'projector_ln_eps': LN_EPS,
            'rope_theta': ROPE_THETA, 'cases': {k: [list(g) for g in v] for k, v in CASES.items()}}
  with open(os.path.join(OUT_DIR, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  print('wrote', OUT_DIR, {f: os.path.getsize(os.path.join(OUT_DIR, f))
                           for f in sorted(os.listdir(OUT_DIR))})


if __name__ == '__main__':
  main()
