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
4. drain `gc_trash` in batches (manifests before blobs): thousands of trash rows per catalog
   transaction, their catalog rows (manifest, edges, blob rows) deleted in chunks, each chunk's
   store objects removed with one batched call (S3: DeleteObjects) on a worker while the next
   chunk's catalog work goes on; the transaction commits once its deletes have all ended.
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
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select, text

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
    deleted_objects: int = 0  # store objects removed (S3: keys acknowledged, absent ones too)
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


def _among(pg: bool, column: str) -> str:
    """`column` is one of the digests bound as `:ds` (see `_digest_list`): a PostgreSQL array,
    or a JSON array that SQLite's json_each unpacks (one parameter, not one per digest)."""
    return f"{column} = ANY(:ds)" if pg else f"{column} IN (SELECT value FROM json_each(:ds))"


def _digest_list(pg: bool, digests: list[str]) -> Any:
    """The `:ds` parameter of `_among`."""
    return digests if pg else json.dumps(digests)


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
        """Make catalog tags equal the store's tags. Returns how many catalog tags changed.
        The store's tags are read in parallel first; only those that differ from the catalog
        get a transaction, in which the tag is read again (a writer may have moved it since)."""
        store = self._need_store()
        seen = self._store_tags(store)
        with self._tx(conn) as cx:
            cat = {(r.repository, r.tag): r.digest for r in cx.execute(select(c.tags))}
        changed = 0
        for repo, tag in sorted(set(seen) | set(cat)):
            if (repo, tag) in seen and seen[(repo, tag)] == cat.get((repo, tag)):
                continue
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

    @staticmethod
    def _store_tags(store: ArtifactStore) -> dict[tuple[str, str], str]:
        """Every tag of the store and what it names, read `store.read_concurrency` at a time
        (S3: one GET each)."""
        refs = [(repo, tag) for repo in store.list_repos() for tag in store.list_tags(repo)]

        def resolve(ref: tuple[str, str]) -> str | None:
            try:
                return str(store.resolve(*ref))
            except RefNotFoundError:
                return None

        if not refs:
            return {}
        with ThreadPoolExecutor(max(1, min(store.read_concurrency, len(refs)))) as pool:
            return {ref: d for ref, d in zip(refs, pool.map(resolve, refs), strict=True) if d is not None}

    # -- 2. orphans --------------------------------------------------------------------------
    def adopt_orphans(self, conn: Connection | None = None) -> int:
        """Record store objects the catalog does not know, as adopted. The store is listed with
        sizes (S3: the fanout's prefixes in parallel, no HEAD per object); only unknown
        manifests are read (to record their edges)."""
        store = self._need_store()
        adopted = 0
        for kind, it, table in (
            ("manifest", store.iter_manifest_sizes(), c.manifests),
            ("blob", store.iter_blob_sizes(), c.blobs),
        ):
            for batch in _chunks(it, BATCH):
                sizes = {str(d): size for d, size in batch}
                keys = list(sizes)
                # Exclusive (on PostgreSQL): adoption writes rows pushes also write, in another
                # order; excluding pushes for the batch avoids lock-order deadlocks.
                with self._tx(conn, exclusive=True) as cx:
                    known = {r[0] for r in cx.execute(select(table.c.digest).where(table.c.digest.in_(keys)))}
                    known |= {
                        r[0]
                        for r in cx.execute(select(c.gc_trash.c.digest).where(c.gc_trash.c.digest.in_(keys)))
                    }
                    t = c.now()
                    unknown = [d for d in keys if d not in known]
                    if kind == "blob":
                        rows = [
                            {"digest": d, "size": sizes[d], "created_at": t, "seen_at": t, "adopted": True}
                            for d in unknown
                        ]
                        c.upsert(cx, c.blobs, rows, ["digest"])
                        adopted += len(unknown)
                        continue
                    for d in unknown:
                        try:
                            data = store.get_manifest(d)
                            c.record_manifest(cx, d, parse_manifest(data), len(data), t=t, adopted=True)
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
        for (repo, tag), target in sorted(self._store_tags(store).items()):
            n = rescue(conn, [target])
            rescued += n
            current = conn.execute(
                select(c.tags.c.digest).where(c.tags.c.repository == repo, c.tags.c.tag == tag)
            ).scalar()
            if current != target and ensure_recorded(conn, store, target):
                c.set_tag(conn, repo, tag, target, actor="gc-reconcile")
        return rescued

    # -- 4. sweep ----------------------------------------------------------------------------
    def drain(self, batch: int | None = None, chunk: int | None = None) -> tuple[int, int]:
        """Delete trashed objects from the store, manifests before blobs.

        Trash rows are taken `batch` at a time per catalog transaction, walked by digest
        (keyset pagination on the primary key: no re-sorting, no re-scanning), and handled
        `chunk` rows at a time (default: what one backend call deletes in one request, S3's
        DeleteObjects limit): a chunk's trash and catalog rows are deleted, its objects handed
        to a worker (`store.remove_concurrency` of them) for one batched delete, and the next
        chunk's catalog work goes on meanwhile. The transaction commits only once every delete
        it started has ended: an object goes only while the transaction that removed its trash
        row is open, so a push that rescues the digest (which waits for that transaction) then
        finds the object gone, never the reverse. A failed delete (or a kill) rolls the
        transaction back after its deletes ended: the rows stay in the trash, and the next
        drain deletes them again (absent objects are no error).
        Returns (rows drained, objects removed)."""
        store = self._need_store()
        # Enough rows per transaction to keep every delete worker busy with a full request.
        # SQLite: four times as many, since each of its transactions rewrites (in the WAL) every
        # page its scattered index deletions touch; fewer, larger ones halve the bytes written.
        default = BATCH * (4 if self.catalog.dialect == "sqlite" else 1)
        batch = max(1, batch or max(default, store.remove_batch * store.remove_concurrency))
        chunk = max(1, min(chunk or store.remove_batch, batch))
        drained = removed = 0
        with ThreadPoolExecutor(max(1, store.remove_concurrency), thread_name_prefix="gc-sweep") as pool:
            for kind in ("manifest", "blob"):
                delete_objects = store.delete_manifests if kind == "manifest" else store.delete_blobs
                last = ""
                while True:
                    with self.catalog.tx() as conn:
                        scanned, picked = self._pick(conn, kind, last, batch)
                        if not scanned:
                            break
                        last = scanned
                        futures: list[Future[int]] = []
                        try:
                            for i in range(0, len(picked), chunk):
                                gone = self._forget(conn, kind, picked[i : i + chunk])
                                if gone:
                                    futures.append(pool.submit(delete_objects, gone))
                                drained += len(gone)
                        except BaseException:
                            for f in futures:
                                f.cancel()  # not started: its objects stay, its rows come back
                            raise
                        finally:
                            wait(futures)  # never commit (or roll back) with a delete in flight
                        removed += sum(f.result() for f in futures)  # a failure rolls back
        return drained, removed

    @staticmethod
    def _pick(conn: Connection, kind: str, after: str, n: int) -> tuple[str, list[str]]:
        """The next `n` trash rows of `kind` after `after`, locked for this transaction (on
        PostgreSQL FOR UPDATE SKIP LOCKED: a row a push is rescuing right now is skipped, and no
        push can rescue a picked row until this transaction ends; SQLite has one writer).
        Returns the last digest scanned ("" when the trash holds no more) and the picked rows
        to delete.

        A blob a manifest still references is left out: that manifest's trash row was skipped by
        the manifest pass (a push is rescuing it right now, and with it its blobs; deleting them
        would leave it a torso) or it is live. It stays in the trash for the next collection to
        decide. The check is a second statement over the picked digests (one index probe each on
        `manifest_blobs.blob`), not a NOT EXISTS in the pick: PostgreSQL planned that as an
        anti-join over the whole edge table for every batch (128 s instead of 22 s for 550,000
        rows in bench_gc)."""
        pg = conn.dialect.name == "postgresql"
        lock = " FOR UPDATE SKIP LOCKED" if pg else ""
        rows = [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT digest FROM gc_trash WHERE kind = :kind AND digest > :after "
                    f"ORDER BY digest LIMIT :n{lock}"
                ),
                {"kind": kind, "after": after, "n": n},
            ).fetchall()
        ]
        if not rows or kind != "blob":
            return (rows[-1] if rows else ""), rows
        referenced = {
            r[0]
            for r in conn.execute(
                text(f"SELECT DISTINCT mb.blob FROM manifest_blobs mb WHERE {_among(pg, 'mb.blob')}"),
                {"ds": _digest_list(pg, rows)},
            )
        }
        return rows[-1], [d for d in rows if d not in referenced] if referenced else rows

    @staticmethod
    def _forget(conn: Connection, kind: str, digests: list[str]) -> list[str]:
        """Delete the trash rows of `digests` (picked, so locked by this transaction) and their
        catalog rows; returns the digests whose trash row was still there. The digest list goes
        to the database as one parameter (a PostgreSQL array, a JSON array that SQLite's
        json_each unpacks), not one bind parameter per digest."""
        pg = conn.dialect.name == "postgresql"
        if kind == "manifest":
            dependents = (
                "DELETE FROM manifest_blobs WHERE {}",
                "DELETE FROM manifest_edges WHERE kind = 'child' AND {}",
                "DELETE FROM manifest_edges WHERE kind = 'referrer' AND {}",
                "DELETE FROM repo_manifests WHERE {}",
                "DELETE FROM manifests WHERE {}",
            )
            columns = ("manifest", "parent", "child", "digest", "digest")
        else:
            # An uploaded or mounted blob's repository link goes with it (registry uploads).
            dependents = ("DELETE FROM blobs WHERE {}", "DELETE FROM repo_blobs WHERE {}")
            columns = ("digest", "digest")
        if pg:
            # One statement, one round trip and one array parameter: data-modifying CTEs all
            # run (to completion, on one snapshot) whether or not the final SELECT reads them.
            ctes = ", ".join(
                f"d{i} AS ({stmt.format(f'{col} IN (SELECT digest FROM gone)')})"
                for i, (stmt, col) in enumerate(zip(dependents, columns, strict=True))
            )
            sql = (
                f"WITH gone AS (DELETE FROM gc_trash WHERE {_among(pg, 'digest')} RETURNING digest), "
                f"{ctes} SELECT digest FROM gone"
            )
            return [r[0] for r in conn.execute(text(sql), {"ds": _digest_list(pg, digests)}).fetchall()]
        gone = [
            r[0]
            for r in conn.execute(
                text(f"DELETE FROM gc_trash WHERE {_among(pg, 'digest')} RETURNING digest"),
                {"ds": _digest_list(pg, digests)},
            ).fetchall()
        ]
        if gone:
            ds = _digest_list(pg, gone)
            for stmt, col in zip(dependents, columns, strict=True):
                conn.execute(text(stmt.format(_among(pg, col))), {"ds": ds})
        return gone

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
        sweep_batch: int | None = None,
        sweep_chunk: int | None = None,
    ) -> GCReport:
        """One collection (see the module docstring). `sweep_batch`: trash rows per catalog
        transaction of the sweep (default BATCH); `sweep_chunk`: rows per batched store delete
        (default: the backend's, S3's DeleteObjects limit)."""
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
                _drained, report.deleted_objects = self.drain(sweep_batch, sweep_chunk)
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
