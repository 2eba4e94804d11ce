"""`Kernels`: the computations a run uses where the model has a choice, handed to the model.

The model's modules never look at a mesh. Where the computation may be distributed they call a
function from the `Kernels` value they are given (`KimiVL(config, kernels=...)`, passed down to
the vision tower, the decoder layers, MLA and the MoE):

* `attention`: the per-device kernel, `(q, k, v, q_segment_ids, kv_segment_ids, *, causal,
  scale, q_positions, kv_positions) -> out` (`attention.AttentionKernel`, dense or flash by
  `KimiVLConfig.attention_impl`); the decoder uses it through `causal_attention`:
* `causal_attention`: `(q, k, v, segment_ids, scale, *, kernel, layout) -> out`, the decoder's
  attention over the (possibly context-sharded) sequence; default `attention.causal_attention`.
* `latent_attention`: `(q, latent, expand, expand_params, segment_ids, scale, *, kernel, layout)
  -> out`, the same attention when keys and values are computed token by token from a smaller
  latent: `expand(expand_params, latent) -> (k, v)` (MLA: `[c_kv | rope(k_rope)]`, R + Hr = 576
  values per token for Kimi-VL-A3B, expanded by `kv_b_proj`'s kernel into 5,120). Context
  parallelism's all-gather moves the latent and expands it on every shard. None (default): the
  caller expands and calls `causal_attention`.
* `vision_attention`: the same signature, MoonViT's per-image attention. Its rows are
  independent, so it skips blocks row by row (`AttentionKernel(per_row=True)`, per device:
  one device here, inside `shard_map` over the batch axes on a mesh), and an all-padding row of
  patches costs no attention. None: `attention`.
* `routed_experts`: `(x, topk_idx, topk_weights, w_gate, w_up, w_down, *, token_mask,
  capacity_factor, dtype) -> y`; default `moe.local_routed_experts(text.moe_impl)`.
* `pipeline`: `(layer_fn, params, x, positions, segment_ids, *, combine_aux) -> (x, aux)` runs the
  stacked MoE layers as a schedule; default None, the plain `nn.scan`.
* `sequence_layout`: `.name`, `.to_layout(x)`, `.from_layout(x)` permute the decoder's rows into
  the order it computes in and back (context parallelism); default None, sequence order.

`parallel.kernels.build_kernels(config, mesh, rules)` builds the mesh-aware value;
`default_kernels(config)` is the single-device one each module falls back to. The value is
frozen and hashable, so modules hold it as a field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from kimi_vl_jax.model import attention as attention_lib
from kimi_vl_jax.model import moe
from kimi_vl_jax.model.config import KimiVLConfig

SEQUENCE = 'sequence'
LOAD_BALANCED = 'load_balanced'
CONTEXT_PARALLEL = ('none', 'all_gather', 'ring')  # TextConfig.context_parallel


@dataclasses.dataclass(frozen=True)
class Kernels:
  """See the module docstring. Every field is hashable (functions, frozen dataclasses)."""
  attention: attention_lib.AttentionKernel = attention_lib.AttentionKernel()
  causal_attention: Callable = attention_lib.causal_attention
  latent_attention: Callable | None = None
  vision_attention: Callable | None = None
  routed_experts: Callable = moe.routed_experts_dropless
  pipeline: Callable | None = None
  sequence_layout: Any = None

  @property
  def layout(self) -> str:
    """The order the decoder's rows are stored in while it runs."""
    return SEQUENCE if self.sequence_layout is None else self.sequence_layout.name


def check_names(config: KimiVLConfig) -> None:
  """Clear errors for unknown `moe_impl` / `context_parallel` names (before any tracing)."""
  moe.local_routed_experts(config.text.moe_impl)
  if config.text.context_parallel not in CONTEXT_PARALLEL:
    raise ValueError(f'unknown context_parallel {config.text.context_parallel!r}; choose one of '
                     f'{CONTEXT_PARALLEL} (TextConfig.context_parallel)')


def default_kernels(config: KimiVLConfig) -> Kernels:
  """The single-device computation `config` selects: its attention kernel (MoonViT's skipping
  blocks row by row) and the routed-experts function of `text.moe_impl`; the layer stacks run as
  `nn.scan`s (a pipeline schedule gives the same numbers) and rows stay in sequence order."""
  check_names(config)
  kernel = attention_lib.attention_kernel(config)
  return Kernels(attention=kernel, vision_attention=dataclasses.replace(kernel, per_row=True),
                 routed_experts=moe.local_routed_experts(config.text.moe_impl))
