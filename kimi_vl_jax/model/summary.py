"""Parameter counts of a model preset, from `jax.eval_shape` (nothing is allocated).

    python -m kimi_vl_jax.model.summary --model=kimi_vl_a3b

Active parameters per token count every parameter except the routed experts a token does not
visit: of each MoE layer's E routed experts only `num_experts_per_tok` are active.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from absl import app, flags

from kimi_vl_jax.model import config as config_lib
from kimi_vl_jax.model.config import KimiVLConfig

_MODEL = flags.DEFINE_string('model', 'kimi_vl_a3b', 'preset name or HF config.json path')


def abstract_params(config: KimiVLConfig) -> dict:
  from kimi_vl_jax.model.kimi_vl import KimiVL, dummy_inputs
  shapes = jax.eval_shape(
      lambda: KimiVL(config).init(jax.random.key(0), **dummy_inputs(config)))
  return nn.meta.unbox(shapes['params'])


def count(config: KimiVLConfig) -> dict[str, int]:
  """{'vision', 'projector', 'language_model', 'routed_experts', 'total', 'active'} counts."""
  params = abstract_params(config)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  counts = {name: size(params[name]) for name in ('vision_tower', 'projector', 'language_model')}
  routed = 0
  if 'moe_layers' in params['language_model']:
    routed = size(params['language_model']['moe_layers']['mlp']['experts'])
  t = config.text
  inactive = routed * (1 - t.num_experts_per_tok / t.n_routed_experts) if routed else 0
  counts['routed_experts'] = routed
  counts['total'] = sum(counts[n] for n in ('vision_tower', 'projector', 'language_model'))
  counts['language_model_active'] = round(counts['language_model'] - inactive)
  counts['active'] = round(counts['total'] - inactive)
  return counts


def format_counts(counts: dict[str, int]) -> str:
  rows = [('vision tower (MoonViT)', counts['vision_tower']),
          ('projector', counts['projector']),
          ('language model', counts['language_model']),
          ('  of which routed experts', counts['routed_experts']),
          ('  language model, active per token', counts['language_model_active']),
          ('total', counts['total']),
          ('active per token', counts['active'])]
  return '\n'.join(f'{name:<36} {n:>16,d}  ({n / 1e9:.3f} B)' for name, n in rows)


def main(argv):
  del argv
  name = _MODEL.value
  config = (config_lib.get_preset(name) if name in config_lib.PRESETS
            else config_lib.from_hf_json(name))
  print(f'model: {name}')
  print(format_counts(count(config)))


if __name__ == '__main__':
  app.run(main)
