"""Orbax checkpoint directories on remote storage, through a local staging directory.

orbax-checkpoint 0.12.8 cannot write `s3://` checkpoints: its TensorStore spec builder
normalises the directory with `os.path.normpath`, which turns `s3://b/k` into `s3:/b/k`, then
rejects it as not absolute (only `gs:/` is repaired, for its GCS driver). So for both remote
schemes (one code path, tested against an S3 and a GCS server) the manager writes into a local
staging directory (atomic renames, as for any local run) and a mirror uploads each finalized
step to `<remote>/<step>/`, then `<remote>/<step>/commit_success.txt` last (orbax's own commit
file of the step, which it also writes locally), and deletes the remote steps orbax no longer
keeps (the marker first). A remote step without the marker is an unfinished upload and is never
listed. At start `pull()` makes the staging directory match the remote one (the remote side is
the truth): it deletes local steps the remote does not have complete, and downloads the remote
steps missing locally (all of them for a training run, so orbax's retention sees every kept
step; only the newest to read parameters), so a run resumes on a new machine from the bucket.

Uploads run in a background thread after each save, so the step loop does not wait; `finish()`
waits for them and raises if a step could not be uploaded (never a silent loss). Single-process
runs only: with several JAX processes each host's staging directory would hold only its own
shards (`check_single_process`); those write `gs://` directly (direct.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading

from kimi_vl_jax.storage import files
from kimi_vl_jax.storage import paths
from kimi_vl_jax.storage.retry import StorageError

log = logging.getLogger(__name__)

COMMIT_FILE = 'commit_success.txt'


def _local_steps(local: str) -> list[int]:
  if not os.path.isdir(local):
    return []
  return sorted(int(n) for n in os.listdir(local)
                if n.isdigit() and os.path.isdir(os.path.join(local, n)))


class CheckpointMirror:
  """`local` (orbax's directory) mirrored to `remote` (s3:// or gs://); see the module doc."""

  def __init__(self, remote: str, local: str | None = None):
    self.remote = paths.normalize(remote)
    self.local = local or files.staging_dir(self.remote, 'checkpoints')
    self._uploaded: set[int] = set()
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._stop = False
    self._error: BaseException | None = None
    self._thread: threading.Thread | None = None

  def remote_steps(self) -> list[int]:
    """Steps whose upload completed (their commit file exists)."""
    names = [n for n in paths.listdir(self.remote) if n.isdigit()]
    return sorted(int(n) for n in names
                  if paths.exists(paths.join(self.remote, n, COMMIT_FILE)))

  def pull(self, newest_only: bool = False) -> list[int]:
    """Makes the local directory hold the remote's complete steps (the newest, or all)."""
    os.makedirs(self.local, exist_ok=True)
    remote = self.remote_steps()
    for step in _local_steps(self.local):
      if step not in remote:
        shutil.rmtree(os.path.join(self.local, str(step)), ignore_errors=True)
    for name in os.listdir(self.local):  # unfinished local saves of a killed run
      if not name.isdigit():
        shutil.rmtree(os.path.join(self.local, name), ignore_errors=True)
    for step in (remote[-1:] if newest_only else remote):
      dst = os.path.join(self.local, str(step))
      if not os.path.isdir(dst):
        tmp = dst + '.download-tmp'
        shutil.rmtree(tmp, ignore_errors=True)
        files.fetch_tree(paths.join(self.remote, str(step)), 'checkpoints', local=tmp)
        os.rename(tmp, dst)
        log.info('checkpoint mirror: step %d downloaded from %s', step, self.remote)
    self._uploaded = set(_local_steps(self.local)) & set(remote)
    return remote

  def sync(self) -> None:
    """Uploads local steps not yet uploaded, then deletes remote steps no longer kept."""
    with self._lock:
      local = _local_steps(self.local)
      for step in local:
        if step in self._uploaded:
          continue
        src = os.path.join(self.local, str(step))
        try:
          files.publish_tree(src, paths.join(self.remote, str(step)), marker=COMMIT_FILE)
        except (FileNotFoundError, StorageError) as e:
          if os.path.isdir(src):
            raise
          # orbax deleted it (retention) while it was being uploaded: drop the partial copy.
          log.info('checkpoint mirror: step %d was deleted during its upload (%s)', step, e)
          paths.remove(paths.join(self.remote, str(step)))
          continue
        self._uploaded.add(step)
        log.info('checkpoint mirror: step %d uploaded to %s', step, self.remote)
      for step in sorted(self._uploaded - set(local)):
        url = paths.join(self.remote, str(step))
        paths.remove(paths.join(url, COMMIT_FILE))
        paths.remove(url)
        self._uploaded.discard(step)

  def sync_in_background(self) -> None:
    """Asks the background thread for a `sync()` (started on first use)."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name='checkpoint-mirror', daemon=True)
      self._thread.start()
    self._wake.set()

  def _loop(self):
    while True:
      self._wake.wait()
      self._wake.clear()
      if self._stop:
        return
      try:
        self.sync()
        self._error = None
      except Exception as e:  # noqa: BLE001 - kept, retried on the next save, raised at finish
        self._error = e
        log.warning('checkpoint mirror: upload to %s failed (%s); retried after the next '
                    'save and at the end', self.remote, e)

  def finish(self) -> None:
    """Stops the thread, uploads what is left (raises if that fails) and deletes remote steps
    left uncommitted by an upload that lost a race with orbax's retention."""
    if self._thread is not None:
      self._stop = True
      self._wake.set()
      self._thread.join()
      self._thread = None
    self.sync()
    committed = set(self.remote_steps())
    for name in paths.listdir(self.remote):
      if name.isdigit() and int(name) not in committed:
        paths.remove(paths.join(self.remote, name))


def check_single_process(remote: str, process_count: int) -> None:
  if process_count > 1:
    raise ValueError(
        f'checkpoints on {remote!r}: remote checkpoint directories are written through a local '
        f'staging directory, which holds only this host\'s shards with {process_count} '
        'processes; multi-process runs write gs:// directly (storage/direct.py)')
