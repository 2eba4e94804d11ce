"""`Sampler.generate`: greedy tokens and log-probs equal teacher forcing, sampled log-probs are
those of the truncated distribution, per-row stop tokens and budgets, n samples per prompt
(different, reproducible by seed), streaming, chat-message prompts."""

import jax
import numpy as np
import pytest

from kimi_vl_jax.sampling import Sampler, SamplingParams, truncated_logprobs
from tests.sampling import helpers

NEW = 6


@pytest.fixture(scope='module')
def sampler():
  return Sampler(helpers.config(), helpers.params(), max_len=32, prompt_buckets=(16,),
                 batch_buckets=(4, 8))


def _teacher_logprobs(prompts, tokens, sp: SamplingParams):
  """Log-probs of `tokens` (per prompt, padded to NEW) recomputed by one full forward."""
  cfg, p = helpers.config(), helpers.params()
  n = max(len(t) for t in tokens)
  cont = np.zeros((len(tokens), n), np.int32)
  for b, t in enumerate(tokens):
    cont[b, :len(t)] = t
  full = helpers.teacher_forced_logits(cfg, p, prompts, cont)
  out = []
  for b, (q, t) in enumerate(zip(prompts, tokens)):
    L = len(q.input_ids)
    logits = full[b, L - 1:L - 1 + len(t)]                                   # [n, V]
    k = len(t)
    lp = truncated_logprobs(logits, np.full(k, sp.temperature, np.float32),
                            np.full(k, sp.top_k, np.int32), np.full(k, sp.top_p, np.float32),
                            truncate=sp.top_k > 0 or sp.top_p < 1)
    out.append((np.asarray(lp)[np.arange(k), t], np.asarray(logits)))
  return out


def test_greedy_tokens_and_logprobs_equal_teacher_forcing(sampler):
  prompts = helpers.text_prompts((5, 11, 3))
  sp = SamplingParams(max_new_tokens=NEW, temperature=0.0)
  out = sampler.generate(prompts, sp)
  assert [len(t) for t in out.tokens] == [NEW] * 3 and out.finish_reasons == ['length'] * 3
  assert out.texts is None
  for t, lp, (ref_lp, logits) in zip(out.tokens, out.logprobs,
                                     _teacher_logprobs(prompts, out.tokens, sp)):
    np.testing.assert_array_equal(t, logits.argmax(-1))     # greedy = argmax of the full forward
    assert np.abs(lp - ref_lp).max() <= 1e-4


def test_sampled_logprobs_equal_teacher_forced_truncated_logprobs(sampler):
  prompts = helpers.text_prompts((4, 9))
  sp = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_k=50, top_p=0.9, seed=3)
  out = sampler.generate(prompts, sp)
  for lp, (ref_lp, _) in zip(out.logprobs, _teacher_logprobs(prompts, out.tokens, sp)):
    assert np.all(np.isfinite(lp))
    assert np.abs(lp - ref_lp).max() <= 1e-4


def test_each_row_stops_on_its_own_set_and_budget(sampler):
  prompts = helpers.text_prompts((5, 11, 3))
  free = sampler.generate(prompts, SamplingParams(max_new_tokens=NEW)).tokens
  # Row 0 stops at its third token; row 1 has a budget of 2; row 2 stops on nothing it makes.
  stop0 = int(free[0][2])
  first = int(np.flatnonzero(free[0] == stop0)[0])
  params = [SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop0,)),
            SamplingParams(max_new_tokens=2, stop_token_ids=()),
            SamplingParams(max_new_tokens=NEW, stop_token_ids=(1023,) if 1023 not in free[2]
                           else ())]
  out = sampler.generate(prompts, params)
  np.testing.assert_array_equal(out.tokens[0], free[0][:first + 1])
  np.testing.assert_array_equal(out.tokens[1], free[1][:2])
  np.testing.assert_array_equal(out.tokens[2], free[2])
  assert out.finish_reasons == ['stop', 'length', 'length']


def test_n_samples_differ_and_reproduce_by_seed(sampler):
  prompts = helpers.text_prompts((5, 8))
  sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, n=3, seed=7)
  a = sampler.generate(prompts, sp)
  assert len(a.tokens) == 6
  assert len({tuple(t) for t in a.tokens[:3]}) > 1 and len({tuple(t) for t in a.tokens[3:]}) > 1
  b = sampler.generate(prompts, sp)
  for x, y in zip(a.tokens + a.logprobs, b.tokens + b.logprobs):
    np.testing.assert_array_equal(x, y)
  # The same seed reproduces a prompt's samples batched differently; another seed changes them.
  alone = sampler.generate(prompts[1:], sp)
  for x, y in zip(a.tokens[3:], alone.tokens):
    np.testing.assert_array_equal(x, y)
  other = sampler.generate(prompts, SamplingParams(max_new_tokens=NEW, temperature=1.0, n=3,
                                                   seed=8))
  assert any(not np.array_equal(x, y) for x, y in zip(a.tokens, other.tokens))


def test_streaming_hands_over_every_token_in_order(sampler):
  prompts = helpers.text_prompts((5, 11, 3))
  got = {}
  sp = SamplingParams(max_new_tokens=NEW, temperature=1.0, n=2, seed=1)
  out = sampler.generate(prompts, sp, on_token=lambda r, t: got.setdefault(r, []).append(t))
  assert sorted(got) == list(range(6))
  for r, t in enumerate(out.tokens):
    assert got[r] == [int(i) for i in t]


def test_groups_larger_than_the_biggest_batch_bucket(sampler):
  """10 prompts x n=2 = 20 rows: three groups of at most 8 rows, results in prompt order."""
  prompts = helpers.text_prompts(tuple(range(3, 13)), seed=5)
  out = sampler.generate(prompts, SamplingParams(max_new_tokens=2, n=2))
  ref = sampler.generate(prompts[7:8], SamplingParams(max_new_tokens=2, n=2))
  assert len(out.tokens) == 20
  np.testing.assert_array_equal(out.tokens[14], ref.tokens[0])
  np.testing.assert_array_equal(out.tokens[15], ref.tokens[1])
  # Other prompt lengths, budgets, temperatures and row counts inside the same buckets compile
  # nothing new.
  before = sampler._start._cache_size(), sampler._loop._cache_size()
  sampler.generate(helpers.text_prompts((4, 13, 7), seed=9),
                   SamplingParams(max_new_tokens=3, n=2, temperature=0.5, seed=4))
  assert (sampler._start._cache_size(), sampler._loop._cache_size()) == before


def test_chat_messages_render_with_images_and_decode_texts(tmp_path):
  from PIL import Image

  from kimi_vl_jax.data.tokenizer import make_tokenizer
  from kimi_vl_jax.sampling import Prompt, render_messages
  tok = make_tokenizer('tiny')
  Image.fromarray((np.random.default_rng(0).uniform(size=(40, 60, 3)) * 255).astype(np.uint8)
                  ).save(tmp_path / 'a.png')
  messages = [{'role': 'user', 'content': [{'type': 'image', 'image': 'a.png'},
                                           {'type': 'text', 'text': 'What is this?'}]}]
  s = Sampler(helpers.config(), helpers.params(), max_len=64, prompt_buckets=(32, 64),
              batch_buckets=(1,), tokenizer=tok, image_root=str(tmp_path))
  prompt = render_messages(messages, tok, image_root=str(tmp_path))
  assert prompt.input_ids[-1] == tok.special['<|im_middle|>']
  assert prompt.pixel_values.shape[1:] == (3, 14, 14)
  n_pad = int((prompt.input_ids == tok.media_pad_id).sum())
  assert n_pad == int(np.prod(prompt.image_grid_hws, axis=1).sum()) // 4 > 0
  sp = SamplingParams(max_new_tokens=4)
  a = s.generate([messages], sp)
  b = s.generate([Prompt(prompt.input_ids, prompt.pixel_values, prompt.image_grid_hws)], sp)
  np.testing.assert_array_equal(a.tokens[0], b.tokens[0])
  assert a.texts == [tok.decode([int(i) for i in a.tokens[0]
                                 if a.finish_reasons[0] == 'length' or i != a.tokens[0][-1]])]


@pytest.mark.slow
@pytest.mark.parametrize('preset, sizes', [('dp_ep', dict(data=2, expert=4))])
def test_mesh_equals_single_device(sampler, preset, sizes):
  """8 CPU devices (tests/conftest.py): rows over data x expert, experts split over 'expert'
  with the dropless all-to-all; tokens and log-probs equal the single-device sampler's."""
  from kimi_vl_jax.parallel import mesh as mesh_lib
  assert jax.device_count() == 8
  c = mesh_lib.default_config()
  c.update(sizes)
  mesh = mesh_lib.make_mesh(c)
  sharded = Sampler(helpers.config(), helpers.params(), mesh=mesh, rules=preset, max_len=32,
                    prompt_buckets=(16,), batch_buckets=(4, 8))
  assert sharded.config.text.moe_impl == 'ep_dropless' and sharded.row_multiple == 8
  prompts = helpers.text_prompts((5, 11, 3))
  for sp in (SamplingParams(max_new_tokens=NEW),
             SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.9, n=2, seed=2)):
    ref, got = sampler.generate(prompts, sp), sharded.generate(prompts, sp)
    for x, y in zip(ref.tokens, got.tokens):
      np.testing.assert_array_equal(x, y)
    for x, y in zip(ref.logprobs, got.logprobs):
      assert np.abs(x - y).max() <= 1e-5
  state_cache = sharded.params['language_model']['moe_layers']['mlp']['experts']['gate_proj']
  assert 'expert' in str(state_cache.sharding.spec)
