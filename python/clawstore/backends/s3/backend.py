"""The S3 backend: the `Backend` protocol methods over the transport, probe, uploads and
downloads of this package."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, BinaryIO

from clawstore import _core
from clawstore.digest import Digest
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    ManifestNotFoundError,
    TagConflictError,
)
from clawstore.types import ANY, MISSING, BlobSource, CleanupReport, Expectation

from .delete import BatchDeleter
from .download import Downloader, ResumingBody
from .layout import S3Layout
from .listing import FanoutLister
from .options import S3Options
from .probe import S3Capabilities, probe
from .transport import Transport, bare, not_found, precondition_failed
from .upload import Uploader

#: Attempts of a compare-and-swap without expectation (only ANY loops, while others keep winning).
MAX_CAS_ROUNDS = 100
#: Buffers up to this size are written with one conditional PUT (If-None-Match: *) instead of a
#: HEAD and a PUT: a request saved on every new blob (checkpoint packs and configs are nearly
#: always new), for at most this many bytes sent again when the blob was there already.
BLIND_PUT_MAX = 1 << 20


class S3Backend:
    """Content-addressed store in an S3 bucket under a prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        options: S3Options | None = None,
        client: Any = None,
        *,
        caps: S3Capabilities | None = None,
    ) -> None:
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
        self.transport = Transport(bucket, self.options, client)
        if caps is None:
            mode = self.options.part_checksum
            if self.options.probe:
                caps = probe(self.transport, self.layout.new_probe, mode)
            else:
                caps = S3Capabilities(part_checksum="md5" if mode == "auto" else mode)
        #: What the server does (probed at open time unless probe=false); frozen.
        self.caps = caps
        self.uploader = Uploader(self.transport, self.layout, caps)
        self.downloader = Downloader(self.transport)
        self.lister = FanoutLister(self.transport, self.layout, concurrency=self.options.concurrency)
        self.deleter = BatchDeleter(
            self.transport,
            batch=self.options.delete_batch,
            concurrency=self.options.concurrency,
            supported=caps.delete_objects,
        )
        # (repo, tag) -> (digest, ETag) of the tag as this backend last read or wrote it: a
        # compare-and-swap from that digest sends If-Match with it straight away (no re-read;
        # a stale ETag only fails the precondition, and the tag is then read again).
        self._tag_etags: dict[tuple[str, str], tuple[Digest, str]] = {}

    @classmethod
    def from_url(
        cls,
        bucket: str,
        prefix: str,
        query: dict[str, str],
        *,
        caps: S3Capabilities | None = None,
        **options: Any,
    ) -> S3Backend:
        """`caps`: what an earlier probe of the same server found (a registry's parent process
        hands its workers the result): no probe then."""
        return cls(bucket, prefix, S3Options.build(query, options), caps=caps)

    @property
    def client(self) -> Any:
        return self.transport.client

    @property
    def part_checksum(self) -> str:
        """The per-part checksum in use ("auto" resolved by the probe; md5 without a probe)."""
        return self.caps.part_checksum

    @property
    def md5_with_crc32(self) -> bool:
        return self.caps.md5_with_crc32

    @property
    def conditional_delete(self) -> bool:
        return self.caps.conditional_delete

    # -- blobs ---------------------------------------------------------------------------------
    def write_blob(self, src: BlobSource, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        if isinstance(src, bytes | bytearray | memoryview) and len(src) <= BLIND_PUT_MAX:
            return self._put_buffer(bytes(src), algorithm, expected)
        if isinstance(src, str | os.PathLike) and expected is not None:
            size = os.stat(src).st_size
            if size <= self.options.multipart_threshold:
                # A file named by its digest: the store has just asked whether that is stored
                # (ArtifactStore.put_blob, unless the caller vouched with trust_size, having
                # asked itself), so one conditional PUT rather than another HEAD and a PUT.
                with open(src, "rb") as f:
                    data = f.read(size + 1)
                if len(data) != size:
                    raise ClawstoreError(f"{os.fspath(src)} changed size while being read")
                try:
                    return self._put_buffer(data, algorithm, expected)
                except DigestMismatchError:
                    # As before this shortcut: a blob stored under the digest the caller vouches
                    # for (put_blob with trust_size), with the file's size, is taken as it is.
                    head = self.transport.head(self.layout.blob(expected))
                    if head is not None and int(head["ContentLength"]) == size:
                        return expected, size
                    raise
        return self.uploader.write_blob(src, algorithm, expected)

    def _put_buffer(self, data: bytes, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        """A small buffer: hashed, then one PUT with If-None-Match: * (a failed precondition
        means the digest key is stored already: content-addressed, so the same bytes)."""
        digest = Digest.from_hex(algorithm, _core.digest_bytes(data, algorithm))
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"content hashes to {digest}, expected {expected}")
        try:
            self.uploader.put_small(self.layout.blob(digest), data, IfNoneMatch="*")
        except Exception as e:
            if not precondition_failed(e):
                raise
        return digest, len(data)

    def open_blob(self, digest: Digest) -> tuple[BinaryIO, int]:
        key = self.layout.blob(digest)
        try:
            resp = self.transport.call("get_object", Key=key)
        except Exception as e:
            if not_found(e):
                raise BlobNotFoundError(f"blob {digest} not found") from None
            raise
        size = int(resp["ContentLength"])
        body = ResumingBody(self.transport, key, resp["Body"], str(resp.get("ETag", "")), size)
        return io.BufferedReader(body, 1 << 20), size  # type: ignore[return-value]

    def read_blob_range(self, digest: Digest, offset: int, length: int) -> bytes:
        """`length` bytes of a blob from `offset` (fewer at its end): one ranged GET, retried
        with its body read (a body cut short is retried like any transient failure)."""
        key = self.layout.blob(digest)
        if length <= 0:
            return b""

        def once(_attempt: int) -> bytes:
            resp = self.client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
            )
            return bytes(resp["Body"].read())

        try:
            return self.transport.run(f"GET {key} range", once)
        except Exception as e:
            if not_found(e):
                raise BlobNotFoundError(f"blob {digest} not found") from None
            if "InvalidRange" in str(e):
                return b""
            raise

    def blob_url(self, digest: Digest, ttl: float) -> str:
        """A presigned GET of the blob's object, valid `ttl` seconds (at least 1, at most the
        7 days SigV4 allows), signed with the store's credentials and endpoint."""
        seconds = max(1, min(int(ttl), 7 * 24 * 3600))
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.layout.blob(digest)}, ExpiresIn=seconds
        )
        return url

    @property
    def read_concurrency(self) -> int:
        """Ranged reads worth running at once."""
        return self.options.download_concurrency

    def download_to(self, digest: Digest, path: str | os.PathLike[str], *, fsync: bool = False) -> int:
        """Download a blob to `path` with parallel ranged GETs (or one streamed GET), hashing in
        order while the ranges arrive; `path` appears (atomic rename) only if the whole content
        verifies. Like `cp` and boto3 `download_file` the data is not fsynced unless `fsync` is
        set. Returns the size. DigestMismatchError / BlobNotFoundError."""
        key = self.layout.blob(digest)
        head = self.transport.head(key)
        if head is None:
            raise BlobNotFoundError(f"blob {digest} not found")
        return self.downloader.download_to(key, head, digest, path, fsync)

    def blob_size(self, digest: Digest) -> int | None:
        head = self.transport.head(self.layout.blob(digest))
        return None if head is None else int(head["ContentLength"])

    def remove_blob(self, digest: Digest) -> bool:
        return self._remove(self.layout.blob(digest))

    def _remove(self, key: str) -> bool:
        if self.transport.head(key) is None:
            return False
        self.transport.delete(key)
        return True

    def remove_blobs(self, digests: Collection[Digest]) -> int:
        """DeleteObjects, `delete_batch` keys per request, `concurrency` requests in flight, no
        HEAD (see `delete.py`); returns the keys acknowledged as gone."""
        return self.deleter.delete([self.layout.blob(d) for d in digests])

    @property
    def remove_batch(self) -> int:
        return self.deleter.batch

    @property
    def remove_concurrency(self) -> int:
        return self.deleter.concurrency

    def iter_blobs(self) -> Iterator[Digest]:
        return (d for d, _size in self.iter_blob_sizes())

    def iter_blob_sizes(self) -> Iterator[tuple[Digest, int]]:
        return self.lister.iter_sized(self.layout.blobs)

    # -- manifests -----------------------------------------------------------------------------
    def write_manifest(self, digest: Digest, data: bytes) -> None:
        try:
            self.uploader.put_small(self.layout.manifest(digest), data, IfNoneMatch="*")
        except Exception as e:
            if not precondition_failed(e):
                raise
            # Already there: same digest, same bytes.

    def read_manifest(self, digest: Digest) -> bytes:
        key = self.layout.manifest(digest)
        try:
            return self.transport.run(
                f"GET {key}",
                lambda _: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read(),
            )
        except Exception as e:
            if not_found(e):
                raise ManifestNotFoundError(f"manifest {digest} not found") from None
            raise

    def manifest_size(self, digest: Digest) -> int | None:
        head = self.transport.head(self.layout.manifest(digest))
        return None if head is None else int(head["ContentLength"])

    def remove_manifest(self, digest: Digest) -> bool:
        return self._remove(self.layout.manifest(digest))

    def remove_manifests(self, digests: Collection[Digest]) -> int:
        return self.deleter.delete([self.layout.manifest(d) for d in digests])

    def iter_manifests(self) -> Iterator[Digest]:
        return (d for d, _size in self.iter_manifest_sizes())

    def iter_manifest_sizes(self) -> Iterator[tuple[Digest, int]]:
        return self.lister.iter_sized(self.layout.manifests)

    # -- tags ----------------------------------------------------------------------------------
    def _read_tag_versioned(self, repo: str, tag: str) -> tuple[Digest | None, str | None]:
        key = self.layout.tag(repo, tag)

        def once(_: int) -> tuple[Digest | None, str | None]:
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key)
                text = resp["Body"].read().decode().strip()
            except Exception as e:
                if not_found(e):
                    return None, None
                raise
            return Digest.parse(text), str(resp["ETag"])

        current, etag = self.transport.run(f"GET {key}", once)
        self._remember_tag(repo, tag, current, etag)
        return current, etag

    def read_tag(self, repo: str, tag: str) -> Digest | None:
        return self._read_tag_versioned(repo, tag)[0]

    def _remember_tag(self, repo: str, tag: str, digest: Digest | None, etag: str | None) -> None:
        if digest is not None and etag:
            self._tag_etags[(repo, tag)] = (digest, etag)
        else:
            self._tag_etags.pop((repo, tag), None)

    def swap_tag(self, repo: str, tag: str, new: Digest | None, expect: Expectation) -> Digest | None:
        key = self.layout.tag(repo, tag)
        body = f"{new}\n".encode() if new is not None else b""
        md5 = _core.content_md5(body)
        t = self.transport
        written: list[str] = []  # the ETag of our successful PUT

        def is_new() -> bool:
            return self.read_tag(repo, tag) == new

        def put(**cond: str) -> None:
            resp = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5, **cond)
            written.append(str(resp.get("ETag", "")))

        # The ETag this backend last saw the expected digest under: If-Match it without a read.
        cached = self._tag_etags.get((repo, tag))
        from_cache = cached is not None and new is not None and new != expect and cached[0] == expect
        first_etag = cached[1] if from_cache and cached is not None else None
        for _ in range(MAX_CAS_ROUNDS):
            if expect is MISSING:
                current, etag = None, None
            elif first_etag is not None:
                current, etag, first_etag = expect, first_etag, None  # type: ignore[assignment]
            else:
                current, etag = self._read_tag_versioned(repo, tag)
                if expect is not ANY and current != expect:
                    raise TagConflictError(f"{repo}:{tag} points at {current}, expected {expect}")
            if expect is MISSING or current is None:
                if new is None:
                    return None
                ok = t.conditional(f"PUT {key}", lambda: put(IfNoneMatch="*"), is_new)
            elif new is None:
                ok = self._delete_tag(key, etag or "", lambda: self.read_tag(repo, tag) is None)
            else:
                if current == new:
                    return current
                if_match = self.caps.if_match(etag or "")
                ok = t.conditional(f"PUT {key}", lambda if_match=if_match: put(IfMatch=if_match), is_new)
            if ok:
                if new is None or written:
                    self._remember_tag(repo, tag, new, written[-1] if written else None)
                return current
            if expect is not ANY:
                if from_cache:
                    from_cache = False
                    continue  # the remembered ETag was stale: read the tag, and try again if it holds
                now = self.read_tag(repo, tag)
                raise TagConflictError(f"{repo}:{tag} changed concurrently (now {now})")
        raise TagConflictError(f"{repo}:{tag}: gave up after {MAX_CAS_ROUNDS} conflicting concurrent updates")

    def _delete_tag(self, key: str, etag: str, gone: Callable[[], bool]) -> bool:
        if self.caps.conditional_delete:
            if_match = self.caps.if_match(etag)
            return self.transport.conditional(
                f"DELETE {key}",
                lambda: self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=if_match),
                gone,
            )
        # Server without conditional DELETE: re-check the ETag, then delete. A writer racing in
        # between can be lost (documented in the README); conditional PUTs stay exact.
        head = self.transport.head(key)
        if head is None or bare(str(head["ETag"])) != bare(etag):
            return False
        self.transport.delete(key)
        return True

    def iter_tags(self, repo: str) -> Iterator[str]:
        prefix = self.layout.tags_prefix(repo)
        for obj in self.transport.iter_keys(prefix, delimiter="/"):
            name = obj["Key"][len(prefix) :]
            if name:
                yield name

    def iter_repos(self) -> Iterator[str]:
        seen: set[str] = set()
        for obj in self.transport.iter_keys(self.layout.refs):
            repo = self.layout.parse_repo(obj["Key"])
            if repo is not None and repo not in seen:
                seen.add(repo)
                yield repo

    # -- housekeeping --------------------------------------------------------------------------
    def iter_multipart_uploads(self) -> Iterator[dict[str, Any]]:
        return self.transport.iter_multipart_uploads(self.layout.prefix)

    def cleanup(self, older_than: float) -> CleanupReport:
        """Abort multipart uploads and delete staging objects started `older_than` seconds ago."""
        cutoff = datetime.now(UTC).timestamp() - older_than
        removed = nbytes = 0
        for up in list(self.iter_multipart_uploads()):
            if up["Initiated"].timestamp() <= cutoff:
                with contextlib.suppress(Exception):
                    self.transport.call("abort_multipart_upload", Key=up["Key"], UploadId=up["UploadId"])
                    removed += 1
        stale = [
            o
            for o in self.transport.iter_keys(self.layout.uploads)
            if o["LastModified"].timestamp() <= cutoff
        ]
        if stale:  # in batches (DeleteObjects), like GC's sweep
            self.deleter.delete([o["Key"] for o in stale])
            removed += len(stale)
            nbytes += sum(int(o.get("Size", 0)) for o in stale)
        return CleanupReport(removed, nbytes)

    def with_options(self, **changes: Any) -> S3Backend:
        """A backend on the same bucket/prefix/client with some options changed (no probe: the
        capabilities found by this one's)."""
        changes.setdefault("part_checksum", self.part_checksum)  # as resolved by this one's probe
        options = replace(self.options, probe=False, **changes)
        mode = options.part_checksum
        caps = replace(self.caps, part_checksum=mode, md5_with_crc32=self.md5_with_crc32 and mode == "md5")
        return S3Backend(self.bucket, self.layout.prefix, options, self.client, caps=caps)

    def close(self) -> None:
        self.transport.close()
