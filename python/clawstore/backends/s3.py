"""S3-compatible data plane (AWS S3, Ceph RGW, MinIO, moto).

URL: ``s3://BUCKET/PREFIX?endpoint_url=http://HOST:PORT&region=REGION&part_size=8MiB&concurrency=8``.
Credentials come from the boto3 chain (environment, ``profile=`` / ``AWS_PROFILE``, config files,
instance metadata); secrets never go in the URL.

Keys (every key is built by `S3Layout`), under ``PREFIX/``:

    blobs/<alg>/<2 hex>/<hex>             blob bytes
    manifests/<alg>/<2 hex>/<hex>         manifest bytes
    refs/<repo>/_tags/<tag>               a tag: the manifest digest, one line
    uploads/<uuid>                        staging objects of streams whose digest is not known yet
    uploads/probe-<uuid>                  the conditional-write probe made at open time

Invariant: nothing appears at a digest key unless its bytes hash to that digest.

* Known digest (bytes and files are hashed first; or ``expected`` given): upload straight to the
  digest key. Parts come from the Rust stager (`clawstore._core.PartStager`), which hashes the
  whole object over exactly the bytes handed out; the upload is completed only if that digest is
  the one named by the key, otherwise it is aborted (nothing ever becomes visible).
* Unknown digest (a stream): multipart upload to ``uploads/<uuid>``, then a server-side copy to
  the digest key (CopyObject, or UploadPartCopy above 5 GiB) guarded by the staging ETag, then the
  staging object is deleted.
* Every part carries a checksum the server verifies. By default (``part_checksum=auto``) that is
  ``x-amz-checksum-crc32``, what current AWS SDKs send: nearly free to compute (PCLMULQDQ), declared
  at CreateMultipartUpload and repeated at Complete; S3, MinIO and recent RGW reject a part whose
  bytes differ, and the composite checksum of the completed object (CRC-32 of the part CRCs,
  ``-N``), which the server computes from the bytes it stored, is compared with ours as a second
  check. A probe at open time sends a part with a wrong CRC: only a server that refuses it gets
  CRC-32; one that accepts it (moto, older RGW) gets ``Content-MD5`` instead (S3, MinIO, RGW and
  s3s-fs check it, moto does not; either way the part ETags the server returns are compared with our MD5s when
  they are plain MD5s, as they are except under SSE-KMS/SSE-C; a mismatch re-sends the part
  before Complete, and the completed object's multipart ETag is checked the same way).
  ``part_checksum=md5|crc32|sha256`` forces a choice. Single PUTs
  (small blobs) always carry ``Content-MD5`` and have their ETag checked.

Tags use conditional writes: ``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace and
to delete. At open time a probe checks that the server honours them (a server that ignores them
would silently lose updates) and raises `S3ConfigurationError` if not.

Retries: each request (one part, one range, one tag write) is retried with exponential backoff
and jitter on 500/502/503/504, SlowDown, throttling, resets and timeouts, re-sending the bytes
it already holds; a failed part never re-reads the source from the start.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import http.client
import io
import mmap
import os
import queue
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar

from clawstore import _core
from clawstore.digest import ALGORITHMS, Digest, Hasher
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    ManifestNotFoundError,
    PermissionDeniedError,
    TagConflictError,
)
from clawstore.types import ANY, MISSING, BlobSource, CleanupReport, Expectation

MiB = 1 << 20
GiB = 1 << 30
#: S3 limits.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
MAX_SINGLE_COPY = 5 * GiB
TAGS_DIR = "_tags"

_T = TypeVar("_T")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
#: part_checksum values, and the S3 checksum algorithm each one declares (md5: Content-MD5).
PART_CHECKSUMS = ("auto", "crc32", "md5", "sha256")
_S3_CHECKSUM = {"crc32": "CRC32", "sha256": "SHA256"}
#: Error codes with which servers refuse a part whose checksum does not match its bytes.
_CHECKSUM_REFUSALS = frozenset(
    {"BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest", "InvalidChecksum"}
)


def _composite(mode: str, sums: list[str]) -> str:
    """S3's composite checksum of a multipart object (without the ``-N``): the checksum of the
    concatenated binary part checksums."""
    raw = b"".join(base64.b64decode(s) for s in sums)
    if mode == "crc32":
        return _core.crc32_base64(raw)
    return base64.b64encode(hashlib.sha256(raw).digest()).decode()


_MULTI_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")


class S3Error(ClawstoreError):
    """An S3 request failed for good (after retries, or with a non-retryable error)."""


class S3ConfigurationError(S3Error):
    """The bucket or server cannot give the guarantees the store needs (e.g. conditional writes)."""


# ------------------------------------------------------------------------------------------------
# options


def parse_size(value: int | str) -> int:
    """``33554432``, ``"32MiB"``, ``"32M"``, ``"1GiB"`` -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {value!r}")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(m.group(1)) * mult


def _parse_bool(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class S3Options:
    """Tunables; each can be given in the URL query or as a keyword to `clawstore.open`."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: Multipart part size (S3: >= 5 MiB; grown automatically to stay under 10,000 parts).
    #: 8 MiB like boto3 and the AWS CLI: the fastest choice measured against moto (whose cost per
    #: byte grows with the part size) and plenty for S3 (80 GB before parts must grow).
    part_size: int = 8 * MiB
    #: Parts (and ranged GETs) in flight per operation; memory is about concurrency x part_size.
    concurrency: int = 8
    #: Objects up to this size use a single PUT.
    multipart_threshold: int = 8 * MiB
    #: Part size for streams of unknown length (no growing it later): 32 MiB x 10,000 parts
    #: = 312 GiB at most; memory is about concurrency x this.
    stream_part_size: int = 32 * MiB
    #: Parallel ranged GETs when downloading to a path (1: one streamed GET).
    download_concurrency: int = 8
    #: Size of each ranged GET when downloading to a path.
    download_part_size: int = 32 * MiB
    #: Attempts per request (1 = no retry).
    max_attempts: int = 8
    retry_base: float = 0.1
    retry_cap: float = 10.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: Compare part/object ETags with our MD5s (turn off only for servers with non-MD5 ETags).
    verify_etags: bool = True
    #: Per-part checksum the server verifies: "crc32" (x-amz-checksum-crc32, the AWS SDKs' default;
    #: nearly free to compute; AWS S3, MinIO, recent RGW), "md5" (Content-MD5, checked by most
    #: servers, and the returned ETags are checked against it too; ~0.7 GiB/s of client CPU),
    #: "sha256" (x-amz-checksum-sha256) or "auto": crc32 if the open-time probe shows the server
    #: verifies it, else md5 (md5 too when probe is off).
    part_checksum: str = "auto"
    #: Probe conditional-write support at open time.
    probe: bool = True
    #: Sign request payloads with SHA-256 (an extra hash pass in Python per part). Off by default:
    #: every body we send carries a checksum header (Content-MD5 or x-amz-checksum-*) that is
    #: itself signed, and what the server stored is checked against it (by the server, or by us
    #: through the returned MD5 ETags), so a changed body fails either way (the rule botocore
    #: applies over https). None: botocore's default (signed over http).
    payload_signing: bool | None = False
    addressing_style: str | None = None

    @classmethod
    def build(cls, query: dict[str, str], options: dict[str, Any]) -> S3Options:
        known = {f.name: f for f in fields(cls)}
        merged: dict[str, Any] = {}
        for source in (query, options):
            for key, value in source.items():
                if key not in known:
                    raise ClawstoreError(f"unknown S3 option {key!r} (known: {', '.join(sorted(known))})")
                merged[key] = value
        out: dict[str, Any] = {}
        try:
            for key, value in merged.items():
                if value is None:
                    out[key] = None
                elif key in ("part_size", "multipart_threshold", "download_part_size", "stream_part_size"):
                    out[key] = parse_size(value)
                elif key in ("concurrency", "download_concurrency", "max_attempts"):
                    out[key] = int(value)
                elif key in ("retry_base", "retry_cap", "connect_timeout", "read_timeout"):
                    out[key] = float(value)
                elif key in ("verify_etags", "probe", "payload_signing"):
                    out[key] = _parse_bool(value)
                else:
                    out[key] = str(value)
        except ValueError as e:
            raise ClawstoreError(f"bad S3 option: {e}") from None
        opts = cls(**out)
        if opts.download_part_size < MiB:
            raise ClawstoreError("download_part_size must be at least 1 MiB")
        if opts.part_size < MIN_PART_SIZE or opts.stream_part_size < MIN_PART_SIZE:
            raise ClawstoreError(
                f"part_size and stream_part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)"
            )
        if opts.part_checksum not in PART_CHECKSUMS:
            raise ClawstoreError(
                f"part_checksum must be one of {', '.join(PART_CHECKSUMS)}, not {opts.part_checksum!r}"
            )
        if opts.concurrency < 1 or opts.download_concurrency < 1 or opts.max_attempts < 1:
            raise ClawstoreError("concurrency, download_concurrency and max_attempts must be >= 1")
        return opts


# ------------------------------------------------------------------------------------------------
# key layout


class S3Layout:
    """Every key of the store, built in one place from validated digests and names."""

    def __init__(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.blobs = f"{self.prefix}blobs/"
        self.manifests = f"{self.prefix}manifests/"
        self.refs = f"{self.prefix}refs/"
        self.uploads = f"{self.prefix}uploads/"

    @staticmethod
    def _fanout(base: str, digest: Digest) -> str:
        enc = digest.encoded
        return f"{base}{digest.algorithm}/{enc[:2]}/{enc}"

    def blob(self, digest: Digest) -> str:
        return self._fanout(self.blobs, digest)

    def manifest(self, digest: Digest) -> str:
        return self._fanout(self.manifests, digest)

    def tags_prefix(self, repo: str) -> str:
        return f"{self.refs}{repo}/{TAGS_DIR}/"

    def tag(self, repo: str, tag: str) -> str:
        return f"{self.tags_prefix(repo)}{tag}"

    def new_upload(self) -> str:
        return f"{self.uploads}{uuid.uuid4().hex}"

    def new_probe(self) -> str:
        return f"{self.uploads}probe-{uuid.uuid4().hex}"

    def parse_fanout(self, base: str, key: str) -> Digest | None:
        """The digest named by a blob/manifest key, or None for anything else."""
        if not key.startswith(base):
            return None
        parts = key[len(base) :].split("/")
        if len(parts) != 3 or parts[0] not in ALGORITHMS or parts[2][:2] != parts[1]:
            return None
        try:
            return Digest.from_hex(parts[0], parts[2])
        except ClawstoreError:
            return None

    def parse_repo(self, key: str) -> str | None:
        """The repository of a tag key ``refs/<repo>/_tags/<tag>``."""
        if not key.startswith(self.refs):
            return None
        rest = key[len(self.refs) :]
        repo, sep, tag = rest.rpartition(f"/{TAGS_DIR}/")
        if not sep or not repo or not tag or "/" in tag:
            return None
        return repo


# ------------------------------------------------------------------------------------------------
# errors and retries


def _status(err: Exception) -> int | None:
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _code(err: Exception) -> str:
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


_RETRY_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "BadDigest",  # the bytes were damaged on the way: re-send them
    "OperationAborted",
}


def _retryable(err: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    if isinstance(err, _PartCorrupted):
        return True
    if isinstance(err, ClientError):
        status = _status(err)
        return (status is not None and status >= 500) or _code(err) in _RETRY_CODES
    if isinstance(err, BotoConnectionError | HTTPClientError | IncompleteReadError | ResponseStreamingError):
        return True
    import urllib3.exceptions

    return isinstance(err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


class _StoredCorrupted(S3Error):
    """A completed object's server-computed checksum differs from what was sent (it was removed)."""


class _PartCorrupted(Exception):
    """The server's ETag for a part is not the MD5 of the bytes we sent."""


def _is(err: BaseException, *codes: str, status: int | None = None) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    return _code(err) in codes or (status is not None and _status(err) == status)


def _not_found(err: BaseException) -> bool:
    """The key is absent (not the bucket, not an upload)."""
    return _is(err, "NoSuchKey", "404", "NotFound")


def _precondition_failed(err: BaseException) -> bool:
    # 409 ConditionalRequestConflict: a concurrent conditional write to the same key won.
    return _is(err, "PreconditionFailed", "ConditionalRequestConflict", status=412) or _status(err) == 409


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _bare(etag: str) -> str:
    return etag.strip('"').lower()


# ------------------------------------------------------------------------------------------------
# readers


#: Downloads at least this large are written with O_DIRECT where the filesystem allows it (as
#: the local backend stores large blobs): no copy into the page cache and no writeback later.
DIRECT_MIN = 8 * MiB
_DIRECT_ALIGN = 4096


def _set_direct(fd: int, on: bool) -> bool:
    """Switch O_DIRECT on or off for `fd`; False if the system refuses."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
    except OSError:
        return False
    return True


class _HashWriter:
    """Hashes and writes received buffers on two threads of their own while the caller receives
    the next one: receiving, hashing and writing overlap (each releases the GIL), so a verified
    download costs about the slowest of the three instead of their sum. At most `buffers`
    buffers of `size` bytes exist. With `direct`, buffers are page-aligned (anonymous maps) and
    whole ones are written with O_DIRECT; a short last buffer, or a filesystem that refuses
    (tmpfs: EINVAL), goes through the page cache."""

    _END: Any = None

    def __init__(
        self, fd: int, algorithm: str, buffers: int = 4, size: int = 4 * MiB, direct: bool = False
    ) -> None:
        self._fd = os.dup(fd)  # the writer's own: closed by it, never under another open file
        self._hasher = Hasher(algorithm)
        self._direct = direct and _set_direct(self._fd, True)
        self._free: queue.Queue[tuple[Any, threading.Event]] = queue.Queue()
        for _ in range(buffers):
            buf: Any = mmap.mmap(-1, size) if self._direct else bytearray(size)
            self._free.put((buf, threading.Event()))
        self._to_hash: queue.Queue[Any] = queue.Queue()
        self._to_write: queue.Queue[Any] = queue.Queue()
        self._current: tuple[Any, threading.Event] | None = None
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._hash_loop, name="clawstore-get-hash", daemon=True),
            threading.Thread(target=self._write_loop, name="clawstore-get-write", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self.hexdigest = ""

    def buffer(self) -> memoryview:
        """A free buffer to receive into (blocks while all are in flight)."""
        if self._error is not None:
            raise self._error
        self._current = self._free.get()
        return memoryview(self._current[0])

    def submit(self, n: int) -> None:
        """Hash and write the first `n` bytes of the buffer last handed out."""
        assert self._current is not None
        item = (self._current, n)
        self._current = None
        self._to_hash.put(item)
        self._to_write.put(item)

    def _hash_loop(self) -> None:
        while (item := self._to_hash.get()) is not self._END:
            (buf, hashed), n = item
            try:
                if self._error is None:
                    self._hasher.update(memoryview(buf)[:n])
            except BaseException as e:
                self._error = self._error or e
            hashed.set()

    def _write_loop(self) -> None:
        while (item := self._to_write.get()) is not self._END:
            (buf, hashed), n = item
            try:
                view = memoryview(buf)[:n]
                if self._direct and n % _DIRECT_ALIGN:
                    self._direct = not _set_direct(self._fd, False)  # the unaligned tail
                while self._error is None and view:
                    try:
                        view = view[os.write(self._fd, view) :]
                    except OSError as e:
                        if not (self._direct and e.errno == errno.EINVAL):
                            raise
                        self._direct = not _set_direct(self._fd, False)  # refused: buffered
                        if self._direct:
                            raise
                del view
            except BaseException as e:
                self._error = self._error or e
            hashed.wait()  # the hasher is done with this buffer too: it can be reused
            hashed.clear()
            self._free.put((buf, hashed))
        os.close(self._fd)

    def __enter__(self) -> _HashWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._to_hash.put(self._END)
        self._to_write.put(self._END)
        for t in self._threads:
            t.join()
        while not self._free.empty():
            buf, _ = self._free.get_nowait()
            if isinstance(buf, mmap.mmap):
                with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                    buf.close()
        if exc_type is not None:
            return  # the caller's exception explains the failure
        if self._error is not None:
            raise self._error
        self.hexdigest = self._hasher.hexdigest()


def _socket_body(body: Any) -> http.client.HTTPResponse | None:
    """The http.client response under a botocore StreamingBody (through urllib3), whose
    readinto() receives straight into the caller's buffer: urllib3's read() allocates and copies
    every chunk (~0.1 s of CPU per GiB). Bodies are read raw either way (botocore does not decode
    Content-Encoding) and the digest is checked over what arrives; None if the layout differs."""
    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else None


class _ResumingBody(io.RawIOBase):
    """A GET body that, when the connection breaks, resumes with a ranged GET from where it
    stopped (pinned to the same object version by ``If-Match``). The store verifies the digest."""

    def __init__(self, backend: S3Backend, key: str, body: Any, etag: str, size: int) -> None:
        super().__init__()
        self._backend = backend
        self._key = key
        self._etag = etag
        self._size = size
        self._pos = 0
        self._failures = 0
        self._set_body(body)

    def _set_body(self, body: Any) -> None:
        """Take a (new) GET body and choose how to receive from it, once per body: straight from
        the http.client response under it when reachable, else its own readinto, else read()."""
        self._body = body
        raw = _socket_body(body)
        self._readinto: Callable[[memoryview], int | None] | None = (
            raw.readinto if raw is not None else getattr(body, "readinto", None)
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                n = self._readinto(view) if self._readinto is not None else None
                if n is None:
                    chunk = self._body.read(len(view))
                    n = len(chunk)
                    view[:n] = chunk
            except Exception as e:
                if not _retryable(e) or self._failures + 1 >= self._backend.options.max_attempts:
                    raise S3Error(f"GET {self._key}: {e}") from e
                self._failures += 1
                self._backend._sleep(self._failures)
                self._reopen()
                continue
            if n == 0 and self._pos < self._size:
                # The server closed the body early without an error: resume as well.
                if self._failures + 1 >= self._backend.options.max_attempts:
                    raise S3Error(f"GET {self._key}: body ended at {self._pos} of {self._size} bytes")
                self._failures += 1
                self._reopen()
                continue
            self._pos += n
            return n

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        resp = self._backend._call(
            "get_object",
            Bucket=self._backend.bucket,
            Key=self._key,
            Range=f"bytes={self._pos}-",
            IfMatch=_quoted(self._etag),
        )
        self._set_body(resp["Body"])

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
            super().close()


class _Prepend(io.RawIOBase):
    """`head` bytes followed by the rest of `src` (a stream we already peeked into)."""

    def __init__(self, head: bytes, src: BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        readinto = getattr(self._src, "readinto", None)
        if readinto is not None:
            n = readinto(view)
            if n is None:
                raise BlockingIOError("non-blocking source not supported")
            return int(n)
        data = self._src.read(len(view))
        view[: len(data)] = data
        return len(data)


def _read_up_to(src: BinaryIO, limit: int) -> bytes:
    """Read until `limit` bytes or end of stream."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = src.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------------------------------------
# the backend


class S3Backend:
    """Content-addressed store in an S3 bucket under a prefix."""

    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None, client: Any = None):
        if not bucket:
            raise ClawstoreError("S3 URL needs a bucket: s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.options = options or S3Options()
        self.layout = S3Layout(prefix)
        query = []
        if self.options.endpoint_url:
            query.append(f"endpoint_url={self.options.endpoint_url}")
        if self.options.region:
            query.append(f"region={self.options.region}")
        self.url = f"s3://{bucket}/{self.layout.prefix}" + (f"?{'&'.join(query)}" if query else "")
        self.client = client if client is not None else self._make_client()
        self.conditional_delete = True
        self._rand = random.Random()
        #: The per-part checksum in use ("auto" resolved by the probe; md5 without a probe).
        self.part_checksum = "md5" if self.options.part_checksum == "auto" else self.options.part_checksum
        #: md5 mode on a server that takes (but does not verify) declared S3 checksums: declare
        #: CRC32 too and send it with each part. Costs ~0.1 s per GiB; spares servers that build a
        #: full-object checksum of their own when none is declared (moto: CRC64NVME over a copy
        #: of the whole object, half of its time).
        self.md5_with_crc32 = False
        if self.options.probe:
            self.probe_conditional_writes()
            if self.options.part_checksum == "auto":
                self.part_checksum = self.probe_part_checksums()

    @classmethod
    def from_url(cls, bucket: str, prefix: str, query: dict[str, str], **options: Any) -> S3Backend:
        return cls(bucket, prefix, S3Options.build(query, options))

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        o = self.options
        s3cfg: dict[str, Any] = {}
        if o.addressing_style:
            s3cfg["addressing_style"] = o.addressing_style
        elif o.endpoint_url:
            s3cfg["addressing_style"] = "path"  # MinIO/RGW/moto: no wildcard DNS needed
        if o.payload_signing is not None:
            s3cfg["payload_signing_enabled"] = o.payload_signing
        config = Config(
            region_name=o.region,
            retries={"total_max_attempts": 1},  # we retry ourselves, per part, with our backoff
            max_pool_connections=max(o.concurrency, o.download_concurrency) + 4,
            connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout,
            # We send Content-MD5 ourselves; no CRC32 trailers (aws-chunked) on top.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3=s3cfg,
        )
        session = boto3.session.Session(profile_name=o.profile) if o.profile else boto3.session.Session()
        return session.client("s3", endpoint_url=o.endpoint_url, config=config)

    # -- request plumbing ----------------------------------------------------------------------
    def _sleep(self, attempt: int) -> None:
        o = self.options
        time.sleep(min(o.retry_cap, o.retry_base * (2 ** (attempt - 1))) * (0.5 + self._rand.random()))

    def _retry(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run `fn` with retries on transient errors; raise a clear error when it gives up."""

        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as e:
                if _retryable(e) and attempt < self.options.max_attempts:
                    self._sleep(attempt)
                    continue
                self._raise_final(what, e, attempt)

    def _raise_final(self, what: str, e: Exception, attempt: int) -> NoReturn:
        """Re-raise `e` as a clear clawstore error where one applies (else as is)."""
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError) and _code(e) in ("AccessDenied", "403", "Forbidden"):
            raise PermissionDeniedError(f"S3 {what}: access denied ({e})") from e
        if isinstance(e, ClientError) and _code(e) == "NoSuchBucket":
            raise S3ConfigurationError(f"S3 {what}: bucket {self.bucket!r} does not exist") from e
        if _retryable(e):
            raise S3Error(f"S3 {what} failed after {attempt} attempts: {e}") from e
        raise e

    def _call(self, op: str, **kw: Any) -> Any:
        """One retried S3 call; non-retryable ClientErrors propagate for the caller to interpret."""
        return self._retry(f"{op} {kw.get('Key', '')}", lambda: getattr(self.client, op)(**kw))

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._call("head_object", Bucket=self.bucket, Key=key)
        except Exception as e:
            if _not_found(e):
                return None
            raise

    # -- probe ---------------------------------------------------------------------------------
    def probe_conditional_writes(self) -> None:
        """Check that the server honours If-None-Match / If-Match on PUT (and on DELETE).

        Raises S3ConfigurationError if PUT preconditions are ignored: tag compare-and-swap would
        then silently lose updates. Conditional DELETE is optional: without it `untag` with an
        expectation checks and deletes in two steps (see README)."""
        key = self.layout.new_probe()
        body = b"clawstore conditional-write probe\n"
        try:
            try:
                # A fresh random key: a failed precondition on a *retried* attempt is our own
                # first attempt having landed with its response lost.
                if not self._conditional(
                    f"PUT {key}",
                    lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*"),
                    lambda: True,
                ):
                    raise S3ConfigurationError(f"probe key {key} unexpectedly exists")
            except Exception as e:
                if _is(e, "NotImplemented", status=501):
                    raise S3ConfigurationError(
                        f"s3://{self.bucket}: the server does not implement conditional writes "
                        "(If-None-Match); tag compare-and-swap needs them"
                    ) from e
                raise
            for what, kw in (
                ("If-None-Match: * on an existing object", {"IfNoneMatch": "*"}),
                ("If-Match with a stale ETag", {"IfMatch": '"00000000000000000000000000000000"'}),
            ):
                try:
                    self._call("put_object", Bucket=self.bucket, Key=key, Body=b"overwritten\n", **kw)
                except Exception as e:
                    if _precondition_failed(e):
                        continue
                    if _is(e, "NotImplemented", status=501):
                        raise S3ConfigurationError(
                            f"s3://{self.bucket}: the server does not implement {what}"
                        ) from e
                    raise
                raise S3ConfigurationError(
                    f"s3://{self.bucket}: the server ignored a conditional write ({what}); "
                    "tag compare-and-swap would silently lose updates. Use a server with "
                    "conditional writes (AWS S3, MinIO >= 2024, Ceph RGW >= Reef) or pass probe=false "
                    "only if no two writers ever update the same tag."
                )
            try:
                self._call("delete_object", Bucket=self.bucket, Key=key, IfMatch=_quoted("0" * 32))
                self.conditional_delete = False  # the precondition was ignored: object is gone
            except Exception as e:
                if _precondition_failed(e):
                    self.conditional_delete = True
                elif _is(e, "NotImplemented", status=501):
                    self.conditional_delete = False
                else:
                    raise
        finally:
            with contextlib.suppress(Exception):
                self._call("delete_object", Bucket=self.bucket, Key=key)

    def probe_part_checksums(self) -> str:
        """Which per-part checksum to send: "crc32" only if the server refuses a part whose
        x-amz-checksum-crc32 is wrong and takes the same part with the right one (S3, MinIO,
        RGW >= Squid), so that no damaged part can ever be completed; else "md5" (Content-MD5,
        which most servers check, plus our ETag comparisons, which also cover moto). A server that
        accepts the wrong CRC (moto) gets md5: a check only after Complete would leave damaged
        bytes at a digest key for a moment (or for good, after a crash)."""
        from botocore.exceptions import ClientError

        key = self.layout.new_probe()
        body = b"clawstore part-checksum probe\n" * 8
        true, wrong = _core.crc32_base64(body), _core.crc32_base64(body + b"!")
        try:
            mpu = self._call(
                "create_multipart_upload", Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32"
            )
        except ClientError:
            return "md5"
        common = {"Bucket": self.bucket, "Key": key, "UploadId": mpu["UploadId"]}

        def refused() -> bool:
            # A refusal (BadDigest) is the answer here, not a fault for _retry to retry.
            try:
                self.client.upload_part(PartNumber=1, Body=body, ChecksumCRC32=wrong, **common)
            except ClientError as e:
                if _code(e) in _CHECKSUM_REFUSALS:
                    return True
                raise
            return False

        try:
            try:
                if not self._retry(f"UploadPart {key} (checksum probe)", refused):
                    # A wrong checksum was accepted: parts are not verified by it. The server does
                    # take declared checksums, though: send them along with Content-MD5.
                    self.md5_with_crc32 = True
                    return "md5"
            except ClientError:
                return "md5"
            try:
                self._call("upload_part", PartNumber=1, Body=body, ChecksumCRC32=true, **common)
            except ClientError:
                return "md5"
            return "crc32"
        finally:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(**common)

    # -- blobs: writes -------------------------------------------------------------------------
    def _part_size_for(self, size: int | None) -> int:
        ps = self.options.part_size
        if size is not None and size > ps * MAX_PARTS:
            ps = -(-size // MAX_PARTS)
            ps = -(-ps // MiB) * MiB
        return ps

    def write_blob(self, src: BlobSource, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        if isinstance(src, bytes | bytearray | memoryview):
            return self._write_buffer(memoryview(src).cast("B"), algorithm, expected)
        if isinstance(src, str | os.PathLike):
            return self._write_path(os.fspath(src), algorithm, expected)
        return self._write_stream(src, algorithm, expected)

    @staticmethod
    def _check(digest: Digest, expected: Digest | None) -> None:
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"content hashes to {digest}, expected {expected}")

    def _write_buffer(self, data: memoryview, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        digest = Digest.from_hex(algorithm, _core.digest_bytes(data, algorithm))
        self._check(digest, expected)
        key = self.layout.blob(digest)
        if self._head(key) is None:
            if len(data) <= self.options.multipart_threshold:
                self._put_small(key, data)
            else:
                self._upload_known(
                    key, lambda: self._stager(data, self._part_size_for(len(data)), algorithm), digest
                )
        return digest, len(data)

    def _upload_known(self, key: str, make_stager: Callable[[], Any], digest: Digest) -> tuple[Digest, int]:
        """Multipart upload of a re-readable source (file, buffer) to its digest key. If the
        server turns out to have stored other bytes than were sent (a server that checks part
        checksums only at Complete), the object was removed: send it again, up to max_attempts."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._multipart(key, make_stager(), digest)
            except _StoredCorrupted:
                if attempt >= self.options.max_attempts:
                    raise
                self._sleep(attempt)

    def _put_small(self, key: str, data: bytes | memoryview, **kw: Any) -> dict[str, Any]:
        """Single PUT with Content-MD5. If the server stored other bytes than we sent (its ETag is
        not our MD5: a server that does not check Content-MD5, e.g. moto), remove them (guarded
        by that ETag) and send again."""
        body = bytes(data)  # botocore wants bytes (it may sign and re-send them on retry)
        md5 = _core.content_md5(body)
        md5_hex = base64.b64decode(md5).hex()

        def once() -> dict[str, Any]:
            resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5, **kw)
            bare = _bare(str(resp.get("ETag", "")))
            if self.options.verify_etags and _HEX32.match(bare) and bare != md5_hex:
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=_quoted(bare))
                raise _PartCorrupted(f"PUT {key}: server stored MD5 {bare}, we sent {md5_hex}")
            return resp

        return self._retry(f"PUT {key}", once)

    def _write_path(self, path: str, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        size = os.stat(path).st_size
        if expected is not None:
            head = self._head(self.layout.blob(expected))
            if head is not None and head["ContentLength"] == size:
                return expected, size  # already stored under the digest the caller vouches for
        if size <= self.options.multipart_threshold:
            with open(path, "rb") as f:
                data = f.read(size + 1)
            if len(data) != size:
                raise S3Error(f"{path} changed size while being read")
            return self._write_buffer(memoryview(data), algorithm, expected)
        if expected is None:
            # Hash first (Rust, GIL released, page cache): an existing blob is then not uploaded
            # at all, and a new one goes straight to its digest key (no staging copy).
            hexd, _ = _core.digest_file(path, algorithm)
            digest = Digest.from_hex(algorithm, hexd)
            if self._head(self.layout.blob(digest)) is not None:
                return digest, size
        else:
            digest = expected
        part_size = self._part_size_for(size)
        return self._upload_known(
            self.layout.blob(digest), lambda: self._stager(path, part_size, algorithm), digest
        )

    def _write_stream(self, src: BinaryIO, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        head = _read_up_to(src, self.options.multipart_threshold + 1)
        if len(head) <= self.options.multipart_threshold:
            return self._write_buffer(memoryview(head), algorithm, expected)
        # Size unknown: stream_part_size, so that 10,000 parts reach far enough.
        stager = self._stager(_Prepend(head, src), self.options.stream_part_size, algorithm)
        del head
        if expected is not None:
            if self._head(self.layout.blob(expected)) is not None:
                # Stored already; still consume and verify the stream so a wrong `expected` is
                # reported rather than silently accepted.
                digest, size = self._drain(stager)
                self._check(digest, expected)
                return digest, size
            return self._multipart(self.layout.blob(expected), stager, expected)
        staging = self.layout.new_upload()
        digest, size = self._multipart(staging, stager, None)
        try:
            final = self.layout.blob(digest)
            if self._head(final) is None:
                self._copy(staging, final, size)
        finally:
            with contextlib.suppress(Exception):
                self._call("delete_object", Bucket=self.bucket, Key=staging)
        return digest, size

    def _stager(self, source: Any, part_size: int, algorithm: str) -> Any:
        return _core.PartStager(source, part_size, algorithm, self.part_checksum)

    @staticmethod
    def _drain(stager: Any) -> tuple[Digest, int]:
        while stager.next_part() is not None:
            pass
        hexd, size, _ = stager.finish()
        return Digest.from_hex(stager.algorithm, hexd), size

    def _multipart(self, key: str, stager: Any, expected: Digest | None) -> tuple[Digest, int]:
        """Upload the stager's parts to `key` from `concurrency` threads; complete only if the
        whole digest equals `expected` (when given). Aborts the upload on any failure."""
        mode = stager.checksum
        s3alg = _S3_CHECKSUM.get(mode)
        # The S3 checksum declared at Create and repeated at Complete: the part checksum itself,
        # or (md5 on a server that takes declared checksums) a CRC-32 sent beside Content-MD5.
        declared = s3alg or ("CRC32" if mode == "md5" and self.md5_with_crc32 else None)
        extra = {"ChecksumAlgorithm": declared} if declared else {}
        mpu = self._call("create_multipart_upload", Bucket=self.bucket, Key=key, **extra)
        upload_id = mpu["UploadId"]
        etags: dict[int, str] = {}
        sums: dict[int, str] = {}
        crcs: dict[int, str] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker() -> None:
            try:
                while True:
                    part = stager.next_part()
                    if part is None:
                        return
                    number, data, checksum = part
                    crc = _core.crc32_base64(data) if declared and not s3alg else None
                    etag = self._upload_part(key, upload_id, number, data, checksum, mode, crc)
                    del data, part
                    with lock:
                        etags[number] = etag
                        sums[number] = checksum
                        if crc is not None:
                            crcs[number] = crc
            except BaseException as e:
                stager.abort(f"{type(e).__name__}: {e}")
                with lock:
                    errors.append(e)

        try:
            threads = [
                threading.Thread(target=worker, name=f"clawstore-s3-part-{i}", daemon=True)
                for i in range(self.options.concurrency)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                # The first real error, not the "failed in another worker" echoes of it.
                primary = next((e for e in errors if not isinstance(e, RuntimeError)), errors[0])
                raise primary
            hexd, size, nparts = stager.finish()
            digest = Digest.from_hex(stager.algorithm, hexd)
            if expected is not None and digest != expected:
                raise DigestMismatchError(f"content hashes to {digest}, expected {expected}")
            if len(etags) != nparts:
                raise S3Error(f"upload of {key}: {len(etags)} parts uploaded, {nparts} staged")
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            if declared:
                listed = sums if s3alg else crcs
                for p in parts:
                    p[f"Checksum{declared}"] = listed[p["PartNumber"]]
            resp = self._complete(key, upload_id, parts, size)
            in_order = [sums[n] for n in sorted(sums)]
            if s3alg:
                self._check_composite(key, resp, mode, in_order)
            else:
                self._check_multipart_etag(key, resp.get("ETag", ""), [base64.b64decode(m) for m in in_order])
            return digest, size
        except BaseException as e:
            stager.abort(f"upload of {key} failed: {type(e).__name__}")  # stop workers still running
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _upload_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        data: bytes,
        checksum: str,
        mode: str = "md5",
        crc32: str | None = None,
    ) -> str:
        md5_hex = base64.b64decode(checksum).hex() if mode == "md5" else ""
        kw = {"ContentMD5": checksum} if mode == "md5" else {f"Checksum{_S3_CHECKSUM[mode]}": checksum}
        if crc32 is not None:
            kw["ChecksumCRC32"] = crc32

        def once() -> str:
            resp = self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, **kw
            )
            etag = str(resp["ETag"])
            bare = _bare(etag)
            if md5_hex and self.options.verify_etags and _HEX32.match(bare) and bare != md5_hex:
                raise _PartCorrupted(f"part {number} of {key}: server has MD5 {bare}, we sent {md5_hex}")
            return etag

        return self._retry(f"UploadPart {key} #{number}", once)

    def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]], size: int) -> dict[str, Any]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            except Exception as e:
                if attempt > 1 and _is(e, "NoSuchUpload", status=404):
                    # An earlier attempt completed but its response was lost.
                    head = self._head(key)
                    if head is not None and head["ContentLength"] == size:
                        return {"ETag": head.get("ETag", "")}
                if _retryable(e) and attempt < self.options.max_attempts:
                    self._sleep(attempt)
                    continue
                if _retryable(e):
                    raise S3Error(f"Complete {key}: failed after {attempt} attempts: {e}") from e
                raise

    def _stored_checksum(self, key: str, resp: dict[str, Any], s3alg: str) -> str | None:
        """The composite checksum the server reports for a just-completed object: from the
        Complete response, else from a HEAD with checksum mode on (pinned to the completed
        ETag). None when it reports none; "" when there is nothing to compare with: the server
        keeps a full-object checksum instead, or a concurrent writer of the same digest key
        completed after us (its own upload was verified)."""
        if resp.get("ChecksumType") == "FULL_OBJECT":
            return ""
        got = resp.get(f"Checksum{s3alg}")
        if got:
            return str(got)
        kw: dict[str, Any] = {"IfMatch": resp["ETag"]} if resp.get("ETag") else {}
        try:
            head = self._call("head_object", Bucket=self.bucket, Key=key, ChecksumMode="ENABLED", **kw)
        except Exception as e:
            if _precondition_failed(e):
                return ""
            raise
        if head.get("ChecksumType") == "FULL_OBJECT":
            return ""
        got = head.get(f"Checksum{s3alg}")
        return str(got) if got else None

    def _check_composite(self, key: str, resp: dict[str, Any], mode: str, sums: list[str]) -> None:
        """Compare the composite checksum the server computed over the bytes it stored with the
        one of the parts we sent: defence in depth (a server we send checksums to refuses a bad
        part before Complete). A mismatch removes the object; a server that reports no checksum
        at all does not support them, and part_checksum=md5 is what it needs."""
        got = self._stored_checksum(key, resp, _S3_CHECKSUM[mode])
        if got == "":
            return
        want = _composite(mode, sums)
        if got is not None:
            value, _, count = got.partition("-")
            if value == want and (not count or int(count) == len(sums)):
                return
        with contextlib.suppress(Exception):
            guard = {"IfMatch": resp["ETag"]} if resp.get("ETag") and self.conditional_delete else {}
            self._call("delete_object", Bucket=self.bucket, Key=key, **guard)
        if got is None:
            raise S3Error(
                f"{key}: the server reports no {mode} checksum for the completed upload: it does not "
                f"support S3 checksums, so the parts were not verified (removed); use part_checksum=md5"
            )
        raise _StoredCorrupted(
            f"{key}: the server stored other bytes than were sent (composite {mode} {got}, "
            f"sent {want}-{len(sums)}); removed"
        )

    def _check_multipart_etag(self, key: str, etag: str, md5s: list[bytes]) -> None:
        m = _MULTI_ETAG.match(_bare(etag))
        if not self.options.verify_etags or not m:
            return
        want = hashlib.md5(b"".join(md5s)).hexdigest()
        if m.group(1) != want or int(m.group(2)) != len(md5s):
            # The assembled object is not what we uploaded: remove it (it sits at a digest key).
            with contextlib.suppress(Exception):
                self._call("delete_object", Bucket=self.bucket, Key=key, IfMatch=_quoted(etag))
            raise S3Error(f"{key}: completed ETag {_bare(etag)} is not {want}-{len(md5s)}; removed")

    def _copy(self, src: str, dst: str, size: int) -> None:
        """Server-side copy of a verified staging object to its digest key, pinned to the staged
        version by ETag. UploadPartCopy above the single-copy limit."""
        head = self._head(src)
        if head is None or head["ContentLength"] != size:
            raise S3Error(f"staging object {src} vanished or changed before copy")
        etag = head["ETag"]
        source = {"Bucket": self.bucket, "Key": src}
        if size <= self.max_single_copy:
            self._call("copy_object", Bucket=self.bucket, Key=dst, CopySource=source, CopySourceIfMatch=etag)
            return
        ps = max(self._part_size_for(size), MIN_PART_SIZE)
        mpu = self._call("create_multipart_upload", Bucket=self.bucket, Key=dst)
        upload_id = mpu["UploadId"]
        try:
            parts = []
            for i, start in enumerate(range(0, size, ps), start=1):
                end = min(size, start + ps) - 1
                r = self._call(
                    "upload_part_copy",
                    Bucket=self.bucket,
                    Key=dst,
                    UploadId=upload_id,
                    PartNumber=i,
                    CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}",
                    CopySourceIfMatch=etag,
                )
                parts.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
            self._complete(dst, upload_id, parts, size)
        except BaseException:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=dst, UploadId=upload_id)
            raise

    #: Objects above this size are copied with UploadPartCopy (S3's CopyObject limit is 5 GiB).
    max_single_copy = MAX_SINGLE_COPY

    # -- blobs: reads --------------------------------------------------------------------------
    def open_blob(self, digest: Digest) -> tuple[BinaryIO, int]:
        key = self.layout.blob(digest)
        try:
            resp = self._call("get_object", Bucket=self.bucket, Key=key)
        except Exception as e:
            if _not_found(e):
                raise BlobNotFoundError(f"blob {digest} not found") from None
            raise
        size = int(resp["ContentLength"])
        body = _ResumingBody(self, key, resp["Body"], str(resp.get("ETag", "")), size)
        return io.BufferedReader(body, 1 << 20), size  # type: ignore[return-value]

    def download_to(self, digest: Digest, path: str | os.PathLike[str], *, fsync: bool = False) -> int:
        """Download a blob to `path` with parallel ranged GETs, hashing in order while the
        ranges arrive; `path` appears (atomic rename) only if the whole content verifies.
        Like `cp` and boto3 `download_file` the data is not fsynced unless `fsync` is set.
        Returns the size. DigestMismatchError / BlobNotFoundError."""
        key = self.layout.blob(digest)
        head = self._head(key)
        if head is None:
            raise BlobNotFoundError(f"blob {digest} not found")
        size = int(head["ContentLength"])
        etag = str(head["ETag"])
        dest = Path(path)
        tmp = dest.with_name(f".{dest.name}.clawstore-{os.getpid()}-{secrets.token_hex(4)}")
        chunk = max(self.options.download_part_size, -(-size // MAX_PARTS))
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if self.options.download_concurrency <= 1 or size <= chunk:
                    actual = self._download_single(key, etag, size, fd, digest.algorithm)
                else:
                    os.ftruncate(fd, size)
                    actual = self._download_ranges(key, etag, size, chunk, fd, digest.algorithm)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if actual != digest:
                raise DigestMismatchError(f"content of {digest} hashes to {actual}")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return size

    def _download_single(self, key: str, etag: str, size: int, fd: int, algorithm: str) -> Digest:
        resp = self._call("get_object", Bucket=self.bucket, Key=key, IfMatch=_quoted(etag))
        body = _ResumingBody(self, key, resp["Body"], etag, size)
        total = 0
        with _HashWriter(fd, algorithm, direct=size >= DIRECT_MIN) as out:
            try:
                while total <= size:
                    view = out.buffer()
                    n = 0
                    while n < len(view):  # whole buffers: aligned O_DIRECT writes
                        k = body.readinto(view[n:])
                        if not k:
                            break
                        n += k
                    del view
                    if not n:
                        break
                    out.submit(n)
                    total += n
            finally:
                body.close()
        if total != size:
            raise DigestMismatchError(f"{key}: got {total} bytes, expected {size}")
        return Digest.from_hex(algorithm, out.hexdigest)

    def _download_ranges(self, key: str, etag: str, size: int, chunk: int, fd: int, algorithm: str) -> Digest:
        ranges = [(s, min(size, s + chunk)) for s in range(0, size, chunk)]
        next_idx = 0
        done = [False] * len(ranges)
        errors: list[BaseException] = []
        cond = threading.Condition()

        def fetch(start: int, end: int) -> None:
            pos = start
            failures = 0
            while pos < end:
                try:
                    resp = self._call(
                        "get_object",
                        Bucket=self.bucket,
                        Key=key,
                        Range=f"bytes={pos}-{end - 1}",
                        IfMatch=_quoted(etag),
                    )
                    body = resp["Body"]
                    try:
                        while pos < end:
                            data = body.read(min(4 * MiB, end - pos))
                            if not data:
                                break
                            os.pwrite(fd, data, pos)
                            pos += len(data)
                    finally:
                        body.close()
                    if pos < end:
                        raise S3Error(f"GET {key} range ended early at {pos}")
                except Exception as e:
                    failures += 1
                    if not (_retryable(e) or isinstance(e, S3Error)) or failures >= self.options.max_attempts:
                        raise
                    self._sleep(failures)

        def worker() -> None:
            nonlocal next_idx
            while True:
                with cond:
                    if errors or next_idx >= len(ranges):
                        return
                    i = next_idx
                    next_idx += 1
                try:
                    fetch(*ranges[i])
                except BaseException as e:
                    with cond:
                        errors.append(e)
                        cond.notify_all()
                    return
                with cond:
                    done[i] = True
                    cond.notify_all()

        threads = [
            threading.Thread(target=worker, name=f"clawstore-s3-get-{i}", daemon=True)
            for i in range(min(self.options.download_concurrency, len(ranges)))
        ]
        for t in threads:
            t.start()
        # Hash in order behind the downloaders, reading back from the page cache.
        hasher = Hasher(algorithm)
        try:
            for i, (start, end) in enumerate(ranges):
                with cond:
                    while not done[i] and not errors:
                        cond.wait()
                    if errors:
                        break
                pos = start
                while pos < end:
                    data = os.pread(fd, min(4 * MiB, end - pos), pos)
                    if not data:
                        raise S3Error(f"short read back of downloaded {key} at {pos}")
                    hasher.update(data)
                    pos += len(data)
        finally:
            with cond:
                if not all(done):
                    errors.append(S3Error("download interrupted"))  # stop the workers
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return Digest.from_hex(algorithm, hasher.hexdigest())

    def blob_size(self, digest: Digest) -> int | None:
        head = self._head(self.layout.blob(digest))
        return None if head is None else int(head["ContentLength"])

    def remove_blob(self, digest: Digest) -> bool:
        return self._remove(self.layout.blob(digest))

    def _remove(self, key: str) -> bool:
        if self._head(key) is None:
            return False
        self._call("delete_object", Bucket=self.bucket, Key=key)
        return True

    def _iter_keys(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            resp = self._call("list_objects_v2", **kw)
            yield from resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def iter_blobs(self) -> Iterator[Digest]:
        for obj in self._iter_keys(self.layout.blobs):
            d = self.layout.parse_fanout(self.layout.blobs, obj["Key"])
            if d is not None:
                yield d

    # -- manifests -----------------------------------------------------------------------------
    def write_manifest(self, digest: Digest, data: bytes) -> None:
        try:
            self._put_small(self.layout.manifest(digest), data, IfNoneMatch="*")
        except Exception as e:
            if not _precondition_failed(e):
                raise
            # Already there: same digest, same bytes.

    def read_manifest(self, digest: Digest) -> bytes:
        key = self.layout.manifest(digest)
        try:
            return self._retry(
                f"GET {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            )
        except Exception as e:
            if _not_found(e):
                raise ManifestNotFoundError(f"manifest {digest} not found") from None
            raise

    def manifest_size(self, digest: Digest) -> int | None:
        head = self._head(self.layout.manifest(digest))
        return None if head is None else int(head["ContentLength"])

    def remove_manifest(self, digest: Digest) -> bool:
        return self._remove(self.layout.manifest(digest))

    def iter_manifests(self) -> Iterator[Digest]:
        for obj in self._iter_keys(self.layout.manifests):
            d = self.layout.parse_fanout(self.layout.manifests, obj["Key"])
            if d is not None:
                yield d

    # -- tags ----------------------------------------------------------------------------------
    def _read_tag_versioned(self, repo: str, tag: str) -> tuple[Digest | None, str | None]:
        key = self.layout.tag(repo, tag)
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                resp = self._call("get_object", Bucket=self.bucket, Key=key)
                text = resp["Body"].read().decode().strip()
                return Digest.parse(text), str(resp["ETag"])
            except Exception as e:
                if _not_found(e):
                    return None, None
                if _retryable(e) and attempt < self.options.max_attempts:
                    self._sleep(attempt)
                    continue
                raise
        raise S3Error(f"GET {key}: out of attempts")

    def read_tag(self, repo: str, tag: str) -> Digest | None:
        return self._read_tag_versioned(repo, tag)[0]

    def _conditional(self, what: str, fn: Callable[[], Any], done: Callable[[], bool]) -> bool:
        """Run a conditional write with retries. Returns False when the precondition failed.

        A retried write whose first attempt may have succeeded (response lost) sees its own
        effect as a failed precondition; `done()` tells those apart from a real conflict."""
        attempt = 0
        while True:
            attempt += 1
            try:
                fn()
                return True
            except Exception as e:
                if _precondition_failed(e) or (attempt > 1 and _not_found(e)):
                    return attempt > 1 and done()
                if _not_found(e):
                    return False
                if _retryable(e) and attempt < self.options.max_attempts:
                    self._sleep(attempt)
                    continue
                self._raise_final(what, e, attempt)

    def swap_tag(self, repo: str, tag: str, new: Digest | None, expect: Expectation) -> Digest | None:
        key = self.layout.tag(repo, tag)
        body = f"{new}\n".encode() if new is not None else b""
        md5 = _core.content_md5(body)

        def is_new() -> bool:
            return self.read_tag(repo, tag) == new

        for _ in range(100):  # bounded: only ANY loops, and only while others keep winning
            if expect is MISSING:
                current, etag = None, None
            else:
                current, etag = self._read_tag_versioned(repo, tag)
                if expect is not ANY and current != expect:
                    raise TagConflictError(f"{repo}:{tag} points at {current}, expected {expect}")
            if expect is MISSING or current is None:
                if new is None:
                    return None
                ok = self._conditional(
                    f"PUT {key}",
                    lambda: self.client.put_object(
                        Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5, IfNoneMatch="*"
                    ),
                    is_new,
                )
            elif new is None:
                ok = self._delete_tag(key, etag or "", lambda: self.read_tag(repo, tag) is None)
            else:
                if current == new:
                    return current
                ok = self._conditional(
                    f"PUT {key}",
                    lambda etag=etag: self.client.put_object(
                        Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5, IfMatch=etag
                    ),
                    is_new,
                )
            if ok:
                return current
            if expect is not ANY:
                now = self.read_tag(repo, tag)
                raise TagConflictError(f"{repo}:{tag} changed concurrently (now {now})")
        raise TagConflictError(f"{repo}:{tag}: gave up after 100 conflicting concurrent updates")

    def _delete_tag(self, key: str, etag: str, gone: Callable[[], bool]) -> bool:
        if self.conditional_delete:
            return self._conditional(
                f"DELETE {key}",
                lambda: self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag),
                gone,
            )
        # Server without conditional DELETE: re-check the ETag, then delete. A writer racing in
        # between can be lost (documented in the README); conditional PUTs stay exact.
        head = self._head(key)
        if head is None or _bare(str(head["ETag"])) != _bare(etag):
            return False
        self._call("delete_object", Bucket=self.bucket, Key=key)
        return True

    def iter_tags(self, repo: str) -> Iterator[str]:
        prefix = self.layout.tags_prefix(repo)
        for obj in self._iter_keys(prefix, delimiter="/"):
            name = obj["Key"][len(prefix) :]
            if name:
                yield name

    def iter_repos(self) -> Iterator[str]:
        seen: set[str] = set()
        for obj in self._iter_keys(self.layout.refs):
            repo = self.layout.parse_repo(obj["Key"])
            if repo is not None and repo not in seen:
                seen.add(repo)
                yield repo

    # -- housekeeping --------------------------------------------------------------------------
    def iter_multipart_uploads(self) -> Iterator[dict[str, Any]]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.layout.prefix}
        while True:
            resp = self._call("list_multipart_uploads", **kw)
            yield from resp.get("Uploads", [])
            if not resp.get("IsTruncated"):
                return
            kw["KeyMarker"] = resp.get("NextKeyMarker")
            kw["UploadIdMarker"] = resp.get("NextUploadIdMarker")

    def cleanup(self, older_than: float) -> CleanupReport:
        """Abort multipart uploads and delete staging objects started `older_than` seconds ago."""
        cutoff = datetime.now(UTC).timestamp() - older_than
        removed = nbytes = 0
        for up in list(self.iter_multipart_uploads()):
            if up["Initiated"].timestamp() <= cutoff:
                with contextlib.suppress(Exception):
                    self._call(
                        "abort_multipart_upload", Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    removed += 1
        for obj in list(self._iter_keys(self.layout.uploads)):
            if obj["LastModified"].timestamp() <= cutoff:
                self._call("delete_object", Bucket=self.bucket, Key=obj["Key"])
                removed += 1
                nbytes += int(obj.get("Size", 0))
        return CleanupReport(removed, nbytes)

    def with_options(self, **changes: Any) -> S3Backend:
        """A backend on the same bucket/prefix/client with some options changed (no probe)."""
        changes.setdefault("part_checksum", self.part_checksum)  # as resolved by this one's probe
        other = S3Backend(
            self.bucket, self.layout.prefix, replace(self.options, probe=False, **changes), self.client
        )
        other.md5_with_crc32 = self.md5_with_crc32 and other.part_checksum == "md5"
        other.conditional_delete = self.conditional_delete
        return other

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


__all__ = ["S3Backend", "S3ConfigurationError", "S3Error", "S3Layout", "S3Options"]
