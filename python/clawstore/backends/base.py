"""The contract every data plane implements (its vocabulary is in `clawstore.types`).

Backends are below `clawstore.store`: they get names and digests already validated, and they
own atomicity (nothing visible at a digest until its bytes are verified) and tag compare-and-swap.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from clawstore.digest import Digest
from clawstore.types import BlobSource, CleanupReport, Expectation

if TYPE_CHECKING:
    from clawstore.manifest import Manifest


@runtime_checkable
class Backend(Protocol):
    url: str

    # blobs
    def write_blob(self, src: BlobSource, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        """Store `src`, hashing as it is written; commit under its digest only when verified
        (DigestMismatchError if `expected` is given and differs). An existing blob is kept.
        A buffer (bytes, bytearray, memoryview) is always hashed in full, even when the blob is
        stored already (hub sessions rely on it as proof of possession); a file or stream named
        by an `expected` digest that is stored with the same size may be skipped unread."""
        ...

    def open_blob(self, digest: Digest) -> tuple[BinaryIO, int]:
        """Raw stream and stored size; BlobNotFoundError. The store wraps it in a verifying reader."""
        ...

    def blob_size(self, digest: Digest) -> int | None: ...
    def remove_blob(self, digest: Digest) -> bool: ...
    def remove_blobs(self, digests: Collection[Digest]) -> int:
        """Remove many blobs at once, as few requests (S3: DeleteObjects) or directory syncs
        (local: one fsync per fanout directory) as the data plane allows; absent ones are no
        error. Returns how many were removed (S3, which does not say whether a key existed:
        how many keys the server acknowledged as gone). Raises only when some could not be
        removed (after retries); what was removed before that stays removed."""
        ...

    def iter_blobs(self) -> Iterator[Digest]: ...

    # manifests (bytes already validated and digest-checked by the store)
    def write_manifest(self, digest: Digest, data: bytes) -> None:
        """Store a manifest (validated and digest-checked by the store); a stored one is kept."""
        ...

    def read_manifest(self, digest: Digest) -> bytes:
        """ManifestNotFoundError when absent."""
        ...

    def manifest_size(self, digest: Digest) -> int | None: ...
    def remove_manifest(self, digest: Digest) -> bool: ...
    def remove_manifests(self, digests: Collection[Digest]) -> int:
        """`remove_blobs` for manifests."""
        ...

    def iter_manifests(self) -> Iterator[Digest]: ...

    # tags
    def read_tag(self, repo: str, tag: str) -> Digest | None: ...
    def swap_tag(self, repo: str, tag: str, new: Digest | None, expect: Expectation) -> Digest | None:
        """Atomically point `repo:tag` at `new` (None removes it) if the current value matches
        `expect`; return the previous value. TagConflictError when the expectation fails."""
        ...

    def iter_tags(self, repo: str) -> Iterator[str]: ...
    def iter_repos(self) -> Iterator[str]: ...

    # housekeeping
    def cleanup(self, older_than: float) -> CleanupReport:
        """Remove temp files / staging objects / multipart uploads abandoned `older_than` seconds ago."""
        ...

    def close(self) -> None: ...


# -- optional capabilities: a backend declares one by having its method; the store and the hub
# -- test with isinstance(), never getattr, so a type checker and a new backend both see them.
@runtime_checkable
class Downloads(Protocol):
    """Writes a blob to a file faster than a streamed copy (S3: parallel ranged GETs), verified,
    the file appearing only whole (atomic rename). Returns the size."""

    def download_to(self, digest: Digest, path: str | os.PathLike[str]) -> int: ...


@runtime_checkable
class BlobPaths(Protocol):
    """Stored blobs are files: where one would be (it may be absent). Never written through."""

    def blob_path(self, digest: Digest) -> Path | None: ...


@runtime_checkable
class RangedReads(Protocol):
    """Reads part of a blob in one request (local: pread; S3: a Range GET), unverified: callers
    check what they read against digests of their own (checkpoint packs: per-file digests)."""

    def read_blob_range(self, digest: Digest, offset: int, length: int) -> bytes: ...

    #: How many reads the backend serves well at once.
    @property
    def read_concurrency(self) -> int: ...


@runtime_checkable
class PresignedReads(Protocol):
    """A URL that reads a stored blob without credentials until it expires (S3: a presigned GET,
    which honours Range). Made offline: it says nothing of whether the blob exists. Unverified
    by us: whoever fetches it checks the digest (registry clients do)."""

    def blob_url(self, digest: Digest, ttl: float) -> str: ...


@runtime_checkable
class BatchRemovals(Protocol):
    """How `remove_blobs` / `remove_manifests` are best called: with up to `remove_batch`
    digests per call (S3: the server's DeleteObjects limit) and `remove_concurrency` calls in
    flight (GC overlaps them with its catalog work). Without it: 1000 and 1."""

    @property
    def remove_batch(self) -> int: ...
    @property
    def remove_concurrency(self) -> int: ...


@runtime_checkable
class SizedListing(Protocol):
    """Lists stored objects with their sizes in one pass (S3: the listing carries them, the
    fanout's prefixes listed in parallel), so that callers need no HEAD/stat per object."""

    def iter_blob_sizes(self) -> Iterator[tuple[Digest, int]]: ...
    def iter_manifest_sizes(self) -> Iterator[tuple[Digest, int]]: ...


@runtime_checkable
class TempFiles(Protocol):
    """Lists the backend's temp files (fsck reports them, gc removes the stale ones)."""

    def iter_temp_files(self) -> Iterator[Path]: ...


@runtime_checkable
class LocalRoot(Protocol):
    """The store lives in a local directory (the hub puts its default SQLite catalog there)."""

    root: Path


@runtime_checkable
class Recording(Protocol):
    """A wrapper that keeps records beside the content (hub sessions): the store tells it what it
    is about to rely on, before checking it exists, and what manifest it stored, already parsed
    and digested, so the wrapper never parses or hashes anything a second time."""

    def hold(self, digests: Collection[Digest]) -> None: ...
    def manifest_stored(self, digest: Digest, manifest: Manifest, size: int) -> None: ...
