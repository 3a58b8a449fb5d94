"""Bringing store content into the catalog: shared by sessions (tagging) and GC (reconciling
tags written behind the hub's back)."""

from __future__ import annotations

from concurrent.futures import Executor

from sqlalchemy import Connection, select

from clawstore.errors import NotFoundError, RefNotFoundError
from clawstore.hub import catalog as c
from clawstore.hub.leases import rescue
from clawstore.manifest import parse_manifest
from clawstore.store import ArtifactStore


def ensure_recorded(conn: Connection, store: ArtifactStore, digest: str) -> bool:
    """Within `conn`'s transaction: make sure the catalog records manifest `digest` (reading it
    from `store`, verified, with its index children when the catalog lacks it) and take it and
    what it references out of GC's trash. False if neither the catalog nor the store has it."""
    if conn.execute(select(c.manifests.c.digest).where(c.manifests.c.digest == digest)).first():
        rescue(conn, [digest])
        return True
    try:
        data = store.get_manifest(digest)
    except NotFoundError:
        return False
    m = parse_manifest(data)
    c.record_manifest(conn, digest, m, len(data))
    rescue(conn, [digest, *(str(d.digest) for d in m.blobs())])
    for child in getattr(m, "manifests", ()):
        ensure_recorded(conn, store, str(child.digest))
    return True


def mirror_tag(
    conn: Connection, store: ArtifactStore, repo: str, tag: str, *, wrote: str | None, actor: str
) -> str | None:
    """Within `conn`'s transaction, after a write of `repo:tag` to the store (`wrote`: the digest
    written, None for an untag): lock the tag, read it from the store again and record in the
    catalog what the store says now. Returns it.

    Every catalog write of a tag after a store write goes through here (sessions, retention,
    cache eviction) so that the catalog's writes of one tag happen in the order of the store
    reads they copy: two writers' store writes and catalog transactions cannot cross (A stores,
    B stores, B records B, A records A: store B, catalog A), and a writer whose store write was
    overtaken (retention untagged after our tag) records the store's newer state, not its own
    older one. The lock is a PostgreSQL transaction advisory lock on the tag; SQLite runs one
    write transaction at a time anyway. A move recorded for someone else's store write is
    attributed to `reconcile:<actor>`; a store tag naming a manifest that exists nowhere is left
    to fsck."""
    return mirror_tags(conn, store, [(repo, tag, wrote)], actor=actor)[0]


def mirror_tags(
    conn: Connection,
    store: ArtifactStore,
    written: list[tuple[str, str, str | None]],
    *,
    actor: str,
    pool: Executor | None = None,
) -> list[str | None]:
    """`mirror_tag` for many (repo, tag, wrote): every lock first (in sorted order, so two such
    transactions cannot deadlock), then the store's tags read through `pool` (S3: one GET each,
    side by side), then the catalog writes. Returns what the store said, in `written`'s order."""
    for repo, tag in sorted({(r, t) for r, t, _w in written}):
        c.lock_tag(conn, repo, tag)

    def read(item: tuple[str, str, str | None]) -> str | None:
        try:
            return str(store.resolve(item[0], item[1]))
        except RefNotFoundError:
            return None

    now = (
        list(pool.map(read, written)) if pool is not None and len(written) > 1 else [read(w) for w in written]
    )
    for (repo, tag, wrote), d in zip(written, now, strict=True):
        if d is not None and d != wrote and not ensure_recorded(conn, store, d):
            continue
        c.set_tag(conn, repo, tag, d, actor=actor if d == wrote else f"reconcile:{actor}")
    return now


__all__ = ["ensure_recorded", "mirror_tag", "mirror_tags"]
