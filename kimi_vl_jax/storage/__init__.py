"""Local and remote (`s3://`, `gs://`) paths for everything the package reads or writes.

  paths.py   one file API over local paths, S3 (and S3-compatible servers) and GCS (fsspec)
  retry.py   bounded retries with backoff; StorageError with a countable reason
  cache.py   read-through local cache: bounded, LRU, checksummed, multi-process safe
  blocks.py  random-access byte ranges of a remote object in cached blocks
  mirror.py  orbax checkpoint directories on remote storage (a local staging directory)
  direct.py  orbax writing gs:// itself (multi-process runs: every process its own shards)
  files.py   a remote file as a local one (tokenizer, HF checkpoints, ArrayRecord)
  jsonl.py   JSONL files that configure a run (benchmark files, prompt sets), read at start

This package imports nothing else from kimi_vl_jax; data/, checkpoint/ and train/ use it.
"""

from kimi_vl_jax.storage.paths import configure, is_remote, normalize  # noqa: F401
from kimi_vl_jax.storage.retry import StorageError  # noqa: F401
