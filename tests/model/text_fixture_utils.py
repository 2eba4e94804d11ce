"""Loads the DeepSeek-V3 text fixtures written by tests/reference/make_text_fixtures.py."""

import json
import os

import numpy as np
from safetensors.numpy import load_file

from kimi_vl_jax.checkpoint import hf_mapping
from kimi_vl_jax.model import config as config_lib

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures')
VARIANTS = ('text_tiny', 'text_tiny_qlora')


def load_config(name: str, **overrides) -> config_lib.KimiVLConfig:
  with open(os.path.join(FIXTURES, name, 'config.json')) as f:
    text_config = json.load(f)
  return config_lib.from_hf_dict({'text_config': text_config, 'vision_config': {}}, **overrides)


def load_params(name: str, config: config_lib.KimiVLConfig) -> dict:
  """The `language_model` param subtree (scan layout) via the checkpoint mapping table."""
  tensors = load_file(os.path.join(FIXTURES, name, 'model.safetensors'))
  return hf_mapping.hf_to_params(tensors, config, include_vision=False)['language_model']


def load_arrays(name: str, which: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIXTURES, name, f'{which}.npz')) as f:
    return dict(f)
