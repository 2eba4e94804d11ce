"""Train checkpoints: orbax CheckpointManager holding the train state and the data iterator.

One directory per run, `workdir/checkpoints/<step>/`, each with
  state/   the TrainState (params, optimizer state, step, rng, counters), orbax StandardSave
  data/    the data iterator state (grain's checkpoint handler, one JSON file per process)
  meta/    JSON: phase index of the data state, stage name

Saves are asynchronous (the step loop continues while arrays are written). Orbax writes each
step into a temporary directory and renames it when complete, so `latest_step()` never lists a
checkpoint cut off mid-write (a SIGKILL during a save leaves only a `*.orbax-checkpoint-tmp*`
directory, which is deleted on the next start). Retention: the newest `keep` checkpoints, plus
every step that is a multiple of `keep_every` (0 = none).

The directory may be `s3://` or `gs://` (`config.checkpoint.dir`). A single-process run: orbax
writes into a local staging directory whose finalized steps a background thread uploads, each
with a commit file written last, and a restart (on any machine) first downloads the newest
complete remote step (kimi_vl_jax/storage/mirror.py, which also says why orbax does not write
s3:// itself). A multi-process run: orbax writes `gs://` directly from every process (each its
own shards; kimi_vl_jax/storage/direct.py); `s3://` is refused at start.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from kimi_vl_jax.storage import direct as direct_lib
from kimi_vl_jax.storage import mirror as mirror_lib
from kimi_vl_jax.storage import paths as storage_paths


class IteratorState:
  """Adapts any iterator with `get_state()/set_state()` (grain `DatasetIterator` or a wrapper)
  to grain's orbax handler, which stores `get_state()` bytes for non-grain iterators."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state(), sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    if hasattr(self.iterator, 'start_prefetch'):
      self.iterator.start_prefetch()


def make_manager(directory: str, *, interval: int, keep: int | None, keep_every: int = 0,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` saving every `interval` steps."""
  if interval < 1:
    raise ValueError(f'checkpoint.interval must be >= 1, got {interval}')
  if keep is not None and keep < 1:
    raise ValueError(f'checkpoint.keep must be >= 1 or None (keep all), got {keep}')
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=interval, max_to_keep=keep, keep_period=keep_every or None,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
  if storage_paths.is_remote(directory) and jax.process_count() > 1:
    url = direct_lib.check(directory, 'checkpoint.dir', jax.process_count())
    logging.info('checkpoints on %s, written by every process directly', url)
    return ocp.CheckpointManager(url, options=options, item_names=('state', 'data', 'meta'))
  if storage_paths.is_remote(directory):
    mirror = remote_mirror(directory, 'checkpoint.dir')
    return MirroredManager(mirror, mirror.local, options=options,
                           item_names=('state', 'data', 'meta'))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data', 'meta'))


def remote_mirror(directory: str, what: str, newest_only: bool = False
                  ) -> mirror_lib.CheckpointMirror:
  """The mirror of a remote checkpoint directory, its staging copy made to match the remote
  (a missing bucket or a multi-process run stops here, naming `what`)."""
  mirror_lib.check_single_process(directory, jax.process_count())
  storage_paths.check_bucket(directory, what)
  mirror = mirror_lib.CheckpointMirror(directory)
  steps = mirror.pull(newest_only=newest_only)
  logging.info('checkpoints on %s (staged in %s): complete steps %s', mirror.remote,
               mirror.local, steps)
  return mirror


class MirroredManager(ocp.CheckpointManager):
  """A CheckpointManager over a local staging directory whose finalized steps are uploaded by
  `mirror` after each save (in the background) and at `close()` (which raises if an upload
  failed for good). `location` is the remote URL (`directory` the staging directory)."""

  def __init__(self, mirror: mirror_lib.CheckpointMirror, *args, **kwargs):
    self.mirror = mirror
    self.location = mirror.remote
    super().__init__(*args, **kwargs)

  def save(self, step, *args, **kwargs):
    saved = super().save(step, *args, **kwargs)
    self.mirror.sync_in_background()  # the steps orbax has finalized so far
    return saved

  def close(self):
    super().close()
    self.mirror.finish()


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator, meta: dict,
         force: bool = False) -> bool:
  """Saves (asynchronously) if `step` is due under the manager's policy, or when `force`."""
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(IteratorState(iterator)),
      meta=ocp.args.JsonSave(meta))
  saved = manager.save(step, args=args, force=force)
  if saved:
    logging.info('checkpoint save started at step %d', step)
  return saved


def location(manager: ocp.CheckpointManager) -> str:
  """Where the checkpoints live: the remote URL of a MirroredManager, else the directory."""
  return getattr(manager, 'location', None) or str(manager.directory)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest *complete* checkpoint step (temporary directories are never listed)."""
  return manager.latest_step()


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            iterator=None) -> Any:
  """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs with
  `.sharding`); when `iterator` is given its position is restored in place too."""
  args = {'state': ocp.args.StandardRestore(abstract_state)}
  if iterator is not None:
    args['data'] = grain.checkpoint.CheckpointRestore(IteratorState(iterator))
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  return restored['state']


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> Any:
  """Only the params of another run's train checkpoint (`init_from='orbax:WORKDIR'`).

  `abstract_params` are the params' ShapeDtypeStructs (with shardings); the optimizer state
  and the rest of the saved TrainState are not read.
  """
  if storage_paths.is_remote(workdir) and jax.process_count() > 1:
    directory = direct_lib.check(storage_paths.join(workdir, 'checkpoints'), 'init_from',
                                 jax.process_count())
  elif storage_paths.is_remote(workdir):
    directory = remote_mirror(storage_paths.join(workdir, 'checkpoints'), 'init_from',
                              newest_only=True).local
  else:
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not storage_paths.isdir(directory):
    raise FileNotFoundError(f'init_from orbax: no checkpoints directory at {directory}')
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_names=('state', 'data', 'meta')) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'init_from orbax: no complete checkpoint in {directory}')
    # Restore just the params subtree (partial restore: the rest of the state is not read).
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={'params': abstract_params},
        restore_args=jax.tree.map(_restore_arg, {'params': abstract_params}),
        partial_restore=True)))
  logging.info('init_from orbax: params of %s step %d', directory, step)
  return restored['state']['params']


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=getattr(x, 'sharding', None), global_shape=x.shape,
                              dtype=x.dtype)
