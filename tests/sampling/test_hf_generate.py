"""Greedy decoding against transformers' `generate` on the tiny checkpoint.

tests/fixtures/kimi_vl_tiny/generate.npz (written by tests/reference/make_generate_fixtures.py)
holds six chat-shaped prompts (text-only and with one or two images, 12 to 44 tokens) and the 16
tokens HF's greedy `generate` continued each with, every step's top-1 logit ahead of the runner-up
by at least 0.02 and every router choice by at least 2e-4, so fp32 rounding cannot flip a token.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_vl_jax.checkpoint import hf
from kimi_vl_jax.model import KimiVL
from kimi_vl_jax.model.vision import pack_hf_images
from kimi_vl_jax.sampling import Prompt, Sampler, SamplingParams
from kimi_vl_jax.train import evaluate

FIXTURE = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'kimi_vl_tiny')


@pytest.fixture(scope='module')
def reference():
  config, params = hf.load(FIXTURE)
  data = np.load(os.path.join(FIXTURE, 'generate.npz'))
  cases = []
  for k in range(int(data['num_prompts'])):
    pv = data.get(f'pixel_values_{k}')
    cases.append({'input_ids': data[f'input_ids_{k}'], 'tokens': data[f'tokens_{k}'],
                  'logit_margin': data[f'logit_margin_{k}'],
                  'pixel_values': None if pv is None else pv.astype(np.float32),
                  'image_grid_hws': data.get(f'image_grid_hws_{k}')})
  return config, params, cases


def test_fixture_covers_text_images_and_ragged_lengths(reference):
  _, _, cases = reference
  lengths = {len(c['input_ids']) for c in cases}
  images = [0 if c['image_grid_hws'] is None else len(c['image_grid_hws']) for c in cases]
  assert len(lengths) >= 4 and {0, 1, 2} <= set(images)
  assert min(float(c['logit_margin'].min()) for c in cases) >= 1e-3


@pytest.mark.slow
def test_sampler_greedy_equals_hf_generate(reference):
  """All six prompts in one ragged batch (the sampler pads them itself), no stop token."""
  config, params, cases = reference
  new = len(cases[0]['tokens'])
  prompts = [Prompt(input_ids=c['input_ids'], pixel_values=c['pixel_values'],
                    image_grid_hws=c['image_grid_hws']) for c in cases]
  sampler = Sampler(config, params, max_len=128)
  out = sampler.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0,
                                                 stop_token_ids=()))
  for k, c in enumerate(cases):
    np.testing.assert_array_equal(out.tokens[k], c['tokens'], err_msg=f'prompt {k}')
    assert out.finish_reasons[k] == 'length'


def test_full_sequence_decoder_equals_hf_generate(reference):
  """The eval's full-sequence greedy decoder (no cache) gives HF's tokens too: the fixture is
  reachable without the sampler's cache, so a sampler mismatch is the sampler's."""
  config, params, cases = reference
  new = len(cases[0]['tokens'])
  examples = []
  for c in cases:
    ex = {'ids': c['input_ids'], 'patches': None, 'coords': None, 'grids': []}
    if c['pixel_values'] is not None:
      packed = pack_hf_images(c['pixel_values'], c['image_grid_hws'])
      ex.update(patches=packed['patches'][0], coords=packed['patch_coords'][0],
                grids=np.asarray(c['image_grid_hws']))
    examples.append(ex)
  spec = evaluate.prompt_spec(examples, new, config.vision.patch_dim, len(examples))
  rows, _ = spec.split(evaluate.prompt_batch(examples, spec))
  decode = jax.jit(evaluate.make_greedy_decoder(KimiVL(config), new))
  out = np.asarray(decode(params, {k: jnp.asarray(v) for k, v in rows.items()}))
  for k, c in enumerate(cases):
    np.testing.assert_array_equal(out[k], c['tokens'], err_msg=f'prompt {k}')
