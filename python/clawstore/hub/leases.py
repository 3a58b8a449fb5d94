"""Leases: GC roots held by work in progress, and volume leases (many readers or one writer).

GC leases (`leases` + `lease_resources`): an upload, snapshot or restore holds a lease with an
expiry and adds every digest it is about to reference *before* relying on it. While the lease is
live (expires_at in the future) those digests are GC roots. Adding a digest also "rescues" it
from `gc_trash` (GC's queue of chosen garbage whose objects are not yet deleted): GC deletes an
object only in the same transaction that removes its trash row, so after `add()` commits either
the object is still in the store and will stay, or it is gone and the caller must upload it.

Volume leases: a volume may be held by any number of `ro` holders or by exactly one `rw` holder.
Each lease has a TTL; holders heartbeat to extend it; an expired lease can be taken over by
anyone. Conflicts raise `LeaseConflictError`. Acquisition runs in a transaction that locks the
volume's row (PostgreSQL: SELECT ... FOR UPDATE; SQLite: BEGIN IMMEDIATE), so two processes
cannot both win.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, select, update

from clawstore.errors import ClawstoreError, LeaseConflictError
from clawstore.hub import catalog as c

DEFAULT_TTL = 3600.0


@dataclass
class Lease:
    """A GC lease: the digests added to it are roots until it is released or expires."""

    id: str
    kind: str
    holder: str | None
    expires_at: float
    _leases: Leases
    #: how far each use extends it (the TTL it was created with)
    ttl: float = DEFAULT_TTL

    def add(self, digests: Iterable[str], *, ttl: float | None = None) -> None:
        self._leases.add(self, digests, ttl=ttl)

    def release(self) -> None:
        self._leases.release(self.id)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class VolumeLease:
    id: str
    volume: str
    holder: str
    mode: str
    expires_at: float
    _leases: Leases

    def heartbeat(self, ttl: float | None = None) -> None:
        self.expires_at = self._leases.heartbeat_volume(self.id, ttl)

    def release(self) -> None:
        self._leases.release_volume(self.id)

    def __enter__(self) -> VolumeLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def rescue(conn: Connection, digests: list[str]) -> int:
    """Take `digests` out of GC's trash, and with each rescued manifest everything it reaches
    (index children, referrers, blobs) that is trashed too. Returns how many rows came back."""
    frontier = sorted(set(digests))
    rescued = 0
    while frontier:
        manifests: list[str] = []
        for i in range(0, len(frontier), 500):
            rows = conn.execute(
                delete(c.gc_trash)
                .where(c.gc_trash.c.digest.in_(frontier[i : i + 500]))
                .returning(c.gc_trash.c.digest, c.gc_trash.c.kind)
            ).all()
            rescued += len(rows)
            manifests += [d for d, kind in rows if kind == "manifest"]
        nxt: set[str] = set()
        for i in range(0, len(manifests), 500):
            chunk = manifests[i : i + 500]
            nxt |= {
                r[0]
                for r in conn.execute(
                    select(c.manifest_edges.c.child).where(c.manifest_edges.c.parent.in_(chunk))
                )
            }
            nxt |= {
                r[0]
                for r in conn.execute(
                    select(c.manifest_blobs.c.blob).where(c.manifest_blobs.c.manifest.in_(chunk))
                )
            }
        frontier = sorted(nxt)
    return rescued


class Leases:
    def __init__(self, catalog: c.Catalog) -> None:
        self.catalog = catalog

    # -- GC leases ---------------------------------------------------------------------------
    def create(self, kind: str, holder: str | None = None, ttl: float = DEFAULT_TTL) -> Lease:
        if ttl <= 0:
            raise ClawstoreError("lease ttl must be positive")
        lease_id = secrets.token_hex(16)
        t = c.now()
        with self.catalog.tx() as conn:
            conn.execute(
                c.leases.insert().values(
                    id=lease_id, kind=kind, holder=holder, created_at=t, expires_at=t + ttl
                )
            )
        return Lease(lease_id, kind, holder, t + ttl, self, ttl)

    def add(self, lease: Lease, digests: Iterable[str], *, ttl: float | None = None) -> None:
        ds = sorted({str(d) for d in digests})
        with self.catalog.tx() as conn:
            self.add_in(conn, lease, ds, ttl=ttl)

    def add_in(self, conn: Connection, lease: Lease, digests: list[str], *, ttl: float | None = None) -> None:
        """Within the caller's transaction: make `digests` roots of `lease` and rescue them from
        GC's trash. Extends the lease to `ttl` (or the TTL it was created with) from now - a
        heartbeat for free; never by more: a killed holder blocks GC for one TTL at most."""
        t = c.now()
        row = conn.execute(
            select(c.leases.c.expires_at, c.leases.c.created_at).where(c.leases.c.id == lease.id)
        ).first()
        if row is None or row.expires_at <= t:
            raise LeaseConflictError(f"lease {lease.id} expired or released")
        new_exp = max(row.expires_at, t + (ttl if ttl is not None else lease.ttl))
        conn.execute(update(c.leases).where(c.leases.c.id == lease.id).values(expires_at=new_exp))
        lease.expires_at = new_exp
        if not digests:
            return
        c.upsert(
            conn,
            c.lease_resources,
            [{"lease_id": lease.id, "digest": d} for d in digests],
            ["lease_id", "digest"],
        )
        rescue(conn, digests)

    def attach(self, lease_id: str, kind: str, holder: str | None, ttl: float = DEFAULT_TTL) -> Lease:
        """A live lease created earlier, possibly by another process (registry upload sessions
        span requests): LeaseConflictError if it expired or was released."""
        with self.catalog.tx() as conn:
            exp = conn.execute(select(c.leases.c.expires_at).where(c.leases.c.id == lease_id)).scalar()
        if exp is None or exp <= c.now():
            raise LeaseConflictError(f"lease {lease_id} expired or released")
        return Lease(lease_id, kind, holder, float(exp), self, ttl)

    def release(self, lease_id: str) -> None:
        with self.catalog.tx() as conn:
            conn.execute(delete(c.lease_resources).where(c.lease_resources.c.lease_id == lease_id))
            conn.execute(delete(c.leases).where(c.leases.c.id == lease_id))

    def list(self, holder: str | None = None) -> list[dict[str, object]]:
        """GC leases (with how many digests each holds), oldest first; only `holder`'s if given."""
        with self.catalog.tx() as conn:
            q = (
                select(c.leases, func.count(c.lease_resources.c.digest).label("resources"))
                .select_from(
                    c.leases.outerjoin(c.lease_resources, c.lease_resources.c.lease_id == c.leases.c.id)
                )
                .group_by(*c.leases.c)
                .order_by(c.leases.c.created_at)
            )
            if holder is not None:
                q = q.where(c.leases.c.holder == holder)
            return [dict(r._mapping) for r in conn.execute(q)]

    def list_volume(self, holder: str | None = None) -> list[dict[str, object]]:
        vl = c.volume_leases
        with self.catalog.tx() as conn:
            q = select(vl).order_by(vl.c.created_at)
            if holder is not None:
                q = q.where(vl.c.holder == holder)
            return [dict(r._mapping) for r in conn.execute(q)]

    def holder_of(self, lease_id: str) -> tuple[str, str | None] | None:
        """("gc" | "volume", holder) of a lease id, or None if there is no such lease."""
        with self.catalog.tx() as conn:
            h = conn.execute(select(c.leases.c.holder).where(c.leases.c.id == lease_id)).first()
            if h is not None:
                return "gc", h[0]
            v = conn.execute(select(c.volume_leases.c.holder).where(c.volume_leases.c.id == lease_id)).first()
            return ("volume", v[0]) if v is not None else None

    def expire(self, conn: Connection, t: float) -> int:
        """Delete expired leases (GC calls this in its mark transaction)."""
        dead = select(c.leases.c.id).where(c.leases.c.expires_at <= t)
        conn.execute(delete(c.lease_resources).where(c.lease_resources.c.lease_id.in_(dead)))
        r = conn.execute(delete(c.leases).where(c.leases.c.expires_at <= t))
        conn.execute(delete(c.volume_leases).where(c.volume_leases.c.expires_at <= t))
        # Upload sessions live as long as their lease: an abandoned one goes with it (its chunks,
        # no longer held, are garbage like any unreferenced blob).
        from clawstore.hub.uploads import uploads

        conn.execute(delete(uploads).where(uploads.c.lease_id.not_in(select(c.leases.c.id))))
        return int(r.rowcount or 0)

    # -- volume leases -----------------------------------------------------------------------
    def acquire_volume(self, volume: str, holder: str, mode: str, ttl: float = 60.0) -> VolumeLease:
        if mode not in ("ro", "rw"):
            raise ClawstoreError(f"volume lease mode must be 'ro' or 'rw', not {mode!r}")
        if ttl <= 0:
            raise ClawstoreError("lease ttl must be positive")
        vl = c.volume_leases
        with self.catalog.tx() as conn:
            c.upsert(conn, c.volumes, [{"name": volume, "created_at": c.now()}], ["name"])
            q = select(c.volumes.c.name).where(c.volumes.c.name == volume)
            if conn.dialect.name == "postgresql":
                q = q.with_for_update()
            conn.execute(q).one()
            t = c.now()
            conn.execute(delete(vl).where(vl.c.volume == volume, vl.c.expires_at <= t))  # takeover
            held = conn.execute(select(vl.c.holder, vl.c.mode).where(vl.c.volume == volume)).all()
            if mode == "rw" and held:
                raise LeaseConflictError(
                    f"volume {volume} is held by {', '.join(f'{h} ({m})' for h, m in held)}"
                )
            if mode == "ro" and any(m == "rw" for _h, m in held):
                writer = next(h for h, m in held if m == "rw")
                raise LeaseConflictError(f"volume {volume} is held read-write by {writer}")
            lease_id = secrets.token_hex(16)
            conn.execute(
                vl.insert().values(
                    id=lease_id, volume=volume, holder=holder, mode=mode, created_at=t, expires_at=t + ttl
                )
            )
        return VolumeLease(lease_id, volume, holder, mode, t + ttl, self)

    def heartbeat_volume(self, lease_id: str, ttl: float | None = None) -> float:
        vl = c.volume_leases
        with self.catalog.tx() as conn:
            row = conn.execute(select(vl.c.expires_at, vl.c.created_at).where(vl.c.id == lease_id)).first()
            t = c.now()
            if row is None or row.expires_at <= t:
                raise LeaseConflictError(f"volume lease {lease_id} expired or was taken over")
            exp = t + (ttl if ttl is not None else 60.0)
            conn.execute(update(vl).where(vl.c.id == lease_id).values(expires_at=exp))
            return exp

    def release_volume(self, lease_id: str) -> None:
        with self.catalog.tx() as conn:
            conn.execute(delete(c.volume_leases).where(c.volume_leases.c.id == lease_id))

    def volume_holders(self, volume: str) -> list[tuple[str, str, float]]:
        vl = c.volume_leases
        with self.catalog.tx() as conn:
            rows = conn.execute(
                select(vl.c.holder, vl.c.mode, vl.c.expires_at).where(
                    vl.c.volume == volume, vl.c.expires_at > c.now()
                )
            ).all()
        return [(r.holder, r.mode, r.expires_at) for r in rows]


__all__ = ["DEFAULT_TTL", "Lease", "Leases", "VolumeLease"]
