"""Online mark-and-sweep garbage collection of the store, driven by the catalog.

Roots: tags, pins, digests held by live leases, and manifests seen (pushed or recorded) within
the grace period. Liveness flows along `manifest_edges` (index -> child, subject -> referrer),
so referrers of live subjects live; live manifests keep their blobs. Everything else that the
catalog knows is garbage once its `seen_at` is older than the grace period.

One run:
1. reconcile tags: make catalog tags equal the store's (the store is the source of truth for
   refs; writers that bypass the hub still get their tags counted as roots). Each differing tag
   is re-read from the store inside the catalog transaction that fixes it.
2. adopt orphans (optional scan): store objects the catalog does not know (a crash between store
   write and catalog write, or writes that bypass the hub) are recorded with `adopted=true`.
   An adopted row is only collectable once no lease older than its adoption is live, because the
   push that wrote it may not have recorded it yet.
3. mark, in one exclusive catalog transaction, in SQL: a recursive CTE over the roots into a
   temporary table, then INSERT ... SELECT the garbage into `gc_trash`. Then, still inside it,
   re-read the store's tags: whatever a tag written since step 1 names (by a writer that knows
   no catalog) comes back out of the trash before anything is deleted.
4. drain `gc_trash` in batches: each batch's trash rows, its catalog rows (manifest, edges, blob
   rows) and its store objects are deleted in one transaction (manifests before blobs).
5. store.cleanup(): temp files and stale uploads.

Why a push is safe even with grace 0 (the protocol `clawstore.hub.Hub` follows): a push holds a
lease and adds each digest to it *before* relying on the object (`has_blob`, `put_blob` with a
known digest, `put_manifest` for the manifest and everything it references). Adding rescues the
digest from `gc_trash` (a rescued manifest brings back what it reaches). Since step 3 runs
with the catalog locked exclusively, a digest added before it is a root, and a digest added
after it is rescued from the trash unless step 4 has already removed the object in a committed
transaction, in which case the pusher sees the object missing and uploads it again (or
`put_manifest` / `tag` refuse the dangling reference).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, select, text

from clawstore.errors import ClawstoreError, NotFoundError, RefNotFoundError
from clawstore.hub import catalog as c
from clawstore.hub.records import ensure_recorded
from clawstore.manifest import parse_manifest
from clawstore.store import ArtifactStore

BATCH = 5000
INF = float("inf")


@dataclass
class GCReport:
    dry_run: bool
    grace: float
    manifests: int = 0
    manifest_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    deleted_objects: int = 0  # store objects actually removed (not already absent)
    adopted: int = 0
    tags_reconciled: int = 0
    rescued_by_store_tags: int = 0  # trash rows a store tag written during the run took back
    expired_leases: int = 0
    temp_removed: int = 0
    temp_bytes: int = 0
    seconds: float = 0.0
    mark_seconds: float = 0.0
    garbage: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, digest, size), capped

    @property
    def bytes(self) -> int:
        return self.manifest_bytes + self.blob_bytes

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"{verb} {self.manifests} manifests ({self.manifest_bytes} bytes) and {self.blobs} blobs "
            f"({self.blob_bytes} bytes); adopted {self.adopted} orphans, reconciled "
            f"{self.tags_reconciled} tags, removed {self.temp_removed} temp files ({self.temp_bytes} bytes) "
            f"in {self.seconds:.2f}s"
        )


def _chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


class GarbageCollector:
    def __init__(self, catalog: c.Catalog, store: ArtifactStore | None) -> None:
        self.catalog = catalog
        self.store = store

    # -- 1. tags -----------------------------------------------------------------------------
    def reconcile_tags(self, conn: Connection | None = None) -> int:
        """Make catalog tags equal the store's tags. Returns how many catalog tags changed."""
        store = self._need_store()
        store_refs: set[tuple[str, str]] = set()
        for repo in store.list_repos():
            for tag in store.list_tags(repo):
                store_refs.add((repo, tag))
        with self._tx(conn) as cx:
            cat = {(r.repository, r.tag): r.digest for r in cx.execute(select(c.tags))}
        changed = 0
        for repo, tag in sorted(store_refs | set(cat)):
            with self._tx(conn, exclusive=True) as cx:
                current = cx.execute(
                    select(c.tags.c.digest).where(c.tags.c.repository == repo, c.tags.c.tag == tag)
                ).scalar()
                try:
                    target: str | None = str(store.resolve(repo, tag))
                except RefNotFoundError:
                    target = None
                if target == current:
                    continue
                if target is not None and not ensure_recorded(cx, store, target):
                    continue  # dangling store tag: fsck reports it
                c.set_tag(cx, repo, tag, target, actor="gc-reconcile")
                changed += 1
        return changed

    # -- 2. orphans --------------------------------------------------------------------------
    def adopt_orphans(self, conn: Connection | None = None) -> int:
        store = self._need_store()
        adopted = 0
        for kind, it, table in (
            ("manifest", store.iter_manifests(), c.manifests),
            ("blob", store.iter_blobs(), c.blobs),
        ):
            for batch in _chunks(it, BATCH):
                keys = [str(d) for d in batch]
                # Exclusive (on PostgreSQL): adoption writes rows pushes also write, in another
                # order; excluding pushes for the batch avoids lock-order deadlocks.
                with self._tx(conn, exclusive=True) as cx:
                    known = {r[0] for r in cx.execute(select(table.c.digest).where(table.c.digest.in_(keys)))}
                    known |= {
                        r[0]
                        for r in cx.execute(select(c.gc_trash.c.digest).where(c.gc_trash.c.digest.in_(keys)))
                    }
                    t = c.now()
                    for d in keys:
                        if d in known:
                            continue
                        try:
                            if kind == "manifest":
                                data = store.get_manifest(d)
                                c.record_manifest(cx, d, parse_manifest(data), len(data), t=t, adopted=True)
                            else:
                                c.record_blob(cx, d, store.stat_blob(d), t, adopted=True)
                        except (NotFoundError, ClawstoreError):
                            continue  # vanished meanwhile, or unreadable: fsck's business
                        adopted += 1
        return adopted

    # -- 3. mark -----------------------------------------------------------------------------
    def mark(
        self,
        conn: Connection,
        *,
        grace: float,
        dry_run: bool,
        force: list[str] | None = None,
        list_limit: int = 0,
    ) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str, int]], int]:
        """Choose garbage and, unless dry_run, queue it in gc_trash (drain deletes it).
        Returns ({kind: (count, bytes)}, up to list_limit [(kind, digest, size)], expired leases).
        `force`: manifests that do not get the grace period's protection (retention's deletion of
        untagged manifests)."""
        t = c.now()
        cutoff = t - grace
        pg = conn.dialect.name == "postgresql"
        on_commit = " ON COMMIT DROP" if pg else ""
        if pg:
            conn.exec_driver_sql("SET LOCAL work_mem = '128MB'")  # hash anti-joins stay in memory
        for name in ("gc_live", "gc_force", "gc_garbage"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {'' if pg else 'temp.'}{name}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE gc_live (digest VARCHAR(200) PRIMARY KEY){on_commit}")
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE gc_force (digest VARCHAR(200) PRIMARY KEY){on_commit}")
        conn.exec_driver_sql(
            "CREATE TEMPORARY TABLE gc_garbage (digest VARCHAR(200) PRIMARY KEY, kind VARCHAR(16) NOT NULL,"
            f" size BIGINT NOT NULL){on_commit}"
        )
        if force:
            conn.execute(
                text("INSERT INTO gc_force (digest) VALUES (:d)"), [{"d": d} for d in sorted(set(force))]
            )
        expired = 0
        if not dry_run:
            from clawstore.hub.leases import Leases

            expired = Leases(self.catalog).expire(conn, t)
        oldest = conn.execute(
            text("SELECT MIN(created_at) FROM leases WHERE expires_at > :t"), {"t": t}
        ).scalar()
        oldest_lease = float(oldest) if oldest is not None else t + 1.0
        params = {"t": t, "cutoff": cutoff, "oldest": oldest_lease}
        conn.execute(
            text(
                """
                INSERT INTO gc_live (digest)
                WITH RECURSIVE live(digest) AS (
                    SELECT digest FROM tags
                    UNION SELECT digest FROM pins
                    UNION SELECT lr.digest FROM lease_resources lr JOIN leases l ON l.id = lr.lease_id
                          WHERE l.expires_at > :t
                    UNION SELECT m.digest FROM manifests m
                          WHERE m.seen_at >= :cutoff
                            AND NOT EXISTS (SELECT 1 FROM gc_force f WHERE f.digest = m.digest)
                    UNION SELECT e.child FROM manifest_edges e JOIN live ON e.parent = live.digest
                )
                SELECT digest FROM live
                """
            ),
            params,
        )
        conn.execute(
            text(
                """
                INSERT INTO gc_garbage (digest, kind, size)
                SELECT m.digest, 'manifest', m.size FROM manifests m
                WHERE NOT EXISTS (SELECT 1 FROM gc_live l WHERE l.digest = m.digest)
                  AND (m.adopted = false OR m.created_at < :oldest)
                  AND NOT EXISTS (SELECT 1 FROM gc_trash x WHERE x.digest = m.digest)
                """
            ),
            params,
        )
        conn.execute(
            text(
                """
                INSERT INTO gc_garbage (digest, kind, size)
                SELECT b.digest, 'blob', b.size FROM blobs b
                WHERE b.seen_at < :cutoff
                  AND (b.adopted = false OR b.created_at < :oldest)
                  AND NOT EXISTS (SELECT 1 FROM gc_live l WHERE l.digest = b.digest)
                  AND NOT EXISTS (SELECT 1 FROM manifest_blobs mb JOIN gc_live l ON l.digest = mb.manifest
                                  WHERE mb.blob = b.digest)
                  AND NOT EXISTS (SELECT 1 FROM gc_trash x WHERE x.digest = b.digest)
                """
            ),
            params,
        )
        totals = {
            r[0]: (int(r[1]), int(r[2] or 0))
            for r in conn.execute(text("SELECT kind, COUNT(*), SUM(size) FROM gc_garbage GROUP BY kind"))
        }
        listing: list[tuple[str, str, int]] = []
        if list_limit > 0:
            listing = [
                (r[0], r[1], int(r[2]))
                for r in conn.execute(
                    text("SELECT kind, digest, size FROM gc_garbage ORDER BY kind DESC, digest LIMIT :n"),
                    {"n": list_limit},
                )
            ]
        if not dry_run and totals:
            conn.execute(
                text(
                    "INSERT INTO gc_trash (digest, kind, size, queued_at) "
                    "SELECT g.digest, g.kind, g.size, :t FROM gc_garbage g"
                ),
                params,
            )
        if not pg:
            for name in ("gc_live", "gc_force", "gc_garbage"):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{name}")
        return totals, listing, expired

    def protect_store_tags(self, conn: Connection) -> int:
        """Re-read the store's tags inside the exclusive mark section, after the garbage is
        chosen and before anything is deleted, and take every manifest a tag names (with all
        it reaches) back out of `gc_trash`; record such tags in the catalog. A writer that knows
        no catalog (or a replica between its store and catalog writes) may have tagged an old
        manifest after step 1 read the tags: its tag still protects it (containerd re-marks the
        same way). Returns how many trash rows came back."""
        from clawstore.hub.leases import rescue

        if conn.execute(select(c.gc_trash.c.digest).limit(1)).first() is None:
            return 0  # nothing queued for deletion: nothing to protect
        store = self._need_store()
        rescued = 0
        for repo in store.list_repos():
            for tag in store.list_tags(repo):
                try:
                    target = str(store.resolve(repo, tag))
                except RefNotFoundError:
                    continue
                n = rescue(conn, [target])
                rescued += n
                current = conn.execute(
                    select(c.tags.c.digest).where(c.tags.c.repository == repo, c.tags.c.tag == tag)
                ).scalar()
                if current != target and ensure_recorded(conn, store, target):
                    c.set_tag(conn, repo, tag, target, actor="gc-reconcile")
        return rescued

    # -- 4. sweep ----------------------------------------------------------------------------
    def drain(self, batch: int = BATCH) -> tuple[int, int]:
        """Delete trashed objects from the store, manifests before blobs, in batches walked by
        digest (keyset pagination on the primary key: no re-sorting, no re-scanning).
        Returns (rows drained, objects removed)."""
        store = self._need_store()
        drained = removed = 0
        for kind in ("manifest", "blob"):
            last = ""
            while True:
                with self.catalog.tx() as conn:
                    pick = (
                        select(c.gc_trash.c.digest)
                        .where(c.gc_trash.c.kind == kind, c.gc_trash.c.digest > last)
                        .order_by(c.gc_trash.c.digest)
                        .limit(batch)
                    )
                    if conn.dialect.name == "postgresql":
                        pick = pick.with_for_update(skip_locked=True)
                    picked = [r[0] for r in conn.execute(pick)]
                    if not picked:
                        break
                    last = picked[-1]
                    # A push that rescued a digest meanwhile deleted its row: not RETURNed here.
                    rows = conn.execute(
                        delete(c.gc_trash)
                        .where(c.gc_trash.c.digest.in_(picked))
                        .returning(c.gc_trash.c.digest)
                    ).all()
                    gone = [r[0] for r in rows]
                    if kind == "manifest" and gone:
                        conn.execute(delete(c.manifest_blobs).where(c.manifest_blobs.c.manifest.in_(gone)))
                        e = c.manifest_edges
                        conn.execute(delete(e).where(e.c.kind == "child", e.c.parent.in_(gone)))
                        conn.execute(delete(e).where(e.c.kind == "referrer", e.c.child.in_(gone)))
                        conn.execute(delete(c.repo_manifests).where(c.repo_manifests.c.digest.in_(gone)))
                        conn.execute(delete(c.manifests).where(c.manifests.c.digest.in_(gone)))
                    elif gone:
                        conn.execute(delete(c.blobs).where(c.blobs.c.digest.in_(gone)))
                        conn.execute(delete(c.repo_blobs).where(c.repo_blobs.c.digest.in_(gone)))
                    # Objects go inside the transaction that removed their trash rows: a push
                    # that rescues a digest waits for this commit and then finds the object gone.
                    for (digest,) in rows:
                        try:
                            (store.delete_manifest if kind == "manifest" else store.delete_blob)(digest)
                            removed += 1
                        except NotFoundError:
                            pass
                    drained += len(rows)
        return drained, removed

    # -- the whole run -----------------------------------------------------------------------
    def run(
        self,
        *,
        grace: float = 3600.0,
        dry_run: bool = False,
        scan_store: bool = True,
        reconcile: bool = True,
        force: list[str] | None = None,
        cleanup_older_than: float = 3600.0,
        list_limit: int = 10000,
    ) -> GCReport:
        if grace < 0:
            raise ClawstoreError("grace must not be negative")
        start = time.perf_counter()
        report = GCReport(dry_run=dry_run, grace=grace)
        if dry_run:
            # Everything, including catalog repairs, in one transaction that is rolled back.
            with self.catalog.engine.connect() as conn:
                tx = conn.begin()
                try:
                    if self.catalog.dialect == "postgresql":
                        conn.execute(text("SELECT id FROM catalog_lock WHERE id = 1 FOR SHARE"))
                    if reconcile and self.store is not None:
                        report.tags_reconciled = self.reconcile_tags(conn)
                    if scan_store and self.store is not None:
                        report.adopted = self.adopt_orphans(conn)
                    m0 = time.perf_counter()
                    totals, garbage, _ = self.mark(
                        conn, grace=grace, dry_run=True, force=force, list_limit=list_limit
                    )
                    report.mark_seconds = time.perf_counter() - m0
                finally:
                    tx.rollback()
        else:
            if reconcile and self.store is not None:
                report.tags_reconciled = self.reconcile_tags()
            if scan_store and self.store is not None:
                report.adopted = self.adopt_orphans()
            m0 = time.perf_counter()
            with self.catalog.tx(exclusive=True) as conn:
                totals, garbage, report.expired_leases = self.mark(
                    conn, grace=grace, dry_run=False, force=force, list_limit=list_limit
                )
                if self.store is not None:
                    report.rescued_by_store_tags = self.protect_store_tags(conn)
            report.mark_seconds = time.perf_counter() - m0
            if self.store is not None:
                _drained, report.deleted_objects = self.drain()
                cr = self.store.cleanup(cleanup_older_than)
                report.temp_removed, report.temp_bytes = cr.removed, cr.bytes
        report.garbage = garbage
        report.manifests, report.manifest_bytes = totals.get("manifest", (0, 0))
        report.blobs, report.blob_bytes = totals.get("blob", (0, 0))
        report.seconds = time.perf_counter() - start
        return report

    # -- helpers -----------------------------------------------------------------------------
    def _need_store(self) -> ArtifactStore:
        if self.store is None:
            raise ClawstoreError("this operation needs the store")
        return self.store

    @contextlib.contextmanager
    def _tx(self, conn: Connection | None, *, exclusive: bool = False) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self.catalog.tx(exclusive=exclusive) as cx:
                yield cx


__all__ = ["GCReport", "GarbageCollector"]
