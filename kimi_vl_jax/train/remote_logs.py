"""The logs of a run whose workdir is on object storage (`--workdir=s3://...` or `gs://...`).

The run writes its logs (`metrics.jsonl`, `config.txt`, TensorBoard, the loss curve) into a local
staging copy of the workdir (object stores cannot append). `pull()` fills that copy from the
bucket at start, so a run resumed on another machine appends to its metrics; `upload()` copies
the files that changed since the last upload back to the bucket. The loop uploads after every
checkpoint save (so the bucket's `metrics.jsonl` holds every step up to the newest checkpoint
even when the run is then killed without a chance to clean up, e.g. SIGKILL), every
`train.log_upload_s` seconds (default 300; 0 = after every step), and at the end.

Periodic uploads run in a background thread (the step loop never waits for the bucket); one that
fails is logged and retried at the next one. `finish()` uploads what is left and raises if that
fails (never a silent loss). Each file is uploaded from a snapshot of its bytes, so a file the
run appends to meanwhile is uploaded whole up to some line (`read_metrics` ignores a cut line).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from kimi_vl_jax.storage import paths

log = logging.getLogger(__name__)

NOT_LOGS = ('checkpoints',)   # top-level entries of the workdir that are not logs
DEFAULT_INTERVAL_S = 300.0


class RemoteLogs:
  """`local` (the staging copy of the workdir) mirrored to `remote`; see the module doc."""

  def __init__(self, remote: str, local: str, interval_s: float = DEFAULT_INTERVAL_S):
    if interval_s < 0:
      raise ValueError(f'config.train.log_upload_s must be >= 0, got {interval_s}')
    self.remote, self.local, self.interval_s = paths.normalize(remote), local, float(interval_s)
    self._sent: dict[str, tuple[int, int]] = {}   # rel path -> (size, mtime_ns) uploaded
    self._lock = threading.Lock()                 # one upload at a time
    self._wake = threading.Event()
    self._done = threading.Condition()
    self._requested = self._handled = 0           # background upload requests
    self._stop = False
    self._thread: threading.Thread | None = None
    self._last = time.monotonic()
    self.uploads = 0                              # completed `upload()` calls

  def pull(self) -> None:
    """Downloads the remote workdir's log files into the local copy."""
    os.makedirs(self.local, exist_ok=True)
    for rel in paths.walk_files(self.remote):
      if rel.split('/')[0] not in NOT_LOGS:
        dst = os.path.join(self.local, *rel.split('/'))
        paths.download(paths.join(self.remote, rel), dst)
        st = os.stat(dst)
        self._sent[os.path.join(*rel.split('/'))] = (st.st_size, st.st_mtime_ns)

  def upload(self) -> int:
    """Uploads the local log files changed since the last upload; returns how many."""
    with self._lock:
      n = 0
      for rel in paths.walk_files(self.local):
        parts = rel.split(os.sep)
        if parts[0] in NOT_LOGS or '.tmp-' in parts[-1]:
          continue
        src = os.path.join(self.local, rel)
        try:
          st = os.stat(src)
          if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
            continue
          with open(src, 'rb') as f:
            data = f.read()
        except FileNotFoundError:   # removed meanwhile (a replaced plot)
          continue
        paths.write_bytes(paths.join(self.remote, *parts), data)
        self._sent[rel] = (len(data), st.st_mtime_ns) if len(data) == st.st_size else (-1, 0)
        n += 1
      self.uploads += 1
      return n

  def upload_in_background(self) -> None:
    """Asks the background thread for an `upload()` (started on first use)."""
    self._last = time.monotonic()
    with self._done:
      self._requested += 1
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name='remote-logs', daemon=True)
      self._thread.start()
    self._wake.set()

  def maybe_upload(self) -> bool:
    """`upload_in_background()` when `interval_s` has passed since the last upload request."""
    if time.monotonic() - self._last < self.interval_s:
      return False
    self.upload_in_background()
    return True

  def _loop(self):
    while True:
      self._wake.wait()
      self._wake.clear()
      if self._stop:
        return
      with self._done:
        target = self._requested
      try:
        self.upload()
      except Exception as e:  # noqa: BLE001 - retried at the next upload, raised at finish
        log.warning('remote logs: upload to %s failed (%s); retried at the next one',
                    self.remote, e)
      with self._done:
        self._handled = target
        self._done.notify_all()

  def wait(self, timeout: float = 60.0) -> bool:
    """Waits until every background upload requested so far has run; False on timeout."""
    with self._done:
      return self._done.wait_for(lambda: self._handled >= self._requested, timeout)

  def finish(self) -> None:
    """Stops the thread and uploads what is left (raises if that fails)."""
    if self._thread is not None:
      self._stop = True
      self._wake.set()
      self._thread.join()
      self._thread = None
    self.upload()
