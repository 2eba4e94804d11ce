"""TPU ahead-of-time plan of the RL stage: the policy step and the sampler's decode step on one
mesh, their memory together.

    python -m kimi_vl_jax.aot --config=configs/rl.py --topology=v5p-256

The RL stage (`rl/trainer.py`) keeps the trainer and the sampler on the same devices: the
sampler decodes with the trainer's parameter arrays in the trainer's shardings (no copy), its
KV cache exists only while it generates, and the starting policy's parameters stay resident for
KL(pi_i || pi_start) when `rl.kl_to_start`. So an iteration has two peaks, and the plan compiles
both programs for the topology (libtpu on a CPU machine, as `aot.py` does) and adds the resident
buffers to each:

  * training: the policy step (`rl/policy_step.py`: the mirror-descent surrogate through the
    train stack's step with Muon / AdamW) on `groups_per_step x k` rows of the largest rollout
    length bucket, as compiled (state + batch + temporaries), plus the starting parameters;
  * decoding: one decode step of the largest batch bucket with every row's cache at `max_len`
    slots (the trainer's fp32 parameters as arguments; cache in the compute dtype), plus the
    rest of the train state (optimizer moments) and the starting parameters.

The iteration fits when the larger of the two fits in HBM.
"""

from __future__ import annotations

import time
from typing import Any

from kimi_vl_jax import aot

import jax  # noqa: E402  (aot sets the platform before jax is imported)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GiB = aot.GiB


def shard_bytes(tree) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs carrying shardings (the largest shard)."""
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.sharding.shard_shape(a.shape) if getattr(a, 'sharding', None) else a.shape
    total += int(np.prod(shape)) * jnp.dtype(a.dtype).itemsize
  return total


def _setup(cfg, devices, rows: int, seq_len: int):
  import ml_collections

  from kimi_vl_jax.parallel import mesh as mesh_lib
  from kimi_vl_jax.rl.config import RLConfig
  from kimi_vl_jax.train.init import StateFactory, model_config

  rl = RLConfig.from_config(cfg.rl)
  mc = model_config(cfg)
  checked = ml_collections.ConfigDict({'parallel': cfg.parallel, 'data': {
      'seq_len': seq_len, 'global_batch_size': rows}})
  sizes = mesh_lib.validate(checked, mc, num_devices=len(devices),
                            num_processes=len({d.process_index for d in devices}))
  mesh = mesh_lib.make_mesh(cfg.parallel, devices=devices)
  return rl, mc, mesh, sizes, StateFactory(cfg, mc, mesh)


def abstract_rl_batch(rows: int, seq_len: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """A text-only RL batch (`rl/rollouts.train_batch`) as ShapeDtypeStructs."""
  i32, f32 = jnp.int32, jnp.float32
  shapes = {'input_ids': ((rows, seq_len), i32), 'positions': ((rows, seq_len), i32),
            'segment_ids': ((rows, seq_len), i32), 'targets': ((rows, seq_len), i32),
            'loss_mask': ((rows, seq_len), f32), 'old_logp': ((rows, seq_len), f32),
            'rewards': ((rows,), f32), 'valid': ((rows,), f32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def lower_policy_step(cfg, devices, *, rows: int | None = None, seq_len: int | None = None):
  """(Lowered, info, factory) of the RL policy step on a mesh of `devices` (abstract inputs):
  `rows` default groups_per_step x k, `seq_len` default the largest rollout length bucket."""
  from kimi_vl_jax.model.kimi_vl import KimiVL
  from kimi_vl_jax.parallel import rules as rules_lib
  from kimi_vl_jax.parallel.kernels import build_kernels
  from kimi_vl_jax.rl import policy_step
  from kimi_vl_jax.rl.config import RLConfig

  rl = RLConfig.from_config(cfg.rl)
  rows = rows or rl.groups_per_step * rl.k
  seq_len = seq_len or max(rl.length_buckets)
  rl, mc, mesh, sizes, factory = _setup(cfg, devices, rows, seq_len)
  model = KimiVL(mc, kernels=build_kernels(mc, mesh, factory.rules))
  step = policy_step.make_policy_step(model, factory.tx, k=rl.k, md=rl.mirror_descent,
                                      grad_accum=rl.grad_accum, trainable=factory.trainable,
                                      lr_fn=factory.lr_fn)
  bsh = rules_lib.batch_sharding(mesh, factory.rules)
  jitted = jax.jit(step, in_shardings=(factory.shardings, bsh),
                   out_shardings=(factory.shardings, None), donate_argnums=0)
  with rules_lib.sharding_context(mesh, factory.rules):
    lowered = jitted.lower(factory.abstract, abstract_rl_batch(rows, seq_len, bsh))
  info = {'rows': rows, 'seq_len': seq_len, 'mesh': sizes, 'rules': cfg.parallel.rules,
          'grad_accum': rl.grad_accum, 'kl_to_start': rl.kl_to_start}
  return lowered, info, factory


def lower_colocated_decode(cfg, devices, *, batch: int | None = None,
                           context: int | None = None, factory=None):
  """(Lowered, info, params, state) of the sampler's decode step as the RL trainer builds it:
  the trainer's mesh, rules and fp32 parameter shardings (`Sampler(mesh=, rules=)`), `batch`
  rows (default the largest batch bucket) with `context` cache slots (default rl.max_len).
  `factory`: the policy step's StateFactory (its mesh and model config), else built here."""
  import dataclasses

  from kimi_vl_jax import aot_decode
  from kimi_vl_jax.model.kimi_vl import KimiVL
  from kimi_vl_jax.parallel import expert as expert_lib
  from kimi_vl_jax.parallel import rules as rules_lib
  from kimi_vl_jax.parallel.kernels import build_kernels
  from kimi_vl_jax.rl.config import RLConfig
  from kimi_vl_jax.sampling import decode_step, sampling_config

  rl = RLConfig.from_config(cfg.rl)
  batch = batch or max(rl.batch_buckets)
  context = context or rl.max_len
  if factory is None:
    rl, _, _, _, factory = _setup(cfg, devices, batch, context)
  mc, mesh, rules = factory.mc, factory.mesh, factory.rules
  sc = sampling_config(mc)
  if (mesh.shape.get(expert_lib.EXPERT_AXIS, 1) > 1
      and sc.text.moe_impl in ('dropless', 'dropless_blocked')):
    sc = sc.replace(text=dataclasses.replace(sc.text, moe_impl='ep_dropless'))
  model = KimiVL(sc, build_kernels(sc, mesh, rules), mode='decode', absorb=True)
  params, state = aot_decode.abstract_decode_inputs(sc, mesh, rules, batch=batch,
                                                    context=context,
                                                    cache_dtype=jnp.dtype(sc.dtype))
  step = jax.jit(lambda p, s: decode_step(model, p, s, truncate=False), donate_argnums=(1,))
  with rules_lib.sharding_context(mesh, rules):
    lowered = step.lower(params, state)
  info = {'batch': batch, 'context': context, 'moe_impl': sc.text.moe_impl,
          'cache_bytes_per_token': aot_decode.cache_bytes_per_token(state)}
  return lowered, info, params, state


def _compile(lowered, hbm: int) -> tuple[dict[str, Any], float]:
  t0 = time.time()
  try:
    rep = aot.memory_report(lowered.compile(), hbm)
  except jax.errors.JaxRuntimeError as e:
    from kimi_vl_jax import aot_decode
    rep = aot.oom_report(e, hbm) or aot_decode.hbm_oom_report(e, hbm)
    if rep is None:
      raise
  return rep, time.time() - t0


def plan(cfg, topology: str | aot.Topology, *, rows: int | None = None,
         seq_len: int | None = None, decode_batch: int | None = None,
         context: int | None = None, devices=None) -> tuple[str, dict]:
  """Compiles the policy step and the colocated decode step of `cfg` (stage 'rl') for the
  topology (its TPU devices, or `devices` when given: tests pass CPU devices); (report text,
  figures)."""
  if cfg.stage != 'rl':
    raise ValueError(f'aot_rl.plan needs an rl stage config, got stage {cfg.stage!r}')
  topo = aot.topology(topology) if isinstance(topology, str) else topology
  devices = aot.topology_devices(topo) if devices is None else devices
  lowered, tinfo, factory = lower_policy_step(cfg, devices, rows=rows, seq_len=seq_len)
  train, train_s = _compile(lowered, topo.hbm_bytes)
  params_b = shard_bytes(factory.abstract.params)
  state_b = shard_bytes(factory.abstract)
  start_b = params_b if tinfo['kl_to_start'] else 0
  dl, dinfo, dparams, _ = lower_colocated_decode(cfg, devices, batch=decode_batch,
                                                 context=context, factory=factory)
  if shard_bytes(dparams) != params_b:
    raise AssertionError('the decode step does not take the trainer parameter shards')
  decode, decode_s = _compile(dl, topo.hbm_bytes)
  rep = {'train': {**tinfo, **train, 'compile_s': train_s},
         'decode': {**dinfo, **decode, 'compile_s': decode_s},
         'params_bytes': params_b, 'state_bytes': state_b, 'start_params_bytes': start_b,
         'hbm': topo.hbm_bytes}
  ok = train.get('total') is not None and decode.get('total') is not None
  if ok:
    # Training: the compiled step (state + batch + temporaries) + the starting parameters.
    rep['train_peak'] = train['total'] + start_b
    # Decoding: the compiled step counts the parameters once; the optimizer state and the
    # starting parameters stay resident beside it.
    rep['decode_peak'] = decode['total'] + (state_b - params_b) + start_b
    rep['peak'] = max(rep['train_peak'], rep['decode_peak'])
    rep['fits'] = rep['peak'] <= topo.hbm_bytes and bool(train['fits']) and bool(decode['fits'])
  else:
    rep['fits'] = False
  return format_plan(topo, rep), rep


def format_plan(topo: aot.Topology, rep: dict) -> str:
  g = lambda b: f'{b / GiB:.2f} GiB'  # noqa: E731
  t, d = rep['train'], rep['decode']
  mesh = ' x '.join(f'{k}={v}' for k, v in t['mesh'].items() if v > 1) or '1 device'
  lines = [f"RL stage on {topo.name} ({topo.num_chips} chips, mesh {mesh}, rules {t['rules']!r})"]
  for name, r, what in (
      ('policy step', t, f"{t['rows']} rows x {t['seq_len']} tokens, grad_accum "
                         f"{t['grad_accum']}"),
      ('decode step', d, f"batch {d['batch']}, cache {d['context']} slots "
                         f"({d['cache_bytes_per_token']:,} B/token), {d['moe_impl']}")):
    if r.get('total') is None:
      lines.append(f"  {name} ({what}): DOES NOT FIT: temporaries alone {g(r['temp'])}")
      continue
    lines.append(f"  {name} ({what}): arguments {g(r['argument'])}, temporaries "
                 f"{g(r['temp'])}, total {g(r['total'])}; compile {r['compile_s']:.0f} s")
  lines.append(f"  resident: parameters {g(rep['params_bytes'])}, train state "
               f"{g(rep['state_bytes'])}, starting policy {g(rep['start_params_bytes'])}")
  if 'peak' in rep:
    lines.append(f"  together: training {g(rep['train_peak'])}, decoding {g(rep['decode_peak'])}"
                 f" -> peak {g(rep['peak'])} of {g(rep['hbm'])} "
                 f"({100 * rep['peak'] / rep['hbm']:.0f}%) -> "
                 + ('FITS' if rep['fits'] else 'DOES NOT FIT'))
  else:
    lines.append('  together: DOES NOT FIT')
  return '\n'.join(lines)
