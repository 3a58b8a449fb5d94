"""Bringing store content into the catalog: shared by sessions (tagging) and GC (reconciling
tags written behind the hub's back)."""

from __future__ import annotations

from sqlalchemy import Connection, select

from clawstore.errors import NotFoundError
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


__all__ = ["ensure_recorded"]
