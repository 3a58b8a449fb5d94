"""GC's sweep against an S3 store: N unreferenced blobs collected by `gc` (batched: DeleteObjects,
1,000 keys per request, `concurrency` requests in flight, overlapped with the catalog work) vs
the old one-at-a-time path (a HEAD then a DELETE per object, as the sweep did before), in the
same run, against the same server.

    python benches/bench_gc_sweep.py                       # moto, 100,000 blobs, 2,000 the old way
    python benches/bench_gc_sweep.py --endpoint URL        # another server (Ceph RGW: AWS_* creds)
    python benches/bench_gc_sweep.py --objects 20000 --old-objects 1000 --catalog postgresql

The objects (tiny, distinct, stored at their digest's key) are written with plain PUTs and
recorded in a fresh catalog as blobs seen a day ago, referenced by nothing; `gc` then marks them
all and sweeps. Reported: objects per second of each path, wall and CPU seconds (this process,
user+sys; and the server's processes where they run on this machine: moto's child, or radosgw
+ ceph-osd), and that the bucket is empty afterwards. The old path is timed on fewer objects
(at ~60/s on moto, 100,000 would take half an hour): its rate does not depend on the count.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import clawstore  # noqa: E402
from clawstore.hub import Catalog, Hub, Principal  # noqa: E402
from s3_server import REGION, MotoProcess, make_client, new_bucket, set_fake_credentials  # noqa: E402

PG_URL = os.environ.get("CLAWSTORE_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ADMIN = Principal.local_admin()


def server_procs(moto: MotoProcess | None) -> list[psutil.Process]:
    if moto is not None:
        return [psutil.Process(moto.proc.pid)]
    names = ("radosgw", "ceph-osd", "ceph-mon")
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "") in names]


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Clock:
    """Wall, this process' CPU, and the server's CPU over a block."""

    def __init__(self, server: list[psutil.Process]) -> None:
        self.server = server

    def __enter__(self) -> Clock:
        self.w0, self.c0, self.s0 = time.perf_counter(), time.process_time(), cpu(self.server)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        self.server_cpu = cpu(self.server) - self.s0


def fill(client: Any, bucket: str, store: clawstore.ArtifactStore, tag: str, n: int) -> list[tuple[str, int]]:
    """n distinct tiny blobs at their digest keys; returns (digest, size)."""
    layout = store.backend.layout  # type: ignore[attr-defined]

    def put(i: int) -> tuple[str, int]:
        body = f"gc sweep {tag} {i}".encode()
        d = clawstore.Digest(f"sha256:{hashlib.sha256(body).hexdigest()}")
        client.put_object(Bucket=bucket, Key=layout.blob(d), Body=body)
        return str(d), len(body)

    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(put, range(n)))


def record(cat: Catalog, blobs: list[tuple[str, int]]) -> None:
    t = time.time() - 86400
    with cat.tx() as conn:
        from clawstore.hub import catalog as c

        rows = [{"digest": d, "size": s, "created_at": t, "seen_at": t, "adopted": False} for d, s in blobs]
        for i in range(0, len(rows), 5000):
            conn.execute(c.blobs.insert(), rows[i : i + 5000])


def count_keys(client: Any, bucket: str) -> int:
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="bench/blobs/"):
        n += len(page.get("Contents", []))
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--old-objects", type=int, default=2_000)
    ap.add_argument("--endpoint", help="an S3 server already running instead of moto (AWS_* credentials)")
    ap.add_argument("--catalog", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--concurrency", type=int, default=8, help="the store's concurrency (requests in flight)")
    args = ap.parse_args()

    moto: MotoProcess | None = None
    if args.endpoint:
        endpoint, kind = args.endpoint, "server at " + args.endpoint
    else:
        set_fake_credentials()
        moto = MotoProcess()
        endpoint, kind = moto.endpoint, "moto server"
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    print(f"# GC sweep on S3 ({kind}), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    try:
        client = make_client(endpoint)
        bucket = new_bucket(client)
        url = f"s3://{bucket}/bench?endpoint_url={endpoint}&region={REGION}&concurrency={args.concurrency}"
        store = clawstore.open(url)
        server = server_procs(moto)
        schema = None
        if args.catalog == "sqlite":
            cat = Catalog(f"sqlite:///{tmp / 'catalog.sqlite'}")
        else:
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            cat = Catalog(PG_URL, schema=schema)
        rows = []
        try:
            t0 = time.perf_counter()
            blobs = fill(client, bucket, store, "batched", args.objects)
            record(cat, blobs)
            print(f"filled {len(blobs)} objects in {time.perf_counter() - t0:.0f}s")
            hub = Hub(store, cat)
            with Clock(server) as ck:
                r = hub.gc(ADMIN, grace=3600, scan_store=False, reconcile=False, list_limit=0)
            sweep = r.seconds - r.mark_seconds
            left = count_keys(client, bucket)
            assert r.blobs == args.objects and left == 0, (r.blobs, left)
            rows.append(
                {
                    "path": f"gc, batched ({store.remove_batch} keys x {store.remove_concurrency} in flight)",
                    "objects": args.objects,
                    "sweep_s": round(sweep, 1),
                    "objects_per_s": round(args.objects / sweep),
                    "gc_wall_s": round(ck.wall, 1),
                    "mark_s": round(r.mark_seconds, 1),
                    "cpu_s": round(ck.cpu, 1),
                    "server_cpu_s": round(ck.server_cpu, 1),
                    "left": left,
                }
            )
            old = fill(client, bucket, store, "old", args.old_objects)
            with Clock(server) as ck:
                for d, _size in old:
                    store.delete_blob(d)  # HEAD + DELETE: what the sweep did per object before
            left = count_keys(client, bucket)
            rows.append(
                {
                    "path": "one at a time (HEAD + DELETE per object, the old sweep)",
                    "objects": args.old_objects,
                    "sweep_s": round(ck.wall, 1),
                    "objects_per_s": round(args.old_objects / ck.wall),
                    "gc_wall_s": "",
                    "mark_s": "",
                    "cpu_s": round(ck.cpu, 1),
                    "server_cpu_s": round(ck.server_cpu, 1),
                    "left": left,
                }
            )
        finally:
            if schema:
                cat.drop_schema()
            cat.close()
            store.close()
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(str(row[k]) for k in keys) + " |")
        print(f"speed-up (objects/s): {rows[0]['objects_per_s'] / rows[1]['objects_per_s']:.0f}x")
        print(f"load after: {os.getloadavg()[0]:.1f}")
    finally:
        if moto is not None:
            moto.stop()


if __name__ == "__main__":
    main()
