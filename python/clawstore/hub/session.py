"""Hub sessions: a recording, leasing wrapper of a backend, with a plain `ArtifactStore` on top.

Model: containerd's metadata content store (`core/metadata/content.go`), a wrapper over the
narrow content store in which every method consults the metadata database and the leases.
Here `SessionBackend` implements the `Backend` contract over the hub's backend and

- holds (adds to the session's GC lease, rescuing from GC's trash) every digest before the
  store relies on it: a read (`open_blob`, `blob_size`, `read_manifest`, `manifest_size`,
  `download_to`, `blob_path`), a write with a known digest, the references of a manifest;
- records what it stores in the catalog: blob rows (batched: written with the next manifest or
  when the session ends, one transaction for many blobs), manifests with their edges and repo
  membership, tag moves with their history;
- refuses what a session must not do: deleting, enumerating the store, cleanup;
- asks the hub before every tag read or write (`authorize(action, repo)`, which is the hub's
  permission check: the wrapper has none of its own).

`HubSession` is an `ArtifactStore` over it that adds no behaviour of its own, only names for
what it holds. Artifact kinds take it like any store and never see the catalog.

Why a blob whose digest is unknown before the write needs one check after its lease: see
`SessionBackend.write_blob` and the protocol in `clawstore.hub.gc`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from clawstore.backends.base import Backend, BlobPaths, Downloads
from clawstore.digest import Digest
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    ManifestNotFoundError,
    PermissionDeniedError,
)
from clawstore.hub import catalog as c
from clawstore.hub.leases import Lease
from clawstore.hub.records import ensure_recorded
from clawstore.store import ArtifactStore, check_references
from clawstore.types import BlobSource, CleanupReport, Expectation

if TYPE_CHECKING:
    from clawstore.hub.permissions import Principal
    from clawstore.manifest import Manifest

#: authorize(action, repo): raises PermissionDeniedError unless the session's principal may.
Authorize = Callable[[str, str], None]
#: may_read(digest): whether the digest is linked to a repository the principal may read.
MayRead = Callable[[str], bool]

_RETRIES = 3


class SessionBackend:
    """The `Backend` a hub session's store runs on (see the module docstring)."""

    def __init__(
        self,
        inner: Backend,
        catalog: c.Catalog,
        lease: Lease,
        *,
        repo: str,
        actor: str,
        authorize: Authorize,
        may_read: MayRead | None = None,
        release_lease: bool = True,
    ) -> None:
        self.inner = inner
        #: False for a lease that outlives the session (a registry upload spans requests)
        self.release_lease = release_lease
        self.catalog = catalog
        self.lease = lease
        self.repo = repo
        self.actor = actor
        self.authorize = authorize
        self.may_read = may_read
        self.url = inner.url
        self._store = ArtifactStore(inner)  # verified reads for the wrapper's own checks
        self._lock = threading.Lock()  # artifact kinds write from several threads
        self._held: dict[str, int] = {}  # digest -> order in which the lease took it
        self._holds = 0
        self._pending: dict[str, int] = {}  # blobs written and held, catalog rows not yet
        self._verified: set[str] = set()  # manifests whose references were checked while held
        self._readable: set[str] = set()  # digests this session may read (see `_may`)
        self._closed = False

    def __repr__(self) -> str:
        return f"SessionBackend({self.repo!r}, {self.inner!r})"

    # -- leasing -----------------------------------------------------------------------------
    def hold(self, digests: Collection[Digest | str]) -> None:
        """Make `digests` GC roots for the life of the session (and rescue them from GC's
        trash) before anything relies on them. Digests already held cost nothing; the rest
        take one transaction together."""
        self._check_open()
        with self._lock:
            new = {str(d) for d in digests} - self._held.keys()
        # Trust the cache only while the lease is far from expiry; otherwise add (a heartbeat,
        # which raises LeaseConflictError if the lease already lapsed).
        if new or self.lease.expires_at - time.time() < self.lease.ttl / 2:
            # Every trip to the catalog re-checks the principal: a revoked token (or grant)
            # stops an open session at its next write or heartbeat.
            self.authorize("push", self.repo)
            self.lease.add(new)
            with self._lock:
                for d in new:
                    if d not in self._held:
                        self._holds += 1
                        self._held[d] = self._holds

    def _may(self, digest: Digest | str) -> bool:
        """A digest is readable in this session only if the session wrote it (its bytes were
        hashed here: proof of possession) or it is linked to the session's repository or to one
        the principal may pull. Anything else is "not found", exactly like an absent digest."""
        d = str(digest)
        with self._lock:
            if d in self._readable:
                return True
        if self.may_read is not None and not self.may_read(d):
            return False
        with self._lock:
            self._readable.add(d)
        return True

    def _readable_now(self, digest: Digest | str) -> None:
        with self._lock:
            self._readable.add(str(digest))

    def _held_since(self, digest: Digest) -> int | None:
        with self._lock:
            return self._held.get(str(digest))

    def _record_later(self, digest: Digest, size: int) -> None:
        with self._lock:
            self._pending[str(digest)] = size

    def _check_open(self) -> None:
        if self._closed:
            raise ClawstoreError(f"hub session on {self.repo} is closed")

    # -- blobs -------------------------------------------------------------------------------
    def write_blob(self, src: BlobSource, algorithm: str, expected: Digest | None) -> tuple[Digest, int]:
        if expected is not None:
            # Held before the write: GC keeps whatever is (or lands) at this digest.
            self.hold([expected])
            # A buffer is hashed whole by every backend (the Backend contract), so writing it
            # proves possession even when the blob is stored already: no need to ask first.
            in_memory = isinstance(src, bytes | bytearray | memoryview)
            if (
                not in_memory
                and not self._may(expected)
                and (
                    # A file: write it as of unknown digest (hashed whole, whether stored or not)
                    # rather than ask whether it is stored first. A stream: ask.
                    isinstance(src, str | os.PathLike) or self.inner.blob_size(expected) is not None
                )
            ):
                # Stored, but not ours to read: a backend would skip the bytes it already has,
                # and the caller would get the digest linked to its repository without proving
                # it holds the content. Hash every byte (an existing object is not rewritten).
                digest, size = self.inner.write_blob(src, algorithm, None)
                if digest != expected:
                    raise DigestMismatchError(f"content hashes to {digest}, expected {expected}")
            else:
                digest, size = self.inner.write_blob(src, algorithm, expected)
            self._record_later(digest, size)
            self._readable_now(digest)
            return digest, size
        for _attempt in range(_RETRIES):
            with self._lock:
                start = self._holds
            digest, size = self.inner.write_blob(src, algorithm, None)
            since = self._held_since(digest)
            self.hold([digest])
            if since is not None and since <= start:
                # The lease held this digest before the write began: nothing can have swept it.
                self._record_later(digest, size)
                self._readable_now(digest)
                return digest, size
            # Only now is the digest known. A concurrent GC may have deleted an identical object
            # between the write (which found it stored and wrote nothing) and the lease, so look
            # once the lease holds it: from then on it stays.
            if self.inner.blob_size(digest) == size:
                self._record_later(digest, size)
                self._readable_now(digest)
                return digest, size
            if isinstance(src, bytes | bytearray | memoryview | str | os.PathLike):
                continue
            if hasattr(src, "seek"):
                src.seek(0)
                continue
            break
        raise ClawstoreError(f"blob {digest} was collected while uploading; retry the upload")

    def open_blob(self, digest: Digest) -> tuple[BinaryIO, int]:
        if not self._may(digest):
            raise BlobNotFoundError(f"blob {digest} not found")
        self.hold([digest])
        return self.inner.open_blob(digest)

    def blob_size(self, digest: Digest) -> int | None:
        if not self._may(digest):
            return None
        self.hold([digest])
        return self.inner.blob_size(digest)

    def download_to(self, digest: Digest, path: str | os.PathLike[str]) -> int:
        if not self._may(digest):
            raise BlobNotFoundError(f"blob {digest} not found")
        self.hold([digest])
        if isinstance(self.inner, Downloads):
            return self.inner.download_to(digest, path)
        return self._store.get_blob_to_path(digest, path)

    def read_blob_range(self, digest: Digest, offset: int, length: int) -> bytes:
        if not self._may(digest):
            raise BlobNotFoundError(f"blob {digest} not found")
        self.hold([digest])
        return self._store.get_blob_range(digest, offset, length)

    @property
    def read_concurrency(self) -> int:
        return self._store.read_concurrency

    def blob_path(self, digest: Digest) -> Path | None:
        if not isinstance(self.inner, BlobPaths) or not self._may(digest):
            return None
        self.hold([digest])
        return self.inner.blob_path(digest)

    def remove_blob(self, digest: Digest) -> bool:
        raise PermissionDeniedError("hub sessions do not delete blobs: untag and run gc")

    def remove_blobs(self, digests: Collection[Digest]) -> int:
        raise PermissionDeniedError("hub sessions do not delete blobs: untag and run gc")

    def iter_blobs(self) -> Iterator[Digest]:
        raise PermissionDeniedError("hub sessions do not list the store's blobs")

    # -- manifests ---------------------------------------------------------------------------
    def write_manifest(self, digest: Digest, data: bytes) -> None:
        self.hold([digest])  # the store held it with its references already: free
        self.inner.write_manifest(digest, data)

    def manifest_stored(self, digest: Digest, manifest: Manifest, size: int) -> None:
        """Called by the store after put_manifest (held, validated, written): record the
        manifest, its edges, its repository and the session's pending blob rows, one
        transaction."""
        self.authorize("push", self.repo)
        with self._lock:
            pending, self._pending = self._pending, {}
            self._verified.add(str(digest))
            self._readable.add(str(digest))
        with self.catalog.tx() as conn:
            c.record_manifest(conn, digest, manifest, size, repo=self.repo, extra_blobs=pending)

    def read_manifest(self, digest: Digest) -> bytes:
        if not self._may(digest):
            raise ManifestNotFoundError(f"manifest {digest} not found")
        self.hold([digest])
        return self.inner.read_manifest(digest)

    def manifest_size(self, digest: Digest) -> int | None:
        if not self._may(digest):
            return None
        self.hold([digest])
        return self.inner.manifest_size(digest)

    def remove_manifest(self, digest: Digest) -> bool:
        raise PermissionDeniedError("hub sessions do not delete manifests: untag and run gc")

    def remove_manifests(self, digests: Collection[Digest]) -> int:
        raise PermissionDeniedError("hub sessions do not delete manifests: untag and run gc")

    def iter_manifests(self) -> Iterator[Digest]:
        raise PermissionDeniedError("hub sessions do not list the store's manifests")

    # -- tags --------------------------------------------------------------------------------
    def read_tag(self, repo: str, tag: str) -> Digest | None:
        self.authorize("pull", repo)
        d = self.inner.read_tag(repo, tag)
        if d is not None:
            self.hold([d])  # whoever resolves a tag reads what it points at next
        return d

    def swap_tag(self, repo: str, tag: str, new: Digest | None, expect: Expectation) -> Digest | None:
        """The one implementation of tag and untag for the hub (Hub.tag/untag go through a
        session too): authorize, record the manifest in `repo`, then move the store's tag and
        the catalog's (with history) in one catalog transaction that holds the tag's lock
        (`catalog.lock_tag`): every hub writer of a tag (sessions, retention, cache eviction)
        moves it that way, so two of them cannot interleave their store and catalog writes and
        leave the two disagreeing."""
        self._check_open()
        if new is None:
            self.authorize("delete", repo)
            with self.catalog.tx() as conn:
                c.lock_tag(conn, repo, tag)
                prev = self.inner.swap_tag(repo, tag, None, expect)
                c.set_tag(conn, repo, tag, None, actor=self.actor)
            return prev
        self.authorize("push", repo)
        if not self._may(new):
            # Tagging another repository's manifest into this one would link it (and all it
            # references) here: only what the caller could read anyway may be tagged.
            raise ManifestNotFoundError(f"cannot tag {repo}:{tag}: manifest {new} not found")
        self.hold([new])
        with self.catalog.tx() as conn:
            if not ensure_recorded(conn, self._store, str(new)):
                raise ManifestNotFoundError(f"cannot tag {repo}:{tag}: manifest {new} not found")
            # Tagging is a push of the manifest into `repo`: it restarts its grace clock.
            t = c.now()
            c.ensure_repository(conn, repo, t)
            conn.execute(c.manifests.update().where(c.manifests.c.digest == str(new)).values(seen_at=t))
            c.upsert(
                conn,
                c.repo_manifests,
                [{"repository": repo, "digest": str(new), "pushed_at": t}],
                ["repository", "digest"],
                ["pushed_at"],
            )
        # Held (and its closure rescued) now: if GC deleted part of it before, refuse a torso.
        # A manifest this session stored had its references checked while they were held.
        if str(new) not in self._verified:
            check_references(self.inner, self._store.get_manifest_typed(new))
        with self.catalog.tx() as conn:
            c.lock_tag(conn, repo, tag)
            prev = self.inner.swap_tag(repo, tag, new, expect)
            c.set_tag(conn, repo, tag, new, actor=self.actor)
        return prev

    def iter_tags(self, repo: str) -> Iterator[str]:
        self.authorize("pull", repo)
        return self.inner.iter_tags(repo)

    def iter_repos(self) -> Iterator[str]:
        for repo in self.inner.iter_repos():
            try:
                self.authorize("pull", repo)
            except PermissionDeniedError:
                continue
            yield repo

    def link_written(self, digests: Collection[Digest | str]) -> None:
        """Link blobs this session has written (or may read) to its repository, as a finished
        registry upload is (distribution's layer links): `blob put --repo R` in one process,
        then `manifest put --repo R` in another by a principal with no other link to them."""
        self._check_open()
        self.authorize("push", self.repo)
        ds = [str(d) for d in digests]
        for d in ds:
            if not self._may(d):
                raise BlobNotFoundError(f"blob {d} not found")
        t = c.now()
        with self.catalog.tx() as conn:
            c.ensure_repository(conn, self.repo, t)
            rows = [{"repository": self.repo, "digest": d, "pushed_at": t} for d in ds]
            c.upsert(conn, c.repo_blobs, rows, ["repository", "digest"], ["pushed_at"])

    # -- housekeeping ------------------------------------------------------------------------
    def cleanup(self, older_than: float) -> CleanupReport:
        raise PermissionDeniedError("cleanup belongs to gc")

    def close(self) -> None:
        """End the session: write the pending blob rows, release the lease. The hub's backend
        stays open (it is the hub's)."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._lock:
                pending, self._pending = self._pending, {}
            if pending:
                t = c.now()
                rows = [
                    {"digest": d, "size": size, "created_at": t, "seen_at": t, "adopted": False}
                    for d, size in pending.items()
                ]
                with self.catalog.tx() as conn:
                    c.upsert(conn, c.blobs, rows, ["digest"], ["seen_at", "adopted"])
        finally:
            if self.release_lease:
                self.lease.release()


class HubSession(ArtifactStore):
    """A plain `ArtifactStore` over a `SessionBackend`: every read and write it offers is held
    by the session's lease, recorded in the catalog, authorized by the hub, or refused."""

    backend: SessionBackend

    def __init__(self, backend: SessionBackend, principal: Principal) -> None:
        super().__init__(backend)
        self.principal = principal

    def __repr__(self) -> str:
        return f"HubSession({self.repo!r}, {self.principal!r})"

    @property
    def repo(self) -> str:
        return self.backend.repo

    @property
    def lease(self) -> Lease:
        return self.backend.lease

    def hold(self, *digests: Digest | str) -> None:
        """Make `digests` GC roots for the life of this session, before relying on them."""
        self.backend.hold([Digest.parse(d) for d in digests])


__all__ = ["Authorize", "HubSession", "SessionBackend"]
