"""`build_kernels`: the model's `Kernels` (`model/kernels.py`) for a run on a mesh.

Built once from the model config, the mesh and the logical-axis rules, and handed to the model
(`KimiVL(config, kernels=build_kernels(config, mesh, rules))`):

* `causal_attention`: `context.ContextAttention` ('all_gather' or 'ring', by
  `TextConfig.context_parallel`) when the rules split `act_len` over a 'context' axis larger
  than 1; else the single-device attention (also for context_parallel='none', which leaves the
  sharded attention to XLA's propagation).
* `latent_attention`: with the 'all_gather' `ContextAttention`, a `context.LatentContextAttention`
  (MLA hands it the per-token latent and `kv_b_proj`'s kernel; each shard gathers the latent and
  expands K/V after the gather); else None (the ring and one device get expanded K/V).
* `sequence_layout`: `context.LoadBalancedLayout` when that context-parallel attention runs and
  `KimiVLConfig.context_load_balance` is set.
* `routed_experts`: `expert.ExpertParallel` when the mesh's 'expert' axis is larger than 1 and
  `TextConfig.moe_impl` is an expert-parallel name ('ep_capacity', 'ep_dropless', 'ep_ragged') or
  a single-device dropless one ('dropless', 'dropless_blocked': 'ep_ragged', or 'ep_dropless' on
  CPU; the same numbers, without all-gathering every expert's weights); else the single-device
  function of that name.
* `pipeline`: `pipeline.Pipeline` when `KimiVLConfig.pipeline_stages > 1` (with or without a mesh:
  the schedule runs on one device too).
* `attention`: the per-device kernel of `KimiVLConfig.attention_impl`, as on one device.
* `vision_attention`: with `attention_impl='flash'`, `local_attention.LocalAttention`: MoonViT's
  kernel under `shard_map` over the batch axes, skipping blocks per device and row by row (an
  all-padding row of patches costs no attention); dense: as on one device.

Without a mesh (mesh=None) everything but the pipeline is the single-device computation.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jax.sharding import Mesh

from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.kernels import Kernels, default_kernels
from kimi_vl_jax.parallel import context, expert, local_attention, pipeline
from kimi_vl_jax.parallel import rules as rules_lib


def _hashable(rules) -> tuple:
  """Rules as nested tuples (the kernels are hashable)."""
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


def build_kernels(config: KimiVLConfig, mesh: Mesh | None = None,
                  rules: str | Sequence | None = None) -> Kernels:
  """The `Kernels` of `config` on `mesh` under `rules` (a preset name or a rule list; see the
  module docstring for what each field becomes)."""
  kernels = default_kernels(config)
  rules = _hashable(rules_lib.get_rules(rules)) if rules is not None else ()
  t = config.text
  new = {}
  C = context.context_size(mesh, rules)
  if C > 1 and t.context_parallel != 'none':
    ring = t.context_parallel == 'ring'
    new['causal_attention'] = context.ContextAttention(mesh, rules, C, ring=ring)
    if not ring:
      new['latent_attention'] = context.LatentContextAttention(mesh, rules, C)
    if config.context_load_balance:
      new['sequence_layout'] = context.LoadBalancedLayout(mesh, rules, C)
  if mesh is not None and config.attention_impl == 'flash':
    new['vision_attention'] = local_attention.LocalAttention(
        mesh, rules, dataclasses.replace(kernels.attention, per_row=True))
  if mesh is not None and mesh.shape.get(expert.EXPERT_AXIS, 1) > 1:
    if t.moe_impl in expert.DISPATCHES:
      new['routed_experts'] = expert.ExpertParallel(mesh, rules, expert.DISPATCHES[t.moe_impl])
    elif t.moe_impl in expert.LOCAL_DROPLESS:
      new['routed_experts'] = expert.ExpertParallel(mesh, rules, expert.local_dispatch(mesh))
  if config.pipeline_stages > 1:
    new['pipeline'] = pipeline.Pipeline(config.pipeline_stages, config.pipeline_microbatches,
                                        config.pipeline_repeats, config.remat_policy)
  return dataclasses.replace(kernels, **new)
