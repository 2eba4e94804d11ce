"""Orbax checkpoint directories written by orbax itself on `gs://` (multi-process runs).

A run with several JAX processes cannot use the staging mirror (mirror.py): each host's staging
directory would hold only its own shards. orbax-checkpoint 0.12.8 writes `gs://` natively: the
arrays through TensorStore's `gcs` kvstore driver (each process its own OCDBT sub-database
`ocdbt.process_<i>/`, merged by process 0), the metadata and commit files through etils.epath
(fsspec's gcsfs), and it marks a finished step with `commit_success.txt` instead of renaming a
temporary directory (object stores cannot rename), so a step cut off mid-save is never listed.
Every process writes its shards straight to the bucket: no staging, nothing to upload after.

`s3://` cannot go this way: orbax's TensorStore spec builder normalises the directory with
`os.path.normpath`, which turns `s3://b/k` into `s3:/b/k`, and then rejects it ("Checkpoint path
should be absolute"); only `gs:/` is repaired. A multi-process run with an `s3://` checkpoint
directory is refused at start (`check`).

Endpoints: TensorStore reads its own variables, not STORAGE_EMULATOR_HOST. With an emulator
configured (`STORAGE_EMULATOR_HOST` / `config.storage.gcs_emulator_host`) `configure_tensorstore`
points TENSORSTORE_GCS_HTTP_URL at it and gives TensorStore a placeholder bearer token
(GOOGLE_AUTH_TOKEN_FOR_TESTING: emulators take no credentials); without one TensorStore uses
Google's default credentials (GOOGLE_APPLICATION_CREDENTIALS or the VM's service account).
"""

from __future__ import annotations

import os

from kimi_vl_jax.storage import paths


def check(url: str, what: str, process_count: int) -> str:
  """The normalised URL of a checkpoint directory orbax may write directly with
  `process_count` processes; ValueError (naming `what`) for a scheme it cannot write."""
  url = paths.normalize(url)
  if paths.scheme(url) != 'gs':
    raise ValueError(
        f'{what}={url!r}: a run with {process_count} processes writes its checkpoints directly '
        'from every process, which orbax supports on gs:// only (on s3:// its TensorStore '
        'spec builder turns s3://b/k into s3:/b/k and rejects it); use a gs:// bucket, a '
        'shared file system (e.g. a mounted bucket) or a single-process run')
  paths.check_bucket(url, what)
  configure_tensorstore()
  return url


_SET: dict[str, str] = {}   # the variables configure_tensorstore set (it may update those)


def configure_tensorstore() -> None:
  """Points TensorStore's GCS driver at the emulator of STORAGE_EMULATOR_HOST, if one is set
  (unless the user set TENSORSTORE_GCS_HTTP_URL)."""
  emulator = os.environ.get('STORAGE_EMULATOR_HOST')
  current = os.environ.get('TENSORSTORE_GCS_HTTP_URL')
  if not emulator or (current and current != _SET.get('TENSORSTORE_GCS_HTTP_URL')):
    return
  _SET['TENSORSTORE_GCS_HTTP_URL'] = emulator if '://' in emulator else f'http://{emulator}'
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = _SET['TENSORSTORE_GCS_HTTP_URL']
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')
