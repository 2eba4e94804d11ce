"""Writes tests/fixtures/text_tiny{,_qlora}/ from transformers' DeepseekV3ForCausalLM (fp32, eager).

Rerun (needs the PyTorch reference venv: torch + transformers >= 5, safetensors, numpy):
    python tests/reference/make_text_fixtures.py        # from the repo root, in the torch venv

Each fixture dir holds
  model.safetensors  the HF state dict with the Kimi-VL `language_model.` prefix and per-expert keys
                     (`language_model.model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight`,
                     as the released checkpoint stores them; transformers >= 5 fuses them in memory)
  config.json        the DeepSeek-V3 text config dict (`model_type: deepseek_v3`)
  inputs.npz         input_ids_{i} int32 [B, T] for a couple of batches
  logits.npz         logits_{i} float32 [B, T, V]
  layers.npz         per-layer probes on batch 0: layer-0 attention input/output, first MoE layer's
                     input/output and its router top-k (indices sorted per token, matching weights)

The numbers are those of `kimi_vl_jax.model.config.tiny().text` except `vocab_size` (256 instead of
1024, to keep each fixture dir under 1 MB). `text_tiny_qlora` also sets `q_lora_rank`, group-limited
routing (n_group 4, topk_group 2), YaRN rope scaling with mscale != mscale_all_dim, and tied
embeddings. Weights are random with O(1) activations (std 1/sqrt(fan_in)) and a non-trivial router
bias; a seed is rejected when any top-k (or top-group) choice has a margin below MIN_MARGIN, so that
fp32 rounding differences between implementations cannot flip an expert choice.
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, '..', 'fixtures')
MIN_MARGIN = 2e-4

# kimi_vl_jax.model.config.tiny().text, in HF field names.
TINY = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128, moe_intermediate_size=32,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.446,
    rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
    hidden_act='silu', attention_bias=False, rope_interleave=True,
    rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0},
)
VARIANTS = {
    'text_tiny': dict(TINY),
    'text_tiny_qlora': dict(
        TINY, q_lora_rank=24, n_group=4, topk_group=2, tie_word_embeddings=True,
        max_position_embeddings=256,
        rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0,
                         'original_max_position_embeddings': 64, 'beta_fast': 32.0,
                         'beta_slow': 1.0, 'mscale': 1.0, 'mscale_all_dim': 0.8}),
}
BATCH_SHAPES = [(2, 12), (1, 20)]


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
  """O(1) activations: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2^2), router bias."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight') or 'layernorm' in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith('embed_tokens.weight'):  # smaller when it doubles as the LM head
        std = 0.25 if model.config.tie_word_embeddings else 1.0
        p.copy_(std * torch.randn(p.shape, generator=gen))
      else:  # Linear [out, in], experts gate_up_proj [E, 2F, D], down_proj [E, D, F]
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    for name, buf in model.named_buffers():
      if name.endswith('e_score_correction_bias'):
        buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))


def router_margins(gate, hidden: torch.Tensor) -> float:
  """Smallest gap, over tokens, at the top-k expert and top-group boundaries (the HF gate rule)."""
  h = hidden.reshape(-1, gate.hidden_dim).float()
  scores = torch.sigmoid(h @ gate.weight.float().T)
  choice = scores + gate.e_score_correction_bias
  margins = []
  if gate.num_group > 1:
    g = choice.view(-1, gate.num_group, gate.num_experts // gate.num_group).topk(2, -1)[0].sum(-1)
    gs = g.sort(-1, descending=True)[0]
    margins.append((gs[:, gate.topk_group - 1] - gs[:, gate.topk_group]).min().item())
    keep = torch.zeros_like(g).scatter_(1, g.topk(gate.topk_group, -1)[1], 1)
    keep = keep.repeat_interleave(gate.num_experts // gate.num_group, dim=-1).bool()
    choice = choice.masked_fill(~keep, float('-inf'))
  cs = choice.sort(-1, descending=True)[0]
  k = gate.top_k
  gap = cs[:, k - 1] - cs[:, k]
  margins.append(gap[torch.isfinite(gap)].min().item() if torch.isfinite(gap).any() else 1.0)
  return min(margins)


def kimi_state_dict(model: DeepseekV3ForCausalLM, cfg: dict) -> dict:
  """HF state dict -> the Kimi-VL checkpoint layout (`language_model.` prefix, per-expert keys)."""
  out = {}
  fe = cfg['moe_intermediate_size']
  for name, t in model.state_dict().items():
    t = t.detach().float().contiguous()
    if cfg['tie_word_embeddings'] and name == 'lm_head.weight':
      continue
    if name.endswith('mlp.experts.gate_up_proj'):  # [E, 2F, D]: rows gate | up
      stem = name[:-len('gate_up_proj')]
      for e in range(t.shape[0]):
        out[f'language_model.{stem}{e}.gate_proj.weight'] = t[e, :fe].clone()
        out[f'language_model.{stem}{e}.up_proj.weight'] = t[e, fe:].clone()
    elif name.endswith('mlp.experts.down_proj'):  # [E, D, F]
      stem = name[:-len('down_proj')]
      for e in range(t.shape[0]):
        out[f'language_model.{stem}{e}.down_proj.weight'] = t[e].clone()
    else:
      out[f'language_model.{name}'] = t
  return out


def build(name: str, cfg: dict, seed: int):
  config = DeepseekV3Config(**cfg)
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = DeepseekV3ForCausalLM(config).float().eval()
  gen = torch.Generator().manual_seed(seed)
  randomize(model, gen)
  if cfg['tie_word_embeddings']:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), 'not tied'
  rng = np.random.default_rng(seed)
  inputs = [rng.integers(0, cfg['vocab_size'], size=s).astype(np.int32) for s in BATCH_SHAPES]

  first_moe = cfg['first_k_dense_replace']
  probes, margins = {}, []

  def gate_hook(mod, args, output):
    margins.append(router_margins(mod, args[0]))

  def attn_hook(mod, args, kwargs, output):
    if 'attn_in' not in probes:
      probes['attn_in'] = kwargs['hidden_states'].detach().numpy()
      probes['attn_out'] = output[0].detach().numpy()

  def moe_hook(mod, args, output):
    if 'moe_in' not in probes:
      probes['moe_in'] = args[0].detach().numpy()
      probes['moe_out'] = output.detach().numpy()

  def router_hook(mod, args, output):
    if 'router_idx' not in probes:
      _, weights, idx = output
      order = idx.argsort(-1)
      probes['router_idx'] = idx.gather(-1, order).numpy().astype(np.int32)
      probes['router_weights'] = weights.gather(-1, order).detach().numpy()

  layers = model.model.layers
  hooks = [layers[0].self_attn.register_forward_hook(attn_hook, with_kwargs=True),
           layers[first_moe].mlp.register_forward_hook(moe_hook),
           layers[first_moe].mlp.gate.register_forward_hook(router_hook)]
  hooks += [layers[i].mlp.gate.register_forward_hook(gate_hook)
            for i in range(first_moe, cfg['num_hidden_layers'])]
  with torch.no_grad():
    logits = [model(input_ids=torch.from_numpy(x).long()).logits.float().numpy() for x in inputs]
  for h in hooks:
    h.remove()
  return model, inputs, logits, probes, min(margins)


def main():
  for name, cfg in VARIANTS.items():
    for seed in range(100):
      model, inputs, logits, probes, margin = build(name, cfg, seed)
      if margin >= MIN_MARGIN:
        break
      print(f'{name}: seed {seed} has a router margin {margin:.2e} < {MIN_MARGIN}; reseeding')
    else:
      raise RuntimeError(f'{name}: no seed with router margins >= {MIN_MARGIN}')
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    save_file(kimi_state_dict(model, cfg), os.path.join(out, 'model.safetensors'))
    hf_cfg = model.config.to_dict()
    hf_cfg.pop('_attn_implementation_autoset', None)
    with open(os.path.join(out, 'config.json'), 'w') as f:
      json.dump(hf_cfg, f, indent=1, sort_keys=True, default=str)
    np.savez(os.path.join(out, 'inputs.npz'), **{f'input_ids_{i}': x for i, x in enumerate(inputs)})
    np.savez(os.path.join(out, 'logits.npz'), **{f'logits_{i}': x for i, x in enumerate(logits)})
    np.savez(os.path.join(out, 'layers.npz'), **probes)
    print(f'{name}: seed {seed}, min router margin {margin:.2e}, logits std '
          f'{np.std(logits[0]):.3f}, written to {os.path.normpath(out)}')


if __name__ == '__main__':
  main()
