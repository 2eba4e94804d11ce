"""Kimi-VL model: `KimiVL(config)` and its config dataclasses / presets."""

from kimi_vl_jax.model.config import (KimiVLConfig, TextConfig, VisionConfig, from_hf_json,
                                      get_preset)
from kimi_vl_jax.model.kimi_vl import KimiVL, init_params

__all__ = ['KimiVL', 'KimiVLConfig', 'TextConfig', 'VisionConfig', 'from_hf_json', 'get_preset',
           'init_params']
