"""Hub benchmarks: GC mark-and-sweep at catalog scale, and incremental checkpoints.

    python benches/bench_gc.py                 # everything (SQLite + PostgreSQL if reachable)
    python benches/bench_gc.py --only gc --manifests 100000 --blobs-per-manifest 10
    python benches/bench_gc.py --only checkpoint --files 10000

GC: the catalog is populated directly (bulk INSERT on SQLite, COPY on PostgreSQL) with N
manifests, each referencing K blobs of its own (N*K blob rows and N*K manifest->blob edges);
every other manifest is tagged, so half the manifests and half the blobs are garbage. The store
is an empty local store: the sweep really runs (gc_trash drained in batches, one batched delete
call per chunk of 1,000 objects) but every delete finds nothing, so the timing is the catalog's
plus the delete calls, not disk unlinks. Reported: populate time, dry-run time, full run time
(mark and sweep separately), the CPU seconds (user+sys) of this process for the whole run and
for the sweep, of PostgreSQL's processes (a PostgreSQL catalog; other clients' work on a shared
machine counts too), the bytes this process wrote (SQLite's WAL and database file) and the
benchmark process' peak RSS.

Checkpoint: a 10,000-file session (sizes 16-112 KiB, mtimes an hour old), checkpoint 1, then
change 1% of the files and checkpoint 2 (parent = 1). Reported: time and bytes uploaded (data
and manifest+config separately) of each, and the ratios. Run on a plain local store and through
a hub session (SQLite catalog).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clawstore
from clawstore import checkpoints as cp
from clawstore.hub import Catalog, GarbageCollector, Hub, Principal
from clawstore.hub import catalog as c

PG_URL = os.environ.get("CLAWSTORE_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ADMIN = Principal.local_admin()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pg_cpu() -> float:
    """CPU seconds of every PostgreSQL process on this machine (the server's share of a run;
    other clients' work counts too on a shared machine)."""
    import psutil

    total = 0.0
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("postgres"):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def written() -> int:
    """Bytes this process has written to storage (SQLite's WAL and database file)."""
    import psutil

    return int(psutil.Process().io_counters().write_bytes)


def fake_digest(kind: str, i: int) -> str:
    return "sha256:" + hashlib.sha256(f"{kind}{i}".encode()).hexdigest()


def populate(cat: Catalog, n_manifests: int, per: int) -> None:
    t = time.time() - 86400
    mt = "application/vnd.oci.image.manifest.v1+json"

    def manifest_rows():
        for j in range(n_manifests):
            yield (fake_digest("m", j), mt, "application/vnd.bench", 500 + per * 100, None, None, t, t, False)

    def blob_rows():
        for i in range(n_manifests * per):
            yield (fake_digest("b", i), 4096 + i % 1000, t, t, False)

    def edge_rows():
        for j in range(n_manifests):
            md = fake_digest("m", j)
            for k in range(per):
                yield (md, fake_digest("b", j * per + k))

    def tag_rows():
        for j in range(0, n_manifests, 2):
            yield ("bench/repo", f"t{j}", fake_digest("m", j), t)

    tables = [
        (
            "manifests",
            "digest, media_type, artifact_type, size, subject, config, created_at, seen_at, adopted",
            manifest_rows,
        ),
        ("blobs", "digest, size, created_at, seen_at, adopted", blob_rows),
        ("manifest_blobs", "manifest, blob", edge_rows),
        ("tags", "repository, tag, digest, updated_at", tag_rows),
    ]
    with cat.engine.begin() as conn:
        raw = conn.connection.driver_connection
        for name, cols, rows in tables:
            if cat.dialect == "postgresql":
                cur = raw.cursor()
                with cur.copy(f"COPY {name} ({cols}) FROM STDIN") as copy:
                    for r in rows():
                        copy.write_row(r)
            else:
                ncols = len(cols.split(","))
                cur = raw.cursor()
                cur.executemany(f"INSERT INTO {name} ({cols}) VALUES ({','.join('?' * ncols)})", rows())
        c.ensure_repository(conn, "bench/repo")
        if cat.dialect == "postgresql":
            for name, *_ in tables:
                conn.exec_driver_sql(f"ANALYZE {name}")
        else:
            conn.exec_driver_sql("ANALYZE")


def sql_profiler(cat: Catalog, profile: dict[str, list[float]]) -> Callable[[], None]:
    """Attach cursor-execute listeners that add each statement's time under its first 90
    characters (whitespace folded); returns a function that detaches them."""
    from sqlalchemy import event

    def before(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        key = " ".join(statement.split())[:90]
        entry = profile.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())

    event.listen(cat.engine, "before_cursor_execute", before)
    event.listen(cat.engine, "after_cursor_execute", after)

    def detach() -> None:
        event.remove(cat.engine, "before_cursor_execute", before)
        event.remove(cat.engine, "after_cursor_execute", after)

    return detach


def bench_gc(
    kind: str, n_manifests: int, per: int, profile: dict[str, list[float]] | None = None
) -> dict[str, float | int | str]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    schema = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'catalog.sqlite'}"
    else:
        url, schema = PG_URL, f"bench_{uuid.uuid4().hex[:10]}"
    cat = Catalog(url, schema=schema)
    try:
        t0 = time.perf_counter()
        populate(cat, n_manifests, per)
        t_pop = time.perf_counter() - t0
        hub = Hub(clawstore.open(tmp / "store"), cat)
        dry = hub.gc(ADMIN, grace=3600, dry_run=True, scan_store=False, reconcile=False, list_limit=0)
        sweep_cpu: list[float] = []
        real_drain = GarbageCollector.drain

        def timed_drain(self: GarbageCollector, *a: object, **kw: object) -> tuple[int, int]:
            c0 = time.process_time()
            try:
                return real_drain(self, *a, **kw)  # type: ignore[arg-type]
            finally:
                sweep_cpu.append(time.process_time() - c0)

        GarbageCollector.drain = timed_drain  # type: ignore[method-assign]
        detach = sql_profiler(cat, profile) if profile is not None else None
        c0, pg0, io0 = time.process_time(), pg_cpu(), written()
        try:
            real = hub.gc(ADMIN, grace=3600, scan_store=False, reconcile=False, list_limit=0)
        finally:
            GarbageCollector.drain = real_drain  # type: ignore[method-assign]
            if detach is not None:
                detach()
        gc_cpu, gc_pg_cpu, gc_written = time.process_time() - c0, pg_cpu() - pg0, written() - io0
        assert dry.manifests == real.manifests == n_manifests // 2, (dry.manifests, real.manifests)
        assert real.blobs == n_manifests // 2 * per
        with cat.tx() as conn:
            left_m = conn.exec_driver_sql("SELECT COUNT(*) FROM manifests").scalar()
            left_b = conn.exec_driver_sql("SELECT COUNT(*) FROM blobs").scalar()
            trash = conn.exec_driver_sql("SELECT COUNT(*) FROM gc_trash").scalar()
        assert (left_m, left_b, trash) == (
            n_manifests - n_manifests // 2,
            (n_manifests - n_manifests // 2) * per,
            0,
        )
        return {
            "catalog": kind,
            "manifests": n_manifests,
            "blobs": n_manifests * per,
            "populate_s": round(t_pop, 1),
            "dry_run_s": round(dry.seconds, 1),
            "gc_s": round(real.seconds, 1),
            "mark_s": round(real.mark_seconds, 1),
            "sweep_s": round(real.seconds - real.mark_seconds, 1),
            "gc_cpu_s": round(gc_cpu, 1),
            "sweep_cpu_s": round(sweep_cpu[0], 1),
            "postgres_cpu_s": round(gc_pg_cpu, 1) if kind != "sqlite" else "",
            "gc_written_mib": round(gc_written / 2**20),
            "deleted": real.manifests + real.blobs,
            "peak_rss_mib": round(peak_rss_mib()),
        }
    finally:
        if schema:
            cat.drop_schema()
        cat.close()
        shutil.rmtree(tmp, ignore_errors=True)


def make_session(root: Path, n: int, rng: random.Random) -> int:
    old = time.time() - 3600
    total = 0
    for i in range(n):
        p = root / f"dir{i % 100:02d}" / f"file{i:05d}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(16 * 1024, 112 * 1024)
        p.write_bytes(rng.randbytes(size))
        os.utime(p, (old, old))
        total += size
    return total


def bench_checkpoint(n_files: int, through_hub: bool) -> dict[str, float | int | str]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ck-"))
    rng = random.Random(42)
    try:
        src = tmp / "session"
        total = make_session(src, n_files, rng)
        # The utime calls set every ctime to now: wait out the racy window so that the
        # second checkpoint re-reads only what changed (a session's files are not all
        # touched in the instant before its checkpoint).
        time.sleep(2.5)
        store = clawstore.open(tmp / "store")
        hub = Hub(store) if through_hub else None

        def checkpoint(tag: str, parent: str | None) -> tuple[float, cp.CheckpointResult]:
            t0 = time.perf_counter()
            if hub is not None:
                with hub.session(ADMIN, "bench/ck") as s:
                    r = cp.create(s, f"bench/ck:{tag}", src, parent=parent)
            else:
                r = cp.create(store, f"bench/ck:{tag}", src, parent=parent)
            return time.perf_counter() - t0, r

        t1, r1 = checkpoint("one", None)
        files = sorted(p for p in src.rglob("*.dat"))
        for p in rng.sample(files, n_files // 100):
            p.write_bytes(rng.randbytes(p.stat().st_size))
        t2, r2 = checkpoint("two", "bench/ck:one")
        assert r2.hashed_files == n_files // 100 and r2.reused_files == n_files - n_files // 100, (
            r2.hashed_files,
            r2.reused_files,
            r2.compacted,
            r2.packs,
        )
        meta1, meta2 = _meta_bytes(r1), _meta_bytes(r2)
        return {
            "via": "hub session (SQLite)" if through_hub else "local store",
            "files": n_files,
            "session_mib": round(total / 2**20),
            "first_s": round(t1, 2),
            "second_s": round(t2, 3),
            "time_ratio": round(t1 / t2, 1),
            "first_upload_mib": round(r1.uploaded_bytes / 2**20, 1),
            "second_upload_mib": round(r2.uploaded_bytes / 2**20, 2),
            "second_data_mib": round(_data_bytes(r2) / 2**20, 2),
            "second_meta_mib": round(meta2 / 2**20, 2),
            "first_meta_mib": round(meta1 / 2**20, 2),
            "bytes_ratio": round(r1.uploaded_bytes / r2.uploaded_bytes, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _data_bytes(r: cp.CheckpointResult) -> int:
    return r.uploaded_bytes - _meta_bytes(r)


def _meta_bytes(r: cp.CheckpointResult) -> int:
    return len(clawstore.canonical_json(r.config)) + r.descriptor.size


def pg_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            return True
    except Exception:
        return False


def table(rows: list[dict[str, float | int | str]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["gc", "checkpoint"])
    ap.add_argument("--manifests", type=int, default=100_000)
    ap.add_argument("--blobs-per-manifest", type=int, default=10)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--skip-pg", action="store_true")
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument(
        "--profile-sql",
        action="store_true",
        help="after each GC table, the real run's catalog statements: count and total seconds by kind",
    )
    args = ap.parse_args()
    print(f"# clawstore hub bench, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if args.only in (None, "gc"):
        rows = []
        kinds = [k for k, skip in (("sqlite", args.skip_sqlite), ("postgresql", args.skip_pg)) if not skip]
        for kind in kinds:
            if kind == "postgresql" and not pg_reachable():
                continue
            profile: dict[str, list[float]] | None = {} if args.profile_sql else None
            rows.append(bench_gc(kind, args.manifests, args.blobs_per_manifest, profile))
            if profile:
                print(f"\n{kind}: catalog statements of the real run (count, total s), slowest first\n")
                for stmt, (n, secs) in sorted(profile.items(), key=lambda kv: -kv[1][1])[:15]:
                    print(f"- {secs:7.2f} s  {n:6d}x  `{stmt}`")
        print(table(rows))
    if args.only in (None, "checkpoint"):
        rows = [bench_checkpoint(args.files, False), bench_checkpoint(args.files, True)]
        print(table(rows))
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
