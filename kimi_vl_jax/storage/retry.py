"""Bounded retries with exponential backoff for object-storage calls, and the error they raise.

A call either returns, or raises `StorageError` with a `reason` the data pipeline counts:

  missing_object      the object (or its bucket) does not exist: not retried
  access_denied       the credentials may not read / write it: not retried
  remote_unavailable  the server did not answer (connection refused or reset, timeout, 5xx,
                      a transfer cut short) after every attempt

Transient failures are retried `attempts` times in all, sleeping `backoff_s * 2**k` (at most
`max_backoff_s`) between attempts, so a call gives up after a bounded time and never hangs
(each attempt is itself bounded by the client's connect / read timeouts, `paths.filesystem`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar('T')

REASONS = ('missing_object', 'access_denied', 'remote_unavailable')


class StorageError(OSError):
  """A storage call that failed for good; `reason` in REASONS, `url` the object."""

  def __init__(self, reason: str, url: str, detail: str):
    super().__init__(f'{reason}: {url}: {detail}')
    self.reason, self.url, self.detail = reason, url, detail


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """How often and how long to retry (env KIMI_VL_JAX_STORAGE_RETRIES / _BACKOFF_S /
  _MAX_BACKOFF_S override the defaults; `paths.configure` sets them from `config.storage`)."""
  attempts: int = 6
  backoff_s: float = 0.5
  max_backoff_s: float = 8.0

  @classmethod
  def from_env(cls) -> 'RetryPolicy':
    env = os.environ
    return cls(attempts=max(1, int(env.get('KIMI_VL_JAX_STORAGE_RETRIES', cls.attempts))),
               backoff_s=float(env.get('KIMI_VL_JAX_STORAGE_BACKOFF_S', cls.backoff_s)),
               max_backoff_s=float(env.get('KIMI_VL_JAX_STORAGE_MAX_BACKOFF_S',
                                           cls.max_backoff_s)))

  def delays(self):
    """The sleeps between attempts (attempts - 1 of them)."""
    return [min(self.max_backoff_s, self.backoff_s * 2 ** k) for k in range(self.attempts - 1)]


_MISSING_CODES = {'NoSuchKey', 'NoSuchBucket', 'NotFound', '404', 404}
_DENIED_CODES = {'AccessDenied', 'Forbidden', 'InvalidAccessKeyId', 'SignatureDoesNotMatch',
                 'AllAccessDisabled', '401', '403', 401, 403}


def classify(e: BaseException) -> str:
  """The REASONS entry of an exception raised by fsspec / s3fs / gcsfs / botocore / aiohttp,
  from its type or its error / HTTP status code (following the `__cause__` chain); anything
  else (connection errors, timeouts, 5xx, cut transfers) is `remote_unavailable`."""
  seen = 0
  while e is not None and seen < 8:
    if isinstance(e, StorageError):
      return e.reason
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
      return 'missing_object'
    if isinstance(e, PermissionError):
      return 'access_denied'
    codes = {getattr(e, 'code', None), getattr(e, 'status', None)}
    response = getattr(e, 'response', None)
    if isinstance(response, dict):  # botocore ClientError
      codes.add(response.get('Error', {}).get('Code'))
      codes.add(response.get('ResponseMetadata', {}).get('HTTPStatusCode'))
    if codes & _MISSING_CODES:
      return 'missing_object'
    if codes & _DENIED_CODES:
      return 'access_denied'
    e, seen = e.__cause__ or e.__context__, seen + 1
  return 'remote_unavailable'


def call(fn: Callable[[], T], url: str, what: str, policy: RetryPolicy | None = None) -> T:
  """`fn()` with retries of transient failures; StorageError when it fails for good."""
  policy = policy or RetryPolicy.from_env()
  delays = policy.delays()
  for k in range(policy.attempts):
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - classified, retried or re-raised as StorageError
      reason = classify(e)
      if reason != 'remote_unavailable' or k == policy.attempts - 1:
        if reason == 'remote_unavailable':
          detail = f'{what} failed {policy.attempts} times ({type(e).__name__}: {e})'
        else:
          detail = f'{what}: {type(e).__name__}: {e}'
        raise StorageError(reason, url, detail) from e
      log.warning('storage: %s %s failed (%s: %s); retry %d/%d in %.1f s', what, url,
                  type(e).__name__, e, k + 1, policy.attempts - 1, delays[k])
      time.sleep(delays[k])
  raise AssertionError('unreachable')
