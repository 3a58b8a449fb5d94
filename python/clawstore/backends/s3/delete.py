"""Batched deletes: `DeleteObjects` with up to 1,000 keys per request (or less where the server
takes less), several requests in flight, per-key errors retried; single DELETEs where the
server has no `DeleteObjects`.

No HEAD before deleting: a DELETE of an absent key succeeds on S3, and `DeleteObjects` reports
every key it was given as deleted whether it existed or not (an unversioned bucket keeps no
record of what is gone), so "removed" counts the keys the server acknowledged. GC only deletes
what its catalog chose, and reports those counts.

Per-key errors (`<Error>` entries of a 200 response: InternalError, SlowDown...) are retried
through the transport's one `RetryPolicy`, sharing the attempt budget and backoff with errors
of the whole request: each attempt re-sends only the keys still failing. A per-key error that
no retry can fix (AccessDenied) fails at once with the key named.

Fallbacks, decided once and kept: a server that answers `NotImplemented` / 405 to
`DeleteObjects` (found by the open-time probe, or at the first request) gets single DELETEs, as
many in flight as the backend's concurrency; one that refuses a request for its number of keys
(MalformedXML / InvalidRequest / InvalidArgument / 413 with more than one key) has the batch
halved until it takes it, and that smaller limit is kept.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .transport import S3Error, Transport, code, is_error, not_found, not_implemented, retryable, status

#: S3's limit of keys per DeleteObjects request.
MAX_DELETE_KEYS = 1000
#: Per-key error codes worth another attempt (besides what `retryable` accepts for requests).
_RETRY_KEY_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted", "Throttling"}
)
#: Per-key codes that mean the key is not there: nothing removed, nothing wrong.
_ABSENT_KEY_CODES = frozenset({"NoSuchKey", "NoSuchVersion"})
#: Refusals of a request for being too large (with more than one key in it).
_TOO_MANY_CODES = ("MalformedXML", "InvalidRequest", "InvalidArgument", "EntityTooLarge", "TooManyKeys")


class KeysNotDeleted(Exception):
    """Some keys of a DeleteObjects came back with a transient per-key error: try those again."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(
            f"{len(errors)} keys not deleted, e.g. {first.get('Key')}: {first.get('Code')} "
            f"{first.get('Message', '')}".rstrip()
        )


def _unsupported(err: BaseException) -> bool:
    return not_implemented(err) or is_error(err, "MethodNotAllowed", status_code=405)


def _retry_keys(err: BaseException) -> bool:
    # 501 is a 5xx but no retry will implement DeleteObjects: it falls back at once.
    return isinstance(err, KeysNotDeleted) or (retryable(err) and not _unsupported(err))


class BatchDeleter:
    """Deletes keys of one bucket in batches (see the module docstring)."""

    def __init__(
        self,
        transport: Transport,
        *,
        batch: int = MAX_DELETE_KEYS,
        concurrency: int = 8,
        supported: bool = True,
    ) -> None:
        self.transport = transport
        self.concurrency = max(1, concurrency)
        self._lock = threading.Lock()
        #: Keys per DeleteObjects request; 0: the server has none, single DELETEs.
        self._batch = min(max(0, batch), MAX_DELETE_KEYS) if supported else 0

    @property
    def batch(self) -> int:
        """Keys one request deletes (1 when single DELETEs are used)."""
        return self._batch or 1

    @property
    def batched(self) -> bool:
        return self._batch > 0

    def delete(self, keys: Sequence[str]) -> int:
        """Delete `keys`; returns how many the server acknowledged (absent keys included, as S3
        does not tell them apart). Raises S3Error (or PermissionDeniedError) naming a key when
        some could not be deleted after retries; what was deleted before stays deleted."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return 0
        if not self.batched:
            return self._delete_singly(keys)
        chunks = [keys[i : i + self.batch] for i in range(0, len(keys), self.batch)]
        if len(chunks) == 1:
            return self._delete_chunk(chunks[0])
        with ThreadPoolExecutor(min(self.concurrency, len(chunks)), thread_name_prefix="s3-delete") as ex:
            return sum(ex.map(self._delete_chunk, chunks))

    def _delete_chunk(self, keys: list[str]) -> int:
        while True:
            with self._lock:
                limit = self._batch
            if limit <= 0:
                return self._delete_singly(keys)
            if len(keys) > limit:
                return sum(self._delete_chunk(keys[i : i + limit]) for i in range(0, len(keys), limit))
            try:
                return self._delete_objects(keys)
            except Exception as e:
                if _unsupported(e):
                    self._lower(limit, 0)  # no DeleteObjects here: single DELETEs from now on
                    continue
                if len(keys) > 1 and (is_error(e, *_TOO_MANY_CODES) or status(e) == 413):
                    self._lower(limit, len(keys) // 2)  # the server takes fewer keys at once
                    continue
                raise

    def _lower(self, seen: int, to: int) -> None:
        with self._lock:
            if self._batch == seen or to < self._batch:
                self._batch = min(self._batch, to)

    def _delete_objects(self, keys: list[str]) -> int:
        """One DeleteObjects (Quiet: the response lists only errors), its failing keys re-sent
        through the retry policy."""
        t = self.transport
        pending = list(keys)
        acknowledged = 0

        def attempt(_n: int) -> int:
            nonlocal pending, acknowledged
            resp = t.client.delete_objects(
                Bucket=t.bucket,
                Delete={"Objects": [{"Key": k} for k in pending], "Quiet": True},
            )
            retry: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            absent = 0
            for err in resp.get("Errors", []) or []:
                c = str(err.get("Code", ""))
                if c in _ABSENT_KEY_CODES:
                    absent += 1
                elif c in _RETRY_KEY_CODES:
                    retry.append(err)
                else:
                    failed.append(err)
            acknowledged += len(pending) - len(retry) - len(failed) - absent
            if failed:
                first = failed[0]
                msg = (
                    f"S3 DeleteObjects: {len(failed)} keys not deleted, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message', '')}".rstrip()
                )
                if first.get("Code") in ("AccessDenied", "Forbidden"):
                    from clawstore.errors import PermissionDeniedError

                    raise PermissionDeniedError(msg)
                raise S3Error(msg)
            if retry:
                pending = [str(e.get("Key")) for e in retry]
                raise KeysNotDeleted(retry)
            return acknowledged

        t.run(f"DeleteObjects ({len(keys)} keys from {keys[0]})", attempt, retry_on=_retry_keys)
        return acknowledged

    def _delete_singly(self, keys: list[str]) -> int:
        """Servers without DeleteObjects: one DELETE per key (no HEAD first), `concurrency` in
        flight."""
        t = self.transport

        def one(key: str) -> int:
            try:
                t.delete(key)
            except Exception as e:
                if not_found(e):
                    return 0
                raise
            return 1

        if len(keys) == 1:
            return one(keys[0])
        with ThreadPoolExecutor(min(self.concurrency, len(keys)), thread_name_prefix="s3-delete") as ex:
            return sum(ex.map(one, keys))


def probe_delete_objects(t: Transport, key: str, fallback: Callable[[str], None]) -> bool:
    """Remove the probe's `key` with a DeleteObjects (the probe's own cleanup, so the answer
    costs no extra request): whether the server implements it. Where it does not, the key is
    removed with `fallback`."""
    try:
        t.client.delete_objects(Bucket=t.bucket, Delete={"Objects": [{"Key": key}], "Quiet": True})
        return True
    except Exception as e:
        with contextlib.suppress(Exception):
            fallback(key)
        # Refused outright (or for want of a header we cannot send): single DELETEs. Anything
        # else (a transient failure) proves nothing: assume S3's behaviour, and let the first
        # real request decide (BatchDeleter falls back on NotImplemented too).
        return not (_unsupported(e) or code(e) in ("InvalidRequest", "MalformedXML"))


__all__ = ["MAX_DELETE_KEYS", "BatchDeleter", "KeysNotDeleted", "probe_delete_objects"]
