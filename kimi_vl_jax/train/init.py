"""Building the model config, the optimizer and the sharded train state of a run.

The state is never materialised on one host: its shapes come from `jax.eval_shape`, its
shardings from the logical axis names through the rule preset (`parallel/rules.py`), and it is
created by a jitted function with those `out_shardings`, or read straight into them. Sources:

  init_from = 'scratch'        random init (`model.kimi_vl.init_params`, or the stage's model)
            | 'hf:DIR'         an HF Kimi-VL directory (`checkpoint.hf.load`)
            | 'params:DIR'     an orbax params directory (`checkpoint.convert.save_params`)
            | 'orbax:WORKDIR'  the params of another stage's train checkpoint (latest step)
            | 'siglip:DIR'     MoonViT pre-training only: an HF SigLIP directory
                               (`checkpoint.siglip.load`) for MoonViT, the pooling head, the
                               text tower and the loss scalars; the caption decoder from scratch
            followed by any number of ',SUBTREE=SOURCE' parts: the top-level subtree SUBTREE
            (e.g. `vision_tower`) is then read from SOURCE instead, `orbax:WORKDIR` (just that
            subtree of another stage's checkpoint, whatever else it holds) or `hf:DIR` (that
            subtree of an HF directory; `language_model` reads a text-only one). E.g. the ViT
            alignment stage: 'scratch,vision_tower=orbax:VIT_PRETRAIN_RUN'.

Optimizer state, step and counters always start fresh except when resuming this run's own
checkpoint (handled by the loop).
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_vl_jax.config_dict import as_dict
from kimi_vl_jax.model import config as model_config_lib
from kimi_vl_jax.model.config import KimiVLConfig
from kimi_vl_jax.model.kimi_vl import init_params
from kimi_vl_jax.optim import make_optimizer, schedules
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.storage import paths as storage_paths
from kimi_vl_jax.train import checkpointing
from kimi_vl_jax.train.train_step import TrainState, new_counters, trainable_tree


def apply_model_overrides(mc: KimiVLConfig, overrides) -> KimiVLConfig:
  """`overrides`: {'text': {...}, 'vision': {...}, <top-level KimiVLConfig field>: value}."""
  ov = as_dict(overrides)
  text = ov.pop('text', None) or {}
  vision = ov.pop('vision', None) or {}
  try:
    if text:
      mc = mc.replace(text=mc.text.__class__(**{**mc.text.__dict__, **dict(text)}))
    if vision:
      mc = mc.replace(vision=mc.vision.__class__(**{**mc.vision.__dict__, **dict(vision)}))
    return mc.replace(**ov)
  except TypeError as e:
    raise ValueError(f'config.model_overrides: {e}') from None


def model_config(cfg, phase_overrides=None) -> KimiVLConfig:
  """The model of a stage config: `cfg.model` (preset name, or a directory / config.json of an
  HF checkpoint) with `cfg.model_overrides` and then the phase's overrides applied. With
  `init_from='hf:DIR'` / `'params:DIR'` and `cfg.model == 'from_init'` the config is read there."""
  name = cfg.model
  init_from = cfg.get('init_from', 'scratch') or 'scratch'
  if name == 'from_init':
    kind, _, path = init_from.partition(':')
    if kind not in ('hf', 'params'):
      raise ValueError("model='from_init' needs init_from='hf:DIR' or 'params:DIR', got "
                       f'{init_from!r}')
    mc = _hf_config(path)
  elif name in model_config_lib.PRESETS:
    mc = model_config_lib.get_preset(name)
  elif storage_paths.exists(name):
    mc = _hf_config(name)
  else:
    raise ValueError(f'config.model={name!r} is neither a preset {sorted(model_config_lib.PRESETS)}'
                     ' nor an HF config path')
  mc = apply_model_overrides(mc, cfg.get('model_overrides'))
  return apply_model_overrides(mc, phase_overrides)


def _hf_config(path: str) -> KimiVLConfig:
  """An HF config.json (or the directory holding one), local or s3:// / gs://."""
  if not storage_paths.is_remote(path):
    return model_config_lib.from_hf_json(path)
  if not path.rstrip('/').endswith('.json'):
    path = storage_paths.join(path, 'config.json')
  return model_config_lib.from_hf_dict(json.loads(storage_paths.read_text(path)))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def parse_init_from(init_from: str) -> tuple[str, list[tuple[str, str]]]:
  """'BASE[,SUBTREE=SOURCE]*' -> (BASE, [(SUBTREE, SOURCE), ...]) (module docstring)."""
  init_from = init_from or 'scratch'
  if '{' in init_from:
    raise ValueError(f'init_from={init_from!r} is a template: set --config.init_from to the '
                     "previous stage's source, e.g. orbax:WORKDIR")
  base, *rest = init_from.split(',')
  parts = []
  for part in rest:
    subtree, eq, source = part.partition('=')
    if not eq or not subtree or source.partition(':')[0] not in ('orbax', 'hf'):
      raise ValueError(f"init_from={init_from!r}: each part after the first must be "
                       f"'SUBTREE=orbax:WORKDIR' or 'SUBTREE=hf:DIR', got {part!r}")
    parts.append((subtree.strip(), source.strip()))
  if len({s for s, _ in parts}) != len(parts):
    raise ValueError(f'init_from={init_from!r} names a subtree twice')
  return base.strip(), parts


class StateFactory:
  """Abstract state, shardings, optimizer and initialisers of one run (all phases share them).

  `init_fn(rng) -> boxed params` is the model's initialiser (default: `KimiVL` of `mc`); a
  stage with another model (MoonViT pre-training) passes its own."""

  def __init__(self, cfg, mc: KimiVLConfig, mesh, init_fn=None):
    self.cfg, self.mc, self.mesh = cfg, mc, mesh
    self.rules = rules_lib.get_rules(cfg.parallel.rules)
    rng = jax.random.PRNGKey(cfg.seed)
    self.init_fn = init_fn or (lambda r: init_params(mc, r))
    self.abstract_boxed = jax.eval_shape(self.init_fn, rng)
    self.param_shardings = rules_lib.param_shardings(self.abstract_boxed, mesh, self.rules)
    abstract_params = nn.meta.unbox(self.abstract_boxed)
    self.tx, self.optimizer_summary = make_optimizer(cfg.optim, self.abstract_boxed)
    optim = as_dict(cfg.optim)
    trainable = optim.get('trainable')
    self.trainable = trainable_tree(abstract_params, None if trainable is None else
                                    list(trainable), tuple(optim.get('frozen', ())))
    self.lr_fn = schedules.make_schedule(optim.get('schedule', {'kind': 'constant',
                                                                'peak_lr': 1e-4}))
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.opt_shardings = rules_lib.opt_state_shardings(
        abstract_opt, self.abstract_boxed, mesh, self.rules, zero1=cfg.parallel.get('zero1', True))
    rep = replicated(mesh)
    self.shardings = TrainState(
        step=rep, params=self.param_shardings, opt_state=self.opt_shardings, rng=rep,
        counters={k: rep for k in new_counters()})
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                          counters={k: jax.ShapeDtypeStruct((), jnp.int32) for k in new_counters()})
    self.abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.shardings)

  def _from_params(self, params, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      rng=rng, counters=new_counters())

  def create(self) -> TrainState:
    """A fresh state from `cfg.init_from` (not a resume), placed on the mesh."""
    init_from = self.cfg.get('init_from', 'scratch') or 'scratch'
    base, parts = parse_init_from(init_from)
    kind, _, path = base.partition(':')
    seed_rng = jax.random.PRNGKey(self.cfg.seed)
    init_rng, state_rng = jax.random.split(seed_rng)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      if kind == 'scratch' and not parts:
        fn = lambda r1, r2: self._from_params(nn.meta.unbox(self.init_fn(r1)), r2)
        return jax.jit(fn, out_shardings=self.shardings)(init_rng, state_rng)
      abstract_params = self.abstract.params
      if kind in ('scratch', 'siglip'):
        params = jax.jit(lambda r: nn.meta.unbox(self.init_fn(r)),
                         out_shardings=self.param_shardings)(init_rng)
        if kind == 'siglip':
          params = self._siglip(path, params)
      elif kind == 'hf':
        from kimi_vl_jax.checkpoint import hf
        # Straight into the param shardings: each process reads only its devices' blocks.
        _, params = hf.load(path, dtype=self.mc.param_dtype, shardings=abstract_params)
      elif kind == 'params':
        from kimi_vl_jax.checkpoint import convert
        _, params = convert.load_params(path, abstract_params)
      elif kind == 'orbax':
        params = checkpointing.restore_params(path, abstract_params)
      else:
        raise ValueError(f"init_from={init_from!r}: expected 'scratch', 'hf:DIR', 'params:DIR', "
                         "'orbax:WORKDIR' or 'siglip:DIR'")
      params = dict(params)
      for subtree, source in parts:
        params[subtree] = self._subtree(subtree, source)
      self._check_same_shapes(params, init_from)
      logging.info('initialised params from %s', init_from)
      return jax.jit(self._from_params, out_shardings=self.shardings,
                     donate_argnums=0)(params, state_rng)

  def _subtree(self, subtree: str, source: str):
    """The top-level `subtree` of the params, read from `source` ('orbax:WORKDIR' | 'hf:DIR')
    into its shardings."""
    if subtree not in self.abstract.params:
      raise ValueError(f'init_from: {subtree!r} is not a top-level subtree of the model; it has '
                       f'{sorted(self.abstract.params)}')
    kind, _, path = source.partition(':')
    abstract = self.abstract.params[subtree]
    if kind == 'orbax':
      got = checkpointing.restore_params(path, {subtree: abstract})[subtree]
    else:
      from kimi_vl_jax.checkpoint import hf
      _, loaded = hf.load(path, dtype=self.mc.param_dtype,
                          include_vision=subtree != 'language_model')
      if subtree not in loaded:
        raise ValueError(f'init_from: {source} has no {subtree!r} subtree')
      got = jax.device_put(loaded[subtree], jax.tree.map(lambda a: a.sharding, abstract))
    logging.info('initialised %s from %s', subtree, source)
    return got

  def _siglip(self, path: str, params: dict) -> dict:
    """`params` with every subtree an HF SigLIP checkpoint provides (MoonViT, pooling head,
    text tower, loss scalars) read from `path` (`checkpoint.siglip.load`)."""
    from kimi_vl_jax.checkpoint import siglip
    init = siglip.load(path, vision_config=self.mc.vision, dtype=self.mc.param_dtype)
    params = dict(params)
    for name, sub in init.params.items():
      if name not in params:
        raise ValueError(f'init_from siglip:{path}: the model has no {name!r} subtree (is this '
                         'the MoonViT pre-training stage?)')
      params[name] = jax.device_put(sub, jax.tree.map(lambda a: a.sharding,
                                                      self.abstract.params[name]))
    return params

  def _check_same_shapes(self, params, where: str) -> None:
    want = {jax.tree_util.keystr(p): (tuple(x.shape), jnp.dtype(x.dtype)) for p, x in
            jax.tree_util.tree_flatten_with_path(self.abstract.params)[0]}
    got = {jax.tree_util.keystr(p): (tuple(np.shape(x)), jnp.dtype(x.dtype)) for p, x in
           jax.tree_util.tree_flatten_with_path(params)[0]}
    if want.keys() != got.keys():
      raise ValueError(f'{where}: parameter tree differs from the model config: missing '
                       f'{sorted(want.keys() - got.keys())[:5]}, unexpected '
                       f'{sorted(got.keys() - want.keys())[:5]}')
    bad = [f'{k}: {got[k][0]} vs model {want[k][0]}' for k in want if want[k][0] != got[k][0]]
    if bad:
      raise ValueError(f'{where}: shapes differ from the model config: ' + '; '.join(bad[:5]))
