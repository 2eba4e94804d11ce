"""Analytic FLOPs agree with the parameter count; greedy decoding equals step-by-step argmax; the
trainer's sampler answers equal the full-sequence greedy decoder's."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data.batch import BatchSpec
from kimi_vl_jax.model import summary
from kimi_vl_jax.model.config import get_preset
from kimi_vl_jax.model.kimi_vl import KimiVL, init_params
from kimi_vl_jax.train import evaluate, metrics


def test_matmul_params_match_active_parameter_count():
  for name in ('tiny', 'kimi_vl_a3b'):
    mc = get_preset(name)
    params = summary.abstract_params(mc)['language_model']
    flat = {jax.tree_util.keystr(p): math.prod(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    t = mc.text
    # Everything a token multiplies with: all kernels, minus the inactive routed experts; the
    # embedding lookup, norm scales and router biases are not matmuls.
    total = 0
    for k, n in flat.items():
      if 'embed_tokens' in k or 'layernorm' in k or "['norm']" in k or 'bias' in k:
        continue
      if "['experts']" in k:
        n = n * t.num_experts_per_tok // t.n_routed_experts
      total += n
    assert metrics.lm_matmul_params_per_token(mc) == total, name
  # Kimi-VL-A3B: ~2.92B active LLM parameters = matmul weights + the 0.34B
  # token embedding (a lookup, no FLOPs).
  a3b = metrics.lm_matmul_params_per_token(get_preset('kimi_vl_a3b'))
  assert abs(a3b + 163840 * 2048 - 2.92e9) < 0.01e9
  fl = metrics.lm_flops_per_token(get_preset('kimi_vl_a3b'), 8192)
  # Attention: QK^T (192 per head) and AV (128 per head) over T/2 keys on average, 16 heads,
  # 27 layers, 3x for training: +22% at 8K.
  assert fl == 6 * a3b + 3 * 2 * 16 * (192 + 128) * 4096 * 27


@pytest.mark.slow
def test_greedy_decoder_matches_naive_loop():
  mc = get_preset('tiny')
  params = nn.meta.unbox(init_params(mc, jax.random.PRNGKey(0)))
  model = KimiVL(mc)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 1000, size=n).astype(np.int32) for n in (5, 9)]
  grid = np.array([[2, 2]], np.int32)
  coords = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.int32)
  exs = []
  for p in prompts:
    p = p.copy()
    p[1] = mc.media_placeholder_token_id  # one image token (a 2x2-patch image)
    exs.append({'ids': p, 'answer': '', 'grids': grid, 'coords': coords,
                'patches': rng.normal(size=(4, mc.vision.patch_dim)).astype(np.float32)})
  spec = BatchSpec(len(exs), 16, 4, 1, mc.vision.patch_dim, targets=False)
  rows = evaluate.prompt_batch(exs, spec)
  out = jax.jit(evaluate.make_greedy_decoder(model, 4))(params, rows)
  for b, ex in enumerate(exs):
    ids = list(ex['ids'])
    for i in range(4):
      x = jnp.asarray([ids])
      logits = model.apply({'params': params}, x, patches=jnp.asarray(ex['patches'])[None],
                           patch_coords=jnp.asarray(coords)[None],
                           patch_image_ids=jnp.ones((1, 4), jnp.int32),
                           image_grid_hws=jnp.asarray(grid)[None])
      ids.append(int(jnp.argmax(logits[0, -1])))
      assert int(out[b, i]) == ids[-1], (b, i)


def test_answer_scoring_overall_and_per_kind():
  exs = [{'answer': 'yes', 'kind': 'yes/no'}, {'answer': 'no', 'kind': 'yes/no'},
         {'answer': 'Circle', 'kind': 'shape'}, {'answer': 'red'}]
  res = evaluate.score_answers(exs, [' yes', 'yes', 'circle ', 'blue'])
  assert res == {'answer_accuracy': 0.5, 'answer_examples': 4,
                 'answer_accuracy/shape': 1.0, 'answer_accuracy/yes/no': 0.5}
  with pytest.raises(ValueError):
    evaluate.score_answers(exs, ['yes'])


@pytest.mark.slow
def test_sampler_answers_equal_full_sequence_greedy_answers():
  """The trainer's answer decoding (KV-cache sampler) gives the tokens of the full-sequence
  greedy decoder, images included and blanked."""
  from kimi_vl_jax.data.tokenizer import make_tokenizer
  from kimi_vl_jax.sampling import Sampler
  mc = get_preset('tiny')
  params = nn.meta.unbox(init_params(mc, jax.random.PRNGKey(1)))
  tok = make_tokenizer()
  rng = np.random.default_rng(0)
  exs = []
  for n, with_image in ((7, True), (12, False), (9, True)):
    ids = rng.integers(5, 900, size=n).astype(np.int32)
    ex = {'ids': ids, 'answer': '', 'patches': None, 'coords': None,
          'grids': np.zeros((0, 2), np.int32)}
    if with_image:   # one 2x4-patch image: two merged tokens
      ids[2:4] = tok.media_pad_id
      ex.update(patches=rng.normal(size=(8, mc.vision.patch_dim)).astype(np.float32),
                coords=images_lib.merge_order_coords(2, 4), grids=np.array([[2, 4]], np.int32))
    exs.append(ex)
  max_new = 5
  spec = evaluate.prompt_spec(exs, max_new, mc.vision.patch_dim, rows=2)
  decode = jax.jit(evaluate.make_greedy_decoder(KimiVL(mc), max_new))
  sampler = Sampler(mc, params, max_len=spec.seq_len, prompt_buckets=(16,), batch_buckets=(2,),
                    tokenizer=tok)
  for blank in (False, True):
    want = evaluate.greedy_answers(decode, params, exs, tok, spec=spec, blank_images=blank)
    got = evaluate.sampler_answers(sampler, exs, tok, max_new_tokens=max_new, blank_images=blank)
    assert got == want, blank
    assert any(w for w in want)
  with_images = evaluate.sampler_answers(sampler, exs, tok, max_new_tokens=max_new)
  blanked = evaluate.sampler_answers(sampler, exs, tok, max_new_tokens=max_new, blank_images=True)
  assert with_images[1] == blanked[1] and with_images != blanked   # only image rows change


@pytest.mark.slow
def test_evaluator_answers_on_a_mesh(tmp_path):
  """`Evaluator.answers` on the trainer's 8-device mesh (params sharded as in training) gives
  the single-device sampler's answers, twice (the second call swaps the params in)."""
  import json

  import ml_collections
  from PIL import Image

  from kimi_vl_jax.data.tokenizer import make_tokenizer
  from kimi_vl_jax.parallel import mesh as mesh_lib, rules as rules_lib
  from kimi_vl_jax.sampling import Sampler
  from kimi_vl_jax.train.stage_config import base

  Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8)).save(
      tmp_path / 'a.png')
  records = [{'messages': [{'role': 'user', 'content': [{'type': 'image', 'image': 'a.png'},
                                                        {'type': 'text', 'text': 'color?'}]},
                           {'role': 'assistant', 'content': 'red'}]},
             {'messages': [{'role': 'user', 'content': 'one plus one'},
                           {'role': 'assistant', 'content': 'two'}]}]
  (tmp_path / 'qa.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  cfg = base('joint_sft', 'tiny')
  cfg.parallel.rules = 'fsdp'
  cfg.eval.update({'batches': 0, 'answer_file': str(tmp_path / 'qa.jsonl'), 'answer_batch': 8,
                   'max_new_tokens': 3})
  cfg.data.image = {'max_patches': 16}
  mc = get_preset('tiny')
  mesh, rules = mesh_lib.make_mesh(cfg.parallel), rules_lib.get_rules('fsdp')
  tok = make_tokenizer()
  ev = evaluate.Evaluator(cfg, mc, mesh, rules, None, ml_collections.ConfigDict(cfg.data), tok,
                          False)
  single = None
  for seed in (0, 1):
    boxed = init_params(mc, jax.random.PRNGKey(seed))
    params = nn.meta.unbox(boxed)
    sharded = jax.device_put(params, rules_lib.param_shardings(boxed, mesh, rules))
    res = ev.answers(sharded)
    if single is None:
      single = Sampler(mc, params, max_len=ev.prompt_spec.seq_len, tokenizer=tok)
    single.params = params
    want = evaluate.sampler_answers(single, ev.examples, tok, max_new_tokens=3)
    assert res == evaluate.score_answers(ev.examples, want)
    assert ev._sampler.generate(evaluate.answer_prompts(ev.examples), evaluate.SamplingParams(
        max_new_tokens=3, stop_token_ids=(tok.special['<|im_end|>'],))).texts == want
