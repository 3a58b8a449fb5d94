"""Resumable blob uploads: the OCI registry's upload sessions, shared by every process on the
catalog.

An upload session is a catalog row (`uploads`) plus a GC lease. Each chunk a client sends is
streamed into the store as a blob of its own (sha256, content-addressed, held by the session's
lease, recorded like any pushed blob), and the row lists the chunks in order with the offset
they reach. Nothing is kept in a process: any `serve` process on the same catalog and store
can take the next chunk or finish the upload, and a chunk is appended by compare-and-swap on
the offset, so two writers racing for the same offset cannot both win.

Finishing names the digest. The common case (one chunk: docker, skopeo and podman send a layer
in one PATCH) costs nothing more: the chunk *is* the blob when its digest is the one named.
Otherwise the chunks are streamed, in order, into one new blob that the store verifies against
the digest (nothing is stored under it unless the bytes match). The finished blob is linked to
the repository (`repo_blobs`) and stays held by the session's lease until the lease runs out, so
a GC with grace 0 between a layer upload and the manifest that references it cannot take the
layer. An abandoned session ends with its lease: GC drops the row, and its chunks, held by
nothing, are collected like any unreferenced blob.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, BinaryIO

from sqlalchemy import BigInteger, Column, Float, Index, String, Table, Text, delete, select, update

from clawstore.digest import Digest
from clawstore.errors import LeaseConflictError, UploadNotFoundError, UploadRangeError
from clawstore.hub import catalog as c
from clawstore.hub.leases import Lease, Leases
from clawstore.hub.session import HubSession
from clawstore.manifest import Descriptor
from clawstore.store import ArtifactStore

uploads = Table(
    "uploads",
    c.metadata,
    Column("id", String(64), primary_key=True),
    Column("repository", c.NAME, nullable=False),
    Column("holder", c.NAME, nullable=False),
    Column("lease_id", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("chunks", Text, nullable=False),  # JSON [[digest, size], ...] in order
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_uploads_lease", "lease_id"),
)

#: How long an upload session lives after its last chunk (and a finished blob stays held).
UPLOAD_TTL = 3600.0
LEASE_KIND = "registry-upload"

#: open_session(lease): a hub session on `lease` that leaves the lease alive when it closes.
OpenSession = Callable[[Lease], HubSession]


@dataclass(frozen=True, slots=True)
class UploadState:
    id: str
    repository: str
    holder: str
    lease_id: str
    offset: int
    chunks: tuple[tuple[str, int], ...]
    created_at: float
    expires_at: float


class ChunkReader(io.RawIOBase):
    """The chunks of an upload, read in order from the store as one stream (each chunk verified
    against its own digest by the store's reader)."""

    def __init__(self, store: ArtifactStore, chunks: tuple[tuple[str, int], ...]) -> None:
        super().__init__()
        self._store = store
        self._pending = list(chunks)
        self._current: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self._current is None:
                if not self._pending:
                    return 0
                digest, _size = self._pending.pop(0)
                self._current = self._store.get_blob(digest)
            n = self._current.readinto(view)
            if n:
                return int(n)
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()


class Uploads:
    """Upload sessions over the catalog, the store and GC leases. The Hub checks permissions
    before calling any of this; `holder` is the principal's name."""

    def __init__(self, catalog: c.Catalog, store: ArtifactStore, leases: Leases, ttl: float = UPLOAD_TTL):
        self.catalog = catalog
        self.store = store
        self.leases = leases
        self.ttl = ttl

    # -- rows --------------------------------------------------------------------------------
    def start(self, repo: str, holder: str) -> UploadState:
        lease = self.leases.create(LEASE_KIND, holder, self.ttl)
        upload_id = secrets.token_urlsafe(24)
        t = c.now()
        with self.catalog.tx() as conn:
            conn.execute(
                uploads.insert().values(
                    id=upload_id,
                    repository=repo,
                    holder=holder,
                    lease_id=lease.id,
                    size=0,
                    chunks="[]",
                    created_at=t,
                    updated_at=t,
                )
            )
        return UploadState(upload_id, repo, holder, lease.id, 0, (), t, lease.expires_at)

    def get(self, upload_id: str, repo: str, holder: str) -> UploadState:
        """The live session `upload_id` of `repo` started by `holder`; UploadNotFoundError."""
        with self.catalog.tx() as conn:
            row = conn.execute(
                select(uploads, c.leases.c.expires_at)
                .join(c.leases, c.leases.c.id == uploads.c.lease_id)
                .where(uploads.c.id == upload_id)
            ).first()
        if row is None or row.expires_at <= c.now() or row.repository != repo or row.holder != holder:
            raise UploadNotFoundError(f"upload {upload_id} not found in {repo}")
        return _state(row)

    def _lease(self, st: UploadState) -> Lease:
        try:
            return self.leases.attach(st.lease_id, LEASE_KIND, st.holder, self.ttl)
        except LeaseConflictError:
            raise UploadNotFoundError(f"upload {st.id} expired") from None

    def _advance(self, st: UploadState, chunks: tuple[tuple[str, int], ...], size: int) -> UploadState:
        """Compare-and-swap the session from `st.offset` to `size`: UploadRangeError if another
        request moved it first."""
        t = c.now()
        with self.catalog.tx() as conn:
            r = conn.execute(
                update(uploads)
                .where(uploads.c.id == st.id, uploads.c.size == st.offset)
                .values(size=size, chunks=json.dumps([list(x) for x in chunks]), updated_at=t)
            )
            if not r.rowcount:
                now_at = conn.execute(select(uploads.c.size).where(uploads.c.id == st.id)).scalar()
                if now_at is None:
                    raise UploadNotFoundError(f"upload {st.id} not found")
                raise UploadRangeError(f"upload {st.id} is at {now_at}, not {st.offset}", int(now_at))
        return UploadState(
            st.id, st.repository, st.holder, st.lease_id, size, chunks, st.created_at, st.expires_at
        )

    # -- data --------------------------------------------------------------------------------
    def append(
        self, st: UploadState, src: BinaryIO, open_session: OpenSession, start: int | None = None
    ) -> UploadState:
        """Stream `src` into the store as the session's next chunk. `start` (Content-Range):
        where the client says it begins; UploadRangeError unless that is the session's offset."""
        if start is not None and start != st.offset:
            raise UploadRangeError(f"chunk starts at {start}, upload {st.id} is at {st.offset}", st.offset)
        lease = self._lease(st)
        with closing(open_session(lease)) as s:
            d = s.put_blob(src)
        if d.size == 0:
            return st
        return self._advance(st, (*st.chunks, (str(d.digest), d.size)), st.offset + d.size)

    def finish(
        self, st: UploadState, digest: Digest, src: BinaryIO | None, open_session: OpenSession
    ) -> Descriptor:
        """Complete the upload as blob `digest` (with `src` as its last chunk, if any), verified;
        link it to the repository, end the session (its lease keeps holding the blob)."""
        lease = self._lease(st)
        chunks = st.chunks
        with closing(open_session(lease)) as s:
            desc: Descriptor | None = None
            if src is not None:
                if not chunks:
                    # Monolithic: straight to the digest; nothing is stored if it differs.
                    desc = s.put_blob(src, expected=digest)
                else:
                    tail = s.put_blob(src)
                    if tail.size:
                        chunks = (*chunks, (str(tail.digest), tail.size))
            if desc is None:
                desc = self._assemble(s, digest, chunks)
        # Only the request that ends the session links the blob: a racing finish loses here.
        with self.catalog.tx() as conn:
            r = conn.execute(delete(uploads).where(uploads.c.id == st.id, uploads.c.size == st.offset))
            if not r.rowcount:
                raise UploadNotFoundError(f"upload {st.id} was finished or changed meanwhile")
            c.upsert(
                conn,
                c.repo_blobs,
                [{"repository": st.repository, "digest": str(desc.digest), "pushed_at": c.now()}],
                ["repository", "digest"],
                ["pushed_at"],
            )
        return desc

    def _assemble(self, s: HubSession, digest: Digest, chunks: tuple[tuple[str, int], ...]) -> Descriptor:
        size = sum(n for _d, n in chunks)
        if len(chunks) == 1 and chunks[0][0] == digest:
            # The one chunk is the blob (the store named it by its hash when it was written).
            s.hold(digest)
            if self.store.backend.blob_size(digest) != size:
                raise UploadNotFoundError(f"upload data of {digest} is gone (expired?)")
            return Descriptor(digest, size)
        if not chunks:
            return s.put_blob(b"", expected=digest)
        with closing(ChunkReader(self.store, chunks)) as reader:
            return s.put_blob(io.BufferedReader(reader, 1 << 20), expected=digest)

    def cancel(self, st: UploadState) -> None:
        with self.catalog.tx() as conn:
            conn.execute(delete(uploads).where(uploads.c.id == st.id))
        self.leases.release(st.lease_id)

    def iter_live(self) -> Iterator[UploadState]:
        with self.catalog.tx() as conn:
            rows = conn.execute(
                select(uploads, c.leases.c.expires_at).join(c.leases, c.leases.c.id == uploads.c.lease_id)
            ).all()
        for r in rows:
            yield _state(r)


def _state(row: Any) -> UploadState:
    return UploadState(
        row.id,
        row.repository,
        row.holder,
        row.lease_id,
        int(row.size),
        tuple((str(d), int(n)) for d, n in json.loads(row.chunks)),
        float(row.created_at),
        float(row.expires_at),
    )


__all__ = ["UPLOAD_TTL", "UploadState", "Uploads", "uploads"]
