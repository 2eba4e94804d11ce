"""Writes tests/fixtures/kimi_vl_tiny/generate.npz: transformers' greedy `generate` on the tiny
checkpoint, for the sampler's token-by-token parity test (tests/sampling/test_hf_generate.py).

Run with the PyTorch reference venv (torch + transformers >= 5.23), after make_kimi_vl_fixtures.py,
from anywhere:

    python tests/reference/make_generate_fixtures.py

The reference model is rebuilt exactly as make_kimi_vl_fixtures.py builds it (same seed search),
and its converted weights are checked to be bit-identical to the checkpoint in
tests/fixtures/kimi_vl_tiny, so the JAX side loads the very weights that produced these tokens.

Each prompt runs alone (batch 1, no padding) through
`Kimi_K25ForConditionalGeneration.generate(do_sample=False, max_new_tokens=NEW_TOKENS)` with every
stop token disabled, fp32, eager attention, HF's dynamic cache. Prompts are chat-shaped token runs
(the tiny vocab's special ids 1012..1023, random text ids below 1000), text-only or with one or two
images (placeholders expanded to h*w/4 `<|media_pad|>` per image), of ragged lengths.

A prompt is rejected (and the next candidate tried) when, on any step of its generation,
  * the top-1 logit beats the runner-up by less than MIN_LOGIT_MARGIN (fp32 rounding differences
    between implementations could flip the argmax), or
  * any MoE router's top-k choice has a margin below MIN_ROUTER_MARGIN (prefill and every decode
    token, with the reference's own router inputs), or
  * a special id (>= 1012) is generated (it would be a stop token or a media placeholder).

Output (`generate.npz`), for prompt k = 0..K-1:
  `input_ids_k` int32 [T_k], `tokens_k` int32 [NEW_TOKENS] (greedy continuation),
  `logit_margin_k` float32 [NEW_TOKENS] (top-1 minus top-2 logit at each step),
  `pixel_values_k` float16 [L_k, 3, 14, 14] and `image_grid_hws_k` int64 [N_k, 2] for image prompts
  (exact in fp16; cast to fp32);
  `num_prompts`, `router_margin` (smallest router margin over all prompts and steps).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_kimi_vl_fixtures as mk  # noqa: E402
import make_vision_fixtures as mv  # noqa: E402

OUT = os.path.join(HERE, '..', 'fixtures', 'kimi_vl_tiny', 'generate.npz')
NEW_TOKENS = 16
MIN_LOGIT_MARGIN = 1e-3
MIN_ROUTER_MARGIN = 2e-4
FIRST_SPECIAL = 1012
# Tiny vocab special ids (kimi_vl_jax/data/tokenizer.py SPM_TOP_SPECIALS).
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = 1015, 1016, 1017, 1018, 1019
# (system text length, user text length, image grids (h, w) in patches) per prompt.
PROMPTS = [
    (0, 5, []),
    (6, 17, []),
    (4, 3, [(4, 6)]),
    (0, 9, [(6, 8), (8, 4)]),
    (3, 30, []),
    (2, 11, [(2, 2)]),
]


def load_fixture_model():
  """The reference model whose converted weights equal the checkpoint on disk, bit for bit."""
  ckpt_dir = os.path.dirname(OUT)
  want = {}
  for f in sorted(os.listdir(ckpt_dir)):
    if f.endswith('.safetensors'):
      want.update(load_file(os.path.join(ckpt_dir, f)))
  for seed in range(50):
    model = mk.build_model(seed)
    got = mk.kimivl_state_dict(model)
    if set(got) == set(want) and all(np.array_equal(got[k].numpy(), want[k]) for k in want):
      return model, seed
  raise RuntimeError('no seed rebuilds the checkpoint in tests/fixtures/kimi_vl_tiny: run '
                     'make_kimi_vl_fixtures.py with this venv first')


def make_prompt(rng: np.random.Generator, gen: torch.Generator, system: int, user: int, grids):
  text = lambda n: list(rng.integers(0, 1000, size=n))  # noqa: E731
  ids = []
  if system:
    ids += [IM_SYSTEM] + text(1) + [IM_MIDDLE] + text(system) + [IM_END]
  ids += [IM_USER] + text(1) + [IM_MIDDLE]
  for h, w in grids:
    ids += [mk.MEDIA_START] + text(1) + [mk.MEDIA_CONTENT] + [mk.PLACEHOLDER] * (h * w // 4)
    ids += [mk.MEDIA_END]
  ids += text(user) + [IM_END, IM_ASSISTANT] + text(1) + [IM_MIDDLE]
  pixel_values = None
  if grids:
    _, pixel_values = mv.make_pixels(gen, sum(h * w for h, w in grids))
  return np.array(ids, np.int64), pixel_values


def generate(model, ids: np.ndarray, pixel_values, grids):
  """(new tokens, per-step top-1 minus top-2 logit, smallest router margin)."""
  margins = []
  lm = model.model.language_model
  hooks = [lm.layers[i].mlp.gate.register_forward_hook(
      lambda mod, args, out: margins.append(mk.router_margin(mod, args[0])))
      for i in range(mk.TEXT['first_k_dense_replace'], mk.TEXT['num_hidden_layers'])]
  kwargs = {}
  if pixel_values is not None:
    kwargs = dict(pixel_values=pixel_values,
                  image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]))
  with torch.no_grad():
    out = model.generate(input_ids=torch.from_numpy(ids)[None],
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         eos_token_id=None, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True, use_cache=True, **kwargs)
  for h in hooks:
    h.remove()
  tokens = out.sequences[0, len(ids):].numpy()
  logits = torch.stack(out.logits)[:, 0].float()           # [NEW, V]
  top2 = logits.topk(2, dim=-1).values
  assert np.array_equal(logits.argmax(-1).numpy(), tokens)
  return tokens, (top2[:, 0] - top2[:, 1]).numpy(), min(margins)


def main():
  model, seed = load_fixture_model()
  print(f'rebuilt the tiny checkpoint from seed {seed}')
  arrays, worst_router = {}, float('inf')
  for k, (system, user, grids) in enumerate(PROMPTS):
    for attempt in range(100):
      rng = np.random.default_rng(1000 * (k + 1) + attempt)
      gen = torch.Generator().manual_seed(1000 * (k + 1) + attempt)
      ids, pixel_values = make_prompt(rng, gen, system, user, grids)
      tokens, logit_margin, router = generate(model, ids, pixel_values, grids)
      why = []
      if logit_margin.min() < MIN_LOGIT_MARGIN:
        why.append(f'logit margin {logit_margin.min():.1e}')
      if router < MIN_ROUTER_MARGIN:
        why.append(f'router margin {router:.1e}')
      if (tokens >= FIRST_SPECIAL).any():
        why.append('special id generated')
      if not why:
        break
      print(f'prompt {k} attempt {attempt}: rejected ({", ".join(why)})')
    else:
      raise RuntimeError(f'prompt {k}: no candidate passed the margin checks')
    worst_router = min(worst_router, router)
    arrays[f'input_ids_{k}'] = ids.astype(np.int32)
    arrays[f'tokens_{k}'] = tokens.astype(np.int32)
    arrays[f'logit_margin_{k}'] = logit_margin.astype(np.float32)
    if pixel_values is not None:
      assert torch.equal(pixel_values.half().float(), pixel_values)
      arrays[f'pixel_values_{k}'] = pixel_values.half().numpy()
      arrays[f'image_grid_hws_{k}'] = np.array(grids, np.int64)
    print(f'prompt {k}: {len(ids)} tokens, {len(grids)} images -> {tokens.tolist()}; '
          f'min logit margin {logit_margin.min():.3f}, router margin {router:.1e}')
  arrays['num_prompts'] = np.array(len(PROMPTS))
  arrays['router_margin'] = np.array(worst_router, np.float32)
  np.savez(OUT, **arrays)
  print('wrote', os.path.normpath(OUT), os.path.getsize(OUT), 'bytes')


if __name__ == '__main__':
  main()
