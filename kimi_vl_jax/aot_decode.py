"""TPU ahead-of-time plan for decoding: memory per device, the largest batch, roofline tokens/s.

    from kimi_vl_jax import aot_decode
    text, report = aot_decode.plan(get_preset('kimi_vl_a3b'), 'v5e-8', context=32768)

compiles the sampler's decode step (`sampling.decode_step`: one token for every row over the
latent MLA cache, weight absorption, dropless routing; bf16 parameters and cache) for a TPU
topology with libtpu on a CPU machine (`aot.py` says how), with every row's cache holding
`context` slots. Rows are split over the mesh's batch axes and the routed experts over 'expert'
(rules `dp_ep`, mesh data 1 x expert = all chips: the other weights are replicated, so a step
needs no weight all-gather). It reports

  * the cache bytes per token, read off the compiled step's cache arguments (Kimi-VL-A3B in bf16:
    27 layers x (kv_lora_rank 512 + rope dim 64) x 2 B = 31,104 B; expanded K/V would be ~9x);
  * per-device memory (arguments = parameters + cache + loop state; temporaries) against HBM;
  * the largest batch that fits: memory is linear in the batch (cache rows and per-row
    temporaries), so two compiles give the line, and a third at the predicted batch checks it;
  * roofline tokens/s: decode is HBM-bound, so a step takes at least (bytes it must read per
    device) / (HBM bandwidth per chip). Bytes read per step and device = the decoder weights the
    step touches (vision tower, projector and the embedding table, of which B rows are gathered,
    excluded; routed experts counted by the expected share of them that B tokens reach under
    uniform top-k routing, 1 - (1 - K/E)^B) + the device's cache rows, full `context` each.
    tokens/s = B / that time. XLA's own per-device 'bytes accessed' estimate is printed too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

from kimi_vl_jax import aot

import jax  # noqa: E402  (aot sets the platform before jax is imported)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

GiB = aot.GiB
# HBM bandwidth per chip, bytes/s (Cloud TPU system architecture pages).
HBM_BANDWIDTH = {'v4': 1.2e12, 'v5p': 2.765e12, 'v5e': 8.19e11, 'v6e': 1.64e12}
# Parameter subtrees a decode step never reads (images are encoded at prefill).
_NOT_READ_AT_DECODE = ('vision_tower', 'multi_modal_projector')


def decode_config(config, dtype: str = 'bfloat16'):
  """The sampler's config (`sampling.sampling_config`) with parameters and compute in `dtype`."""
  from kimi_vl_jax.sampling import sampling_config
  return sampling_config(config.replace(dtype=dtype, param_dtype=dtype))


def _path(p) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in p)


def abstract_decode_inputs(config, mesh, rules, *, batch: int, context: int,
                           cache_dtype=jnp.bfloat16) -> tuple[Any, Any]:
  """(params, SamplerState) as ShapeDtypeStructs with their shardings: parameters by their
  logical axes under `rules`, state rows over the mesh axes of `act_batch`."""
  import flax.linen as nn

  from kimi_vl_jax.model.kimi_vl import init_params
  from kimi_vl_jax.parallel import rules as rules_lib
  from kimi_vl_jax.sampling import init_state

  boxed = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  shardings = rules_lib.param_shardings(boxed, mesh, rules)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)
  t, L = config.text, config.text.num_layers
  B = batch
  entries = {'c_kv': jax.ShapeDtypeStruct((L, B, 1, t.kv_lora_rank), cache_dtype),
             'k_rope': jax.ShapeDtypeStruct((L, B, 1, t.qk_rope_head_dim), cache_dtype)}
  settings = {'rng': jax.ShapeDtypeStruct((B, 2), jnp.uint32),
              'temperature': jax.ShapeDtypeStruct((B,), jnp.float32),
              'top_k': jax.ShapeDtypeStruct((B,), jnp.int32),
              'top_p': jax.ShapeDtypeStruct((B,), jnp.float32),
              'max_new': jax.ShapeDtypeStruct((B,), jnp.int32),
              'stop_ids': jax.ShapeDtypeStruct((B, 8), jnp.int32),
              'active': jax.ShapeDtypeStruct((B,), jnp.bool_)}
  state = jax.eval_shape(
      lambda lg, e, n, r, s: init_state(lg, e, n, r, s, cache_len=context,
                                        cache_dtype=cache_dtype, truncate=False),
      jax.ShapeDtypeStruct((B, t.vocab_size), jnp.float32), entries,
      jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32), settings)
  axes = rules_lib.mesh_axes_of(rules, 'act_batch')
  rows = axes if len(axes) > 1 else (axes[0] if axes else None)

  def place(a):
    if a.ndim == 0:
      spec = P()
    elif a.ndim == 4 and a.shape[1] == B and a.shape[0] == L:      # cache [L, B, S, X]
      spec = P(None, rows)
    else:
      spec = P(rows)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

  return params, jax.tree.map(place, state)


def decode_mesh(devices, rules: str = 'dp_ep', expert: int | None = None):
  """(mesh data x expert over `devices`, expert default: all of them; rows shards of `rules`)."""
  from kimi_vl_jax.parallel import mesh as mesh_lib
  from kimi_vl_jax.parallel import rules as rules_lib
  n = len(devices)
  expert = n if expert is None else expert
  pc = mesh_lib.default_config()
  pc.data, pc.expert, pc.rules = n // expert, expert, rules
  mesh = mesh_lib.make_mesh(pc, devices=devices)
  return mesh, math.prod(mesh.shape[a] for a in rules_lib.mesh_axes_of(rules, 'act_batch'))


def lower_decode_step(config, devices, *, batch: int, context: int, rules: str = 'dp_ep',
                      expert: int | None = None, cache_dtype=jnp.bfloat16, absorb: bool = True):
  """(jax.stages.Lowered, info) of one decode step of `config` on a mesh of `devices`
  (data x expert, `expert` default: every device), the state donated as the sampler does."""
  from kimi_vl_jax.model.kimi_vl import KimiVL
  from kimi_vl_jax.parallel import rules as rules_lib
  from kimi_vl_jax.parallel.kernels import build_kernels
  from kimi_vl_jax.sampling import decode_step

  mesh, row_shards = decode_mesh(devices, rules, expert)
  expert = mesh.shape['expert']
  if config.text.n_routed_experts % expert:
    raise ValueError(f'{config.text.n_routed_experts} experts do not split over expert={expert}')
  if batch % row_shards:
    raise ValueError(f'batch {batch} must be a multiple of the {row_shards} row shards')
  if expert > 1 and config.text.moe_impl in ('dropless', 'dropless_blocked'):
    config = config.replace(text=dataclasses.replace(config.text, moe_impl='ep_dropless'))
  model = KimiVL(config, build_kernels(config, mesh, rules), mode='decode', absorb=absorb)
  params, state = abstract_decode_inputs(config, mesh, rules, batch=batch, context=context,
                                         cache_dtype=cache_dtype)
  step = jax.jit(lambda p, s: decode_step(model, p, s, truncate=False), donate_argnums=(1,))
  with rules_lib.sharding_context(mesh, rules):
    lowered = step.lower(params, state)
  info = {'batch': batch, 'context': context, 'rules': rules, 'row_shards': row_shards,
          'mesh': dict(mesh.shape), 'moe_impl': config.text.moe_impl, 'dtype': config.dtype,
          'cache_dtype': jnp.dtype(cache_dtype).name}
  return lowered, info, params, state


def cache_bytes_per_token(state) -> int:
  """Cache bytes of one token (all layers) from the decode step's state argument."""
  cache = state.cache
  B, S = cache['c_kv'].shape[1], cache['c_kv'].shape[2]
  total = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(cache))
  return total // (B * S)


def _shard_factor(a) -> int:
  sh = getattr(a, 'sharding', None)
  if sh is None:
    return 1
  return math.prod(sh.mesh.shape[ax] for entry in sh.spec if entry is not None
                   for ax in (entry if isinstance(entry, tuple) else (entry,)))


def bytes_read_per_step(config, params, *, batch: int, context: int, row_shards: int,
                        bytes_per_token: int) -> dict[str, float]:
  """Per device: decoder weights a step touches + the device's cache rows (module docstring)."""
  t = config.text
  touched = 1.0 - (1.0 - t.num_experts_per_tok / t.n_routed_experts) ** batch
  weights = experts = 0.0
  for p, a in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _path(p)
    if any(s in name for s in _NOT_READ_AT_DECODE):
      continue
    nbytes = math.prod(a.shape) * jnp.dtype(a.dtype).itemsize / _shard_factor(a)
    if 'embed_tokens' in name:
      nbytes = batch * a.shape[-1] * jnp.dtype(a.dtype).itemsize
    if '/experts/' in name:
      experts += nbytes * touched
    else:
      weights += nbytes
  cache = batch / row_shards * context * bytes_per_token
  return {'weights': weights, 'experts': experts, 'cache': cache,
          'total': weights + experts + cache, 'experts_touched': touched}


def compile_decode(config, topo: aot.Topology, devices, *, batch: int, context: int,
                   **kw) -> dict[str, Any]:
  """One compile: the memory report, cache bytes per token and the roofline of `batch` rows."""
  t0 = time.time()
  lowered, info, params, state = lower_decode_step(config, devices, batch=batch,
                                                   context=context, **kw)
  try:
    compiled = lowered.compile()
    rep = aot.memory_report(compiled, topo.hbm_bytes)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    rep['xla_bytes_accessed'] = float(cost.get('bytes accessed', float('nan')))
  except jax.errors.JaxRuntimeError as e:
    rep = aot.oom_report(e, topo.hbm_bytes) or hbm_oom_report(e, topo.hbm_bytes)
    if rep is None:
      raise
  rep.update(info)
  rep['compile_s'] = time.time() - t0
  rep['cache_bytes_per_token'] = cache_bytes_per_token(state)
  chip = topo.name.partition('-')[0]
  reads = bytes_read_per_step(config, params, batch=batch, context=context,
                              row_shards=info['row_shards'],
                              bytes_per_token=rep['cache_bytes_per_token'])
  bw = HBM_BANDWIDTH[chip]
  rep['bytes_read'] = reads
  rep['hbm_bandwidth'] = bw
  rep['roofline_step_s'] = reads['total'] / bw
  rep['roofline_tokens_per_s'] = batch / rep['roofline_step_s']
  return rep


_HBM_OOM = re.compile(r'Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm\. Exceeded hbm capacity by '
                      r'([\d.]+)([KMGT])')
_UNIT = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def hbm_oom_report(error: Exception, hbm_bytes: int) -> dict[str, Any] | None:
  """The report of a compile the TPU compiler refused because the whole program (arguments
  included) exceeds HBM: 'Used XG of YG hbm. Exceeded hbm capacity by ZM' -> total Y + Z."""
  m = _HBM_OOM.search(str(error))
  if m is None:
    return None
  total = int(float(m.group(3)) * _UNIT[m.group(4)] + float(m.group(5)) * _UNIT[m.group(6)])
  nan = float('nan')
  return {'argument': None, 'output': None, 'temp': None, 'alias': None, 'code': None,
          'total': total, 'hbm': hbm_bytes, 'fits': False, 'flops': nan,
          'xla_bytes_accessed': nan, 'error': 'hbm capacity exceeded'}


def largest_batch(points: list[tuple[int, int]], hbm: int, multiple: int) -> int:
  """The largest multiple of `multiple` whose memory, on the line through the (batch, bytes)
  `points` (the last two), stays within `hbm`; 0 when even `multiple` rows do not fit."""
  (b0, m0), (b1, m1) = points[-2], points[-1]
  slope = (m1 - m0) / (b1 - b0)
  if slope <= 0:
    raise ValueError(f'memory does not grow with the batch: {points}')
  b = b0 + (hbm - m0) / slope
  return max(0, int(b // multiple) * multiple)


def search_batch(config, topo: aot.Topology, devices, *, context: int, verify: bool = True,
                 line: list[tuple[int, int]] | None = None, **kw) -> dict[str, Any]:
  """The largest batch whose decode step fits `topo.hbm_bytes` per device.

  Memory is linear in the batch. The line comes from compiles at one row per row shard and 4x
  that, or is given (`line`, two (batch, bytes) points, e.g. scaled from another context);
  the batch it predicts is compiled (`verify`) and stepped down while it does not fit. Returns
  the report of the last compile with `largest_batch` and the points (`memory_line`).
  """
  _, shards = decode_mesh(devices, kw.get('rules', 'dp_ep'), kw.get('expert'))
  seconds, rep = 0.0, None
  if line is None:
    small = compile_decode(config, topo, devices, batch=shards, context=context, **kw)
    if not small['fits']:
      return {**small, 'largest_batch': 0, 'memory_line': [(shards, small['total'])]}
    rep = compile_decode(config, topo, devices, batch=4 * shards, context=context, **kw)
    line = [(shards, small['total']), (4 * shards, rep['total'])]
    seconds = small['compile_s'] + rep['compile_s']
  points = list(line)
  best = largest_batch(points, topo.hbm_bytes, shards)
  while verify:
    rep = compile_decode(config, topo, devices, batch=max(best, shards), context=context, **kw)
    seconds += rep['compile_s']
    points.append((rep['batch'], rep['total']))
    if rep['fits'] or best <= shards:
      break
    best = min(best - shards, largest_batch(points, topo.hbm_bytes, shards))
  rep = dict(rep)
  rep.update(largest_batch=best if (rep['fits'] or not verify) else 0, memory_line=points,
             verified=verify and rep['fits'] and rep['batch'] == best, compile_s_total=seconds)
  return rep


def scale_line(line: list[tuple[int, int]], factor: float) -> list[tuple[int, int]]:
  """The memory line of a context `factor` times longer: the per-row part (slope: cache rows
  and the per-row temporaries, which hold cache-sized slices) scales with the context, the
  fixed part (parameters) does not."""
  (b0, m0), (b1, m1) = line[:2]
  slope = (m1 - m0) / (b1 - b0)
  fixed = m0 - slope * b0
  return [(b, int(fixed + factor * slope * b)) for b in (b0, b1)]


def plan(config, topology_name: str, *, context: int, batch: int | None = None,
         rules: str = 'dp_ep', expert: int | None = None,
         line: list[tuple[int, int]] | None = None, verify: bool = True) -> tuple[str, dict]:
  """Decode plan of `config` (cast to bf16) on a TPU topology: with `batch`, one compile of that
  batch; without, the largest batch that fits (`search_batch`)."""
  config = decode_config(config)
  topo = aot.topology(topology_name)
  devices = aot.topology_devices(topo)
  if batch is not None:
    rep = compile_decode(config, topo, devices, batch=batch, context=context, rules=rules,
                         expert=expert)
  else:
    rep = search_batch(config, topo, devices, context=context, rules=rules, expert=expert,
                       line=line, verify=verify)
  return format_plan(topo, rep), rep


def format_plan(topo: aot.Topology, rep: dict) -> str:
  g = lambda b: f'{b / GiB:.2f} GiB'  # noqa: E731
  mesh = ' x '.join(f'{k}={v}' for k, v in rep['mesh'].items() if v > 1) or '1 device'
  lines = [f"{topo.name} ({topo.num_chips} chips, mesh {mesh}, rules {rep['rules']!r}, "
           f"{rep['moe_impl']}), context {rep['context']}, batch {rep['batch']}: cache "
           f"{rep['cache_bytes_per_token']:,} B/token ({rep['cache_dtype']})"]
  if rep.get('error') == 'CompileTimeHbmOom':
    lines.append(f"  DOES NOT FIT: temporaries alone {g(rep['temp'])} vs HBM {g(rep['hbm'])}")
    return '\n'.join(lines)
  if rep.get('error'):
    lines.append(f"  DOES NOT FIT: needs {g(rep['total'])} vs HBM {g(rep['hbm'])}")
    return '\n'.join(lines)
  r = rep['bytes_read']
  lines += [
      f"  per device: arguments {g(rep['argument'])}, temporaries {g(rep['temp'])}, total "
      f"{g(rep['total'])} of {g(rep['hbm'])} ({100 * rep['total'] / rep['hbm']:.0f}%) -> "
      + ('fits' if rep['fits'] else 'DOES NOT FIT'),
      f"  read per step and device: weights {r['weights'] / GiB:.2f} GiB + experts "
      f"{r['experts'] / GiB:.2f} GiB ({100 * r['experts_touched']:.0f}% touched) + cache "
      f"{r['cache'] / GiB:.2f} GiB = {r['total'] / GiB:.2f} GiB (XLA estimate "
      f"{rep['xla_bytes_accessed'] / GiB:.2f} GiB); at {rep['hbm_bandwidth'] / 1e9:.0f} GB/s: "
      f"{1e3 * rep['roofline_step_s']:.1f} ms/step, {rep['roofline_tokens_per_s']:.0f} tokens/s",
      f"  compile {rep['compile_s']:.0f} s"]
  if 'largest_batch' in rep:
    lines.append(f"  largest batch that fits: {rep['largest_batch']} "
                 + ('(compiled) ' if rep.get('verified') else '(from the line) ')
                 + '(memory line through '
                 + ', '.join(f'B={b}: {g(m)}' for b, m in rep['memory_line']) + ')')
  return '\n'.join(lines)
