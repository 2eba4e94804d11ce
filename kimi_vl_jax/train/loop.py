"""The one training loop every stage but RL runs (ViT pre-training and alignment, joint
pre-training, cooldown, long context, SFT, long-CoT SFT; Kimi-VL report arXiv 2504.07491 sections
2.3-2.4), driven entirely by the stage config.

What a stage plugs in (its model, batches, loss, evaluator) is a `Stage` object: `LMStage` for
every stage that trains `KimiVL` on token batches (ViT alignment included: an LM stage with the
language model frozen), `train.vit_pretrain.VitPretrainStage` for MoonViT's SigLIP + caption
pre-training (`stage_for` picks it from `config.stage`). The loop itself (phases, checkpoints
and resume, preemption, metrics, evaluation schedule) is the same for all.

A run is a sequence of *phases* (`config.phases`): each has its own number of steps, data
overrides (e.g. `seq_len` 8K -> 32K -> 128K) and model overrides (e.g. RoPE base 50000 ->
800000), and so its own data iterator and compiled step; parameters, optimizer state and the LR
schedule run on across phases. A single-phase stage just lists one phase.

Restarts: the loop resumes from the newest complete checkpoint in `workdir/checkpoints` (state,
data iterator position and phase), so re-running the same command after a crash continues the
run exactly: on CPU the losses after a restart are bitwise those of an uninterrupted run. A
SIGTERM (TPU maintenance, spot VMs; `train/preemption.py`) saves a checkpoint at the current step
and ends the run cleanly; the same command resumes it.

Metrics are fetched from the device one step late (`metrics.StepLog`), so the host reads and
shards the next batch while the device runs the current step.
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
from kimi_vl_jax.storage import files as storage_files
from kimi_vl_jax.storage import paths as storage_paths
from kimi_vl_jax.train import checkpointing, evaluate, metrics as metrics_lib, preemption
from kimi_vl_jax.train import remote_logs as remote_logs_lib
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


class LMStage:
  """What a language-model stage plugs into the loop: `KimiVL` on the grain pipeline's token
  batches, `losses.lm_loss`, the held-out loss / answer-accuracy evaluator. Another stage
  (`train.vit_pretrain.VitPretrainStage`) provides the same methods."""

  def __init__(self, cfg):
    self.cfg = cfg

  def model_config(self, phase_overrides=None):
    return model_config(self.cfg, phase_overrides)

  def validate(self, phases: list[dict]) -> None:
    validate_parallel(self.cfg, phases)

  def state_factory(self, mc, mesh) -> StateFactory:
    return StateFactory(self.cfg, mc, mesh)

  def iterator_fn(self) -> Callable:
    return pipeline_iterator_fn(self.cfg.get('tokenizer'))

  def batch_spec(self, data_cfg, mc):
    """An object with `keys` and `split(host_batch, blank_images=) -> (device part, extras)`."""
    return BatchSpec.from_config(data_cfg, mc)

  def jit_step(self, factory, mc, batch_spec) -> Callable:
    return jit_train_step(factory, mc, self.cfg.train, batch_spec)

  def evaluator(self, mc, mesh, rules, iterator_fn, data_cfg, tokenizer, blank_images):
    return evaluate.Evaluator.maybe_create(self.cfg, mc, mesh, rules, iterator_fn, data_cfg,
                                           tokenizer, blank_images)

  def counts_fn(self, mc) -> Callable | None:
    """`(host batch) -> (tokens, FLOPs)` for throughput / MFU; None = the LM batch's."""
    return None


def stage_for(cfg):
  """The `Stage` of a config: MoonViT pre-training or (every other stage) `LMStage`."""
  if cfg.stage == 'vit_pretrain':
    from kimi_vl_jax.train.vit_pretrain import VitPretrainStage
    return VitPretrainStage(cfg)
  return LMStage(cfg)


class Trainer:
  """Runs a stage config in a workdir (see the module docstring).

  `run` = `_start` (optimizer, checkpoint manager, metric writer) -> `_resume_step` -> per phase
  `_open_phase` (iterator, restored state, compiled step, evaluator) and `_run_phase` (the step
  loop: `_train_step`, `_checkpoint`, `_maybe_eval`) -> `_finish` (summary, loss curve).
  """

  def __init__(self, cfg, workdir: str, iterator_fn: Callable | None = None, stage=None):
    storage_paths.configure(cfg.get('storage'))  # endpoints, cache, retries (also for workers)
    self.cfg = cfg
    self.stage = stage or stage_for(cfg)
    # A remote workdir (s3:// / gs://): checkpoints go there (through the mirror), the logs to a
    # local staging copy that starts from the remote one and is uploaded after every checkpoint
    # save, every `train.log_upload_s` seconds and when the run ends (train/remote_logs.py).
    self.remote_workdir = storage_paths.normalize(workdir) if storage_paths.is_remote(
        workdir) else None
    self.workdir = (storage_files.staging_dir(workdir, 'workdir') if self.remote_workdir
                    else os.path.abspath(workdir))
    self.is_main = jax.process_index() == 0
    self.remote_logs = None
    if self.remote_workdir:
      storage_paths.check_bucket(self.remote_workdir, '--workdir')
      self.remote_logs = remote_logs_lib.RemoteLogs(
          self.remote_workdir, self.workdir,
          float(cfg.train.get('log_upload_s', remote_logs_lib.DEFAULT_INTERVAL_S)))
      self.remote_logs.pull()
    self.phases = resolve_phases(cfg)
    self.stage.validate(self.phases)
    self.log_every = int(cfg.train.get('log_every', 1))
    if self.log_every < 1:
      raise ValueError(f'config.train.log_every must be >= 1, got {self.log_every}')
    self.profile = metrics_lib.ProfileWindow(cfg.train.get('profile_steps'),
                                             os.path.join(self.workdir, 'profile'))
    os.makedirs(self.workdir, exist_ok=True)
    self.iterator_fn = iterator_fn or self.stage.iterator_fn()
    self.total_steps = self.phases[-1]['end']
    self.mesh = mesh_lib.make_mesh(cfg.parallel)
    self.rules = rules_lib.get_rules(cfg.parallel.rules)
    self.blank_images = bool(cfg.train.get('blank_images', False))

  def run(self) -> dict[str, Any]:
    """Trains every phase from the newest checkpoint (or from `init_from`); returns a summary.
    A SIGTERM stops it after a checkpoint at the current step (`summary['preempted_at']`)."""
    self._start()
    state = self._resume_step()
    try:
      with preemption.Preemption() as self.preemption:
        for p_idx, phase in enumerate(self.phases):
          if phase['end'] <= self.step:
            continue
          state = self._run_phase(p_idx, phase, state)
          if 'preempted_at' in self.summary:
            break
    finally:
      self.profile.close()
    return self._finish(state)

  def _start(self) -> None:
    """Optimizer and state layout, checkpoint manager, metric writer, MFU reference."""
    cfg, ck = self.cfg, self.cfg.checkpoint
    self.factory = self.stage.state_factory(
        self.stage.model_config(self.phases[0]['model_overrides']), self.mesh)
    if self.is_main:
      print(self.factory.optimizer_summary, flush=True)  # shown whatever the log verbosity
      with open(os.path.join(self.workdir, 'config.txt'), 'w') as f:
        f.write(str(cfg))
    self.manager = checkpointing.make_manager(
        ck.get('dir') or storage_paths.join(self.remote_workdir or self.workdir, 'checkpoints'),
        interval=int(ck.interval),
        keep=ck.get('keep', 3), keep_every=int(ck.get('keep_every', 0) or 0),
        async_save=bool(ck.get('async_save', True)))
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_main,
                                           tensorboard=bool(cfg.train.get('tensorboard', True)))
    peak, peak_src = metrics_lib.peak_flops_per_device(cfg.train.get('peak_flops'))
    self.peak_total = peak * jax.device_count()
    logging.info('MFU reference: %.3g FLOP/s per device (%s)', peak, peak_src)
    self.t_start = time.time()

  def _resume_step(self):
    """Sets `self.step` from the newest complete checkpoint; returns a fresh state when there
    is none, else None (the state is restored with its phase's iterator, `_open_phase`)."""
    self.resume_step = checkpointing.latest_step(self.manager)
    # init_from: where the run's first start took its params (a resume reads its own checkpoint).
    self.summary: dict[str, Any] = {'resumed_from': self.resume_step,
                                    'init_from': self.cfg.get('init_from') or 'scratch'}
    self.step = self.resume_step or 0
    if self.resume_step is None:
      return self.factory.create()
    self.data_phase = checkpointing.restore_meta(self.manager, self.resume_step).get('phase')
    if self.is_main:
      print(f'resuming from {checkpointing.location(self.manager)} step {self.resume_step}',
            flush=True)
    return None

  def _open_phase(self, p_idx: int, phase: dict, state):
    """(state, iterator, first device batch, jitted step, evaluator, model config) of a phase;
    on resume the state (and the iterator position, if it is this phase's) is restored."""
    cfg = self.cfg
    mc = self.stage.model_config(phase['model_overrides'])
    iterator, tokenizer = self.iterator_fn(phase['data'], seed=int(cfg.seed) + 1000 * p_idx)
    if state is None:
      same = self.data_phase == p_idx
      state = checkpointing.restore(self.manager, self.resume_step, self.factory.abstract,
                                    iterator if same else None)
      if not same and self.step != phase['start']:
        raise RuntimeError(f'checkpoint at step {self.step} holds data state of phase '
                           f'{self.data_phase} but the run is in phase {p_idx} ({phase["name"]}) '
                           'mid-way')
    self.batch_spec = self.stage.batch_spec(phase['data'], mc)
    first, _ = self.batch_spec.split(next(iterator), blank_images=self.blank_images)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      jstep = self.stage.jit_step(self.factory, mc, self.batch_spec)
    evaluator = self.stage.evaluator(mc, self.mesh, self.rules, self.iterator_fn, phase['data'],
                                     tokenizer, self.blank_images)
    return state, iterator, first, jstep, evaluator, mc

  def _run_phase(self, p_idx: int, phase: dict, state):
    """The step loop of one phase. Each step is dispatched before the previous step's metrics
    are fetched, so the host reads the next batch while the device computes."""
    state, iterator, batch, jstep, evaluator, mc = self._open_phase(p_idx, phase, state)
    bar = _progress(self.is_main, self.step, self.total_steps, phase['name'])
    log = metrics_lib.StepLog(self.writer, bar, mc, self.peak_total, self.log_every, p_idx,
                              counts_fn=self.stage.counts_fn(mc))
    while self.step < phase['end']:
      if batch is None:
        batch = self.batch_spec.split(next(iterator), blank_images=self.blank_images)[0]
      state, metrics = self._train_step(jstep, state, batch)
      end = self.step == phase['end']
      log.add(self.step, metrics, batch,
              _data_metrics(iterator) if end or self.step % self.log_every == 0 else None)
      batch = None
      log.flush(keep=1)  # all but this step's: fetched one step late
      stop = self.preemption.reached(self.step)
      saved = self._checkpoint(state, iterator, p_idx, force=end or stop)
      self._upload_logs(log, saved)
      self._maybe_eval(evaluator, state, log, bar, end)
      if stop:
        self._stop(log)
        break
    log.flush()
    bar.close()
    return state

  def _train_step(self, jstep, state, batch: dict):
    """Dispatches one step (asynchronously) and advances `self.step`; inside the profile
    window (`train.profile_steps`) the step is traced."""
    self.profile.before(self.step + 1)
    gb = rules_lib.shard_batch(batch, self.mesh, self.rules)
    with jax.profiler.StepTraceAnnotation('train', step_num=self.step + 1):
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        state, metrics = jstep(state, gb)
    self.step += 1
    self.profile.after(self.step, metrics)
    return state, metrics

  def _checkpoint(self, state, iterator, p_idx: int, force: bool) -> bool:
    meta = {'phase': p_idx, 'stage': self.cfg.stage}
    return checkpointing.save(self.manager, self.step, state, iterator, meta, force=force)

  def _upload_logs(self, log, saved: bool) -> None:
    """Remote workdir: after a checkpoint save the logs up to its step are uploaded (the
    step's own record is fetched and written first, not one step late), otherwise every
    `train.log_upload_s` seconds; both in the background."""
    if self.remote_logs is None:
      return
    if saved:
      log.flush()
      if self.is_main:
        self.remote_logs.upload_in_background()
    elif self.is_main:
      self.remote_logs.maybe_upload()

  def _maybe_eval(self, evaluator, state, log, bar, phase_end: bool) -> None:
    if not (evaluator and evaluator.due(self.step, phase_end)):
      return
    log.flush()
    res = evaluator.run(state.params)
    self.writer.write(self.step, res, kind='eval')
    bar.write(f'eval @ step {self.step}: ' + ', '.join(f'{k}={v:.4f}' for k, v in res.items()))
    self.summary['eval'] = res

  def _stop(self, log) -> None:
    """Preempted: the checkpoint at this step is saved (forced); flush and leave the loop."""
    log.flush()
    self.summary['preempted_at'] = self.step
    msg = (f'preempted (SIGTERM): checkpoint at step {self.step} of {self.total_steps}; '
           'run the same command again to resume')
    logging.warning('%s', msg)
    if self.is_main:
      print(msg, flush=True)

  def _finish(self, state) -> dict[str, Any]:
    """Waits for the last checkpoint; summary (counters, losses, loss-curve PNG)."""
    self.manager.wait_until_finished()
    self.manager.close()
    summary = self.summary
    if state is not None:
      summary['counters'] = {k: int(v) for k, v in jax.device_get(state.counters).items()}
    summary['final_step'] = self.step
    summary['wall_time_s'] = time.time() - self.t_start
    if self.is_main:
      summary['loss_curve'] = metrics_lib.plot_loss_curve(self.workdir)
      train = metrics_lib.read_metrics(self.workdir)
      if train:
        summary['first_loss'], summary['last_loss'] = train[0]['loss'], train[-1]['loss']
    self.writer.close()
    if self.remote_logs is not None and self.is_main:
      self.remote_logs.finish()
    return summary


def validate_parallel(cfg, phases: list[dict] | None = None) -> None:
  """`parallel.mesh.validate` for every phase (its data and model overrides): a bad parallel
  config stops here, before anything compiles, with a message naming the field to change."""
  for phase in phases or resolve_phases(cfg):
    mesh_lib.validate({'parallel': cfg.parallel, 'data': phase['data']},
                      model_config(cfg, phase['model_overrides']))


def _data_metrics(iterator) -> dict:
  """The pipeline's realised mix and skip counts (`data.pipeline.data_stats`), when the iterator
  reports them (test iterators may not)."""
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
