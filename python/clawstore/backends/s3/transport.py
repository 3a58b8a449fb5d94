"""The S3 client, error classification and the one retry policy every request goes through.

`RetryPolicy.run` is the only retry loop: exponential backoff with jitter (base x 2^(n-1),
capped, times a random factor in [0.5, 1.5)) on 500/502/503/504, SlowDown and throttling,
resets and timeouts. Callers that must interpret an error themselves (a failed precondition on
a retried conditional write, a lost Complete response, a damaged part) do it inside the attempt
function, which receives the attempt number.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from clawstore.errors import ClawstoreError, PermissionDeniedError

from . import signing
from .options import S3Options

_T = TypeVar("_T")


class S3Error(ClawstoreError):
    """An S3 request failed for good (after retries, or with a non-retryable error)."""


class S3ConfigurationError(S3Error):
    """The bucket or server cannot give the guarantees the store needs (e.g. conditional writes)."""


class StoredCorrupted(S3Error):
    """A completed object's server-computed checksum differs from what was sent (it was removed)."""


class PartCorrupted(Exception):
    """The server's ETag for a part is not the MD5 of the bytes we sent: send it again."""


class ShortBody(S3Error):
    """A GET body ended before the bytes it promised: fetch the rest again."""


# ------------------------------------------------------------------------------------------------
# error classification


def status(err: BaseException) -> int | None:
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def code(err: BaseException) -> str:
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


_RETRY_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "BadDigest",  # the bytes were damaged on the way: re-send them
        "XAmzContentSHA256Mismatch",  # (the same, for a signed payload)
        "OperationAborted",
    }
)


def retryable(err: BaseException) -> bool:
    """A transient failure: another attempt of the same request may succeed."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    if isinstance(err, PartCorrupted | ShortBody):
        return True
    if isinstance(err, ClientError):
        st = status(err)
        return (st is not None and st >= 500) or code(err) in _RETRY_CODES
    if isinstance(err, BotoConnectionError | HTTPClientError | IncompleteReadError | ResponseStreamingError):
        return True
    import urllib3.exceptions

    return isinstance(err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def is_error(err: BaseException, *codes: str, status_code: int | None = None) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    return code(err) in codes or (status_code is not None and status(err) == status_code)


def not_found(err: BaseException) -> bool:
    """The key is absent (not the bucket, not an upload)."""
    return is_error(err, "NoSuchKey", "404", "NotFound")


def precondition_failed(err: BaseException) -> bool:
    # 409 ConditionalRequestConflict: a concurrent conditional write to the same key won.
    return (
        is_error(err, "PreconditionFailed", "ConditionalRequestConflict", status_code=412)
        or status(err) == 409
    )


def not_implemented(err: BaseException) -> bool:
    return is_error(err, "NotImplemented", status_code=501)


def quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def bare(etag: str) -> str:
    return etag.strip('"').lower()


# ------------------------------------------------------------------------------------------------
# the retry policy


class RetryPolicy:
    """Attempts per request, and the backoff between them."""

    def __init__(self, max_attempts: int, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.max_attempts = max_attempts
        self.base = base
        self.cap = cap
        self._rng = rng or random.Random()

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 1): full exponential
        backoff, capped, with +-50% jitter so that many clients do not retry in step."""
        return min(self.cap, self.base * (2 ** (attempt - 1))) * (0.5 + self._rng.random())

    def sleep(self, attempt: int) -> None:
        time.sleep(self.delay(attempt))

    def run(
        self,
        what: str,
        fn: Callable[[int], _T],
        *,
        retry_on: Callable[[BaseException], bool] = retryable,
        bucket: str = "",
    ) -> _T:
        """`fn(attempt)` until it returns, retrying what `retry_on` accepts; a final failure is
        raised as a clear clawstore error where one applies (else as is)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(attempt)
            except Exception as e:
                if retry_on(e) and attempt < self.max_attempts:
                    self.sleep(attempt)
                    continue
                final = final_error(what, e, attempt, bucket, retry_on(e))
                if final is e:
                    raise
                raise final from e


def final_error(what: str, e: Exception, attempt: int, bucket: str, transient: bool) -> Exception:
    """`e` as a clear clawstore error where one applies, else `e` itself."""
    from botocore.exceptions import ClientError

    if isinstance(e, ClientError) and code(e) in ("AccessDenied", "403", "Forbidden"):
        return PermissionDeniedError(f"S3 {what}: access denied ({e})")
    if isinstance(e, ClientError) and code(e) == "NoSuchBucket":
        return S3ConfigurationError(f"S3 {what}: bucket {bucket!r} does not exist")
    if transient and not isinstance(e, ClawstoreError):
        return S3Error(f"S3 {what} failed after {attempt} attempts: {e}")
    return e


# ------------------------------------------------------------------------------------------------
# the client


def make_client(o: S3Options) -> Any:
    import boto3
    from botocore.config import Config

    s3cfg: dict[str, Any] = {}
    if o.addressing_style:
        s3cfg["addressing_style"] = o.addressing_style
    elif o.endpoint_url:
        s3cfg["addressing_style"] = "path"  # MinIO/RGW/moto: no wildcard DNS needed
    if o.payload_signing is not None:
        s3cfg["payload_signing_enabled"] = o.payload_signing
    config = Config(
        region_name=o.region,
        retries={"total_max_attempts": 1},  # we retry ourselves, per request (RetryPolicy)
        max_pool_connections=max(o.concurrency, o.download_concurrency) + 4,
        connect_timeout=o.connect_timeout,
        read_timeout=o.read_timeout,
        # We send Content-MD5 / x-amz-checksum-* ourselves; no CRC32 trailers (aws-chunked) on top.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3=s3cfg,
    )
    session = boto3.session.Session(profile_name=o.profile) if o.profile else boto3.session.Session()
    return session.client("s3", endpoint_url=o.endpoint_url, config=config)


class Transport:
    """A bucket, its client and the retry policy: every request of the backend goes through
    `call` (or `retry.run` for requests whose outcome needs interpreting)."""

    def __init__(self, bucket: str, options: S3Options, client: Any = None) -> None:
        self.bucket = bucket
        self.options = options
        self.client = client if client is not None else make_client(options)
        signing.install(self.client)
        self.retry = RetryPolicy(options.max_attempts, options.retry_base, options.retry_cap)

    def run(self, what: str, fn: Callable[[int], _T], **kw: Any) -> _T:
        return self.retry.run(what, fn, bucket=self.bucket, **kw)

    def call(self, op: str, **kw: Any) -> Any:
        """One retried S3 call on this bucket; non-retryable ClientErrors propagate for the
        caller to interpret."""
        method = getattr(self.client, op)
        return self.run(f"{op} {kw.get('Key', '')}", lambda _: method(Bucket=self.bucket, **kw))

    def head(self, key: str, **kw: Any) -> dict[str, Any] | None:
        try:
            return self.call("head_object", Key=key, **kw)
        except Exception as e:
            if not_found(e):
                return None
            raise

    def delete(self, key: str, **kw: Any) -> None:
        self.call("delete_object", Key=key, **kw)

    def conditional(self, what: str, fn: Callable[[], Any], done: Callable[[], bool]) -> bool:
        """A conditional write, retried. Returns False when the precondition failed.

        A retried write whose first attempt may have succeeded (response lost) sees its own
        effect as a failed precondition; `done()` tells those apart from a real conflict."""

        def attempt(n: int) -> bool:
            try:
                fn()
                return True
            except Exception as e:
                if precondition_failed(e) or (n > 1 and not_found(e)):
                    return n > 1 and done()
                if not_found(e):
                    return False
                raise

        return self.run(what, attempt)

    def iter_keys(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            resp = self.call("list_objects_v2", **kw)
            yield from resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def iter_multipart_uploads(self, prefix: str) -> Iterator[dict[str, Any]]:
        kw: dict[str, Any] = {"Prefix": prefix}
        while True:
            resp = self.call("list_multipart_uploads", **kw)
            yield from resp.get("Uploads", [])
            if not resp.get("IsTruncated"):
                return
            kw["KeyMarker"] = resp.get("NextKeyMarker")
            kw["UploadIdMarker"] = resp.get("NextUploadIdMarker")

    def close(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.client.close()
