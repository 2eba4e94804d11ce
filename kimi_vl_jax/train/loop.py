"""The one training loop every LM stage runs (joint pre-training, cooldown, long context, SFT,
long-CoT SFT; Kimi-VL report, arXiv 2504.07491, section 2.3), driven entirely by the stage config.

A run is a sequence of *phases* (`config.phases`): each has its own number of steps, data
overrides (e.g. `seq_len` 8K -> 32K -> 128K) and model overrides (e.g. RoPE base 50000 ->
800000), and so its own data iterator and compiled step; parameters, optimizer state and the LR
schedule run on across phases. A single-phase stage just lists one phase.

Restarts: the loop resumes from the newest complete checkpoint in `workdir/checkpoints` (state,
data iterator position and phase), so re-running the same command after a crash continues the
run exactly: on CPU the losses after a restart are bitwise those of an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from kimi_vl_jax.data.batch import BatchSpec
from kimi_vl_jax.parallel import mesh as mesh_lib
from kimi_vl_jax.parallel import rules as rules_lib
from kimi_vl_jax.train import checkpointing, evaluate, metrics as metrics_lib
from kimi_vl_jax.train.init import StateFactory, model_config
from kimi_vl_jax.train.stage_config import resolve_phases
from kimi_vl_jax.train.train_step import jit_train_step


def pipeline_iterator_fn(tokenizer_cfg) -> Callable:
  """`(data_cfg, seed) -> (iterator, tokenizer)` over the grain pipeline (`data/pipeline.py`):
  a checkpointable iterator of this host's rows."""
  from kimi_vl_jax.data import pipeline

  def make(data_cfg, *, seed: int):
    tok = pipeline.make_tokenizer(tokenizer_cfg)
    it = pipeline.make_iterator(data_cfg, tok, seed=seed, process_index=jax.process_index(),
                                process_count=jax.process_count())
    return it, tok

  return make


class Trainer:
  """Runs a stage config in a workdir (see the module docstring)."""

  def __init__(self, cfg, workdir: str, iterator_fn: Callable | None = None):
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.iterator_fn = iterator_fn or pipeline_iterator_fn(cfg.get('tokenizer'))
    self.phases = resolve_phases(cfg)
    self.total_steps = self.phases[-1]['end']
    self.mesh = mesh_lib.make_mesh(cfg.parallel)
    self.rules = rules_lib.get_rules(cfg.parallel.rules)
    self.is_main = jax.process_index() == 0
    self.blank_images = bool(cfg.train.get('blank_images', False))

  def run(self) -> dict[str, Any]:
    cfg = self.cfg
    ck = cfg.checkpoint
    mc0 = model_config(cfg, self.phases[0]['model_overrides'])
    factory = StateFactory(cfg, mc0, self.mesh)
    if self.is_main:
      logging.info('%s', factory.optimizer_summary)
      with open(os.path.join(self.workdir, 'config.txt'), 'w') as f:
        f.write(str(cfg))
    manager = checkpointing.make_manager(
        os.path.join(self.workdir, 'checkpoints'), interval=int(ck.interval),
        keep=ck.get('keep', 3), keep_every=int(ck.get('keep_every', 0) or 0),
        async_save=bool(ck.get('async_save', True)))
    writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main,
                                      tensorboard=bool(cfg.train.get('tensorboard', True)))
    peak, peak_src = metrics_lib.peak_flops_per_device(cfg.train.get('peak_flops'))
    peak_total = peak * jax.device_count()
    logging.info('MFU reference: %.3g FLOP/s per device (%s)', peak, peak_src)

    resume_step = checkpointing.latest_step(manager)
    data_phase, state = None, None
    if resume_step is not None:
      meta = checkpointing.restore_meta(manager, resume_step)
      data_phase = meta.get('phase')
      logging.info('resuming from %s step %d', manager.directory, resume_step)
    else:
      state = factory.create()
    step = resume_step or 0
    t_start = time.time()
    summary: dict[str, Any] = {'resumed_from': resume_step}
    last_phase_ctx = None

    for p_idx, phase in enumerate(self.phases):
      if phase['end'] <= step:
        continue
      mc = model_config(cfg, phase['model_overrides'])
      iterator, tokenizer = self.iterator_fn(phase['data'], seed=int(cfg.seed) + 1000 * p_idx)
      if state is None:  # resume: restore the state (and the iterator, if it is this phase's)
        same = data_phase == p_idx
        state = checkpointing.restore(manager, resume_step, factory.abstract,
                                      iterator if same else None)
        if not same and step != phase['start']:
          raise RuntimeError(f'checkpoint at step {step} holds data state of phase {data_phase}'
                             f' but the run is in phase {p_idx} ({phase["name"]}) mid-way')
      first = next(iterator)
      spec = BatchSpec.from_config(phase['data'], mc)
      dev, extra = spec.split(first, blank_images=self.blank_images)
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        jstep = jit_train_step(factory, mc, cfg.train, spec)
      evaluator = evaluate.Evaluator.maybe_create(cfg, mc, self.mesh, self.rules, self.iterator_fn,
                                                  phase['data'], tokenizer, self.blank_images)
      bar = _progress(self.is_main, step, self.total_steps, phase['name'])
      pending = dev
      last_time, tokens_since, flops_since = time.time(), 0.0, 0.0
      log_every = int(cfg.train.get('log_every', 1))
      while step < phase['end']:
        dev = (pending if pending is not None else
               spec.split(next(iterator), blank_images=self.blank_images)[0])
        pending = None
        gb = rules_lib.shard_batch(dev, self.mesh, self.rules)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
          state, m = jstep(state, gb)
        step += 1
        tokens_since += float((dev['segment_ids'] > 0).sum()) * jax.process_count()
        flops_since += metrics_lib.batch_flops(mc, dev) * jax.process_count()
        m = jax.device_get(m)
        rec = {k: v for k, v in m.items()}
        if step % log_every == 0 or step == phase['end']:
          now = time.time()
          dt = max(now - last_time, 1e-9)
          rec.update(tokens_per_s=tokens_since / dt, mfu=flops_since / dt / peak_total,
                     step_time_s=dt / max(1, log_every if step % log_every == 0 else 1),
                     phase=p_idx)
          rec.update(_data_metrics(iterator, extra))
          last_time, tokens_since, flops_since = now, 0.0, 0.0
          bar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                          mfu=f"{rec['mfu']:.2%}", skip=int(m['counters/skipped_steps']),
                          refresh=False)
        writer.write(step, rec)
        bar.update(1)
        meta = {'phase': p_idx, 'stage': cfg.stage}
        checkpointing.save(manager, step, state, iterator, meta, force=step == phase['end'])
        if evaluator and evaluator.due(step, phase['end'] == step):
          res = evaluator.run(state.params)
          writer.write(step, res, kind='eval')
          bar.write(f'eval @ step {step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in res.items()))
          summary['eval'] = res
      bar.close()
      last_phase_ctx = (mc, evaluator)
    manager.wait_until_finished()
    manager.close()
    if state is not None:
      summary['counters'] = {k: int(v) for k, v in jax.device_get(state.counters).items()}
    summary['final_step'] = step
    summary['wall_time_s'] = time.time() - t_start
    if self.is_main:
      summary['loss_curve'] = metrics_lib.plot_loss_curve(self.workdir)
      train = metrics_lib.read_metrics(self.workdir)
      if train:
        summary['first_loss'], summary['last_loss'] = train[0]['loss'], train[-1]['loss']
    writer.close()
    del last_phase_ctx
    return summary


def _data_metrics(iterator, extra: dict) -> dict:
  """The pipeline's realised mix and skip counts (`data.pipeline.data_stats`), when the iterator
  reports them (test iterators may not)."""
  del extra
  fn = getattr(iterator, 'stats', None)
  if not callable(fn):
    return {}
  out = fn()
  return {f'data/{k}': v for k, v in out.items() if np.ndim(v) == 0}


class _NoBar:
  def update(self, n): pass
  def set_postfix(self, **kw): pass
  def write(self, s): print(s, flush=True)
  def close(self): pass


def _progress(enabled: bool, step: int, total: int, desc: str):
  if not enabled:
    return _NoBar()
  import tqdm
  return tqdm.tqdm(total=total, initial=step, desc=desc, dynamic_ncols=True, mininterval=1.0)
