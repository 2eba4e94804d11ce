"""The model an evaluation runs: parameters, config, tokenizer, image settings and context length,
from an HF checkpoint directory or from a training run's orbax checkpoints plus its stage config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax

from kimi_vl_jax.data import images as images_lib
from kimi_vl_jax.data.tokenizer import KimiTokenizer, Tokenizer, make_tokenizer
from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.kimi_vl import init_params


@dataclasses.dataclass
class Model:
  config: KimiVLConfig
  params: Any
  tokenizer: Tokenizer
  image_cfg: images_lib.ImageConfig   # the preprocessing the model was trained with
  context: int                        # longest sequence (prompt + answer) to evaluate at
  system_prompt: str | None = None    # inserted when a chat has no system turn
  source: str = ''                    # a label for tables and plots (the directory's name)


def from_hf(hf_dir: str, tokenizer_path: str | None = None) -> Model:
  """An HF Kimi-VL directory (config.json, safetensors, tiktoken.model unless `tokenizer_path`);
  the context is the config's `max_position_embeddings`, images as Kimi-VL preprocesses them."""
  from kimi_vl_jax.checkpoint import hf
  config, params = hf.load(hf_dir)
  return Model(config, params, KimiTokenizer(tokenizer_path or hf_dir), images_lib.ImageConfig(),
               int(config.text.max_position_embeddings),
               source=f'hf:{os.path.basename(os.path.normpath(hf_dir))}')


def from_orbax(workdir: str, cfg, step: int | None = None) -> Model:
  """The params of a training run's checkpoint (the newest, or `step`), with the model, tokenizer,
  image settings and context length of the stage config `cfg` that trained it (its last phase)."""
  from kimi_vl_jax.train import checkpointing, init, stage_config
  last = stage_config.resolve_phases(cfg, resolve_paths=False)[-1]
  config = init.model_config(cfg, last['model_overrides'])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nn.meta.unbox(jax.eval_shape(lambda r: init_params(config, r),
                                                       jax.random.PRNGKey(0))))
  params = checkpointing.restore_params(workdir, abstract, step)
  data = last['data']
  return Model(config, params, make_tokenizer(cfg.get('tokenizer')),
               images_lib.ImageConfig.from_config(data.get('image')), int(data['seq_len']),
               data.get('default_system_prompt'),
               source=f'orbax:{os.path.basename(os.path.normpath(workdir))}'
                      + (f' step {step}' if step is not None else ''))
