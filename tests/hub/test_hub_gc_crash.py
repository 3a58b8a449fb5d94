"""GC killed with SIGKILL in the middle of a sweep batch, then run again: nothing a tag reaches
is lost, nothing collectable is left behind, and the catalog matches the store. On local and
S3 stores, SQLite and PostgreSQL catalogs.

The GC runs in a child process whose store delete blocks (after deleting) on the Nth batched
call: its catalog transaction is open, some of its objects are gone. The child says so on
stdout; the parent then kills it (no sleeps: the line is the synchronisation).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import clawstore
import pytest
from clawstore.fsck import fsck as store_fsck
from clawstore.hub import Hub
from clawstore.hub import catalog as c
from hubutil import ADMIN, push_artifact, store_objects

CHILD = textwrap.dedent(
    """
    import sys, threading
    import clawstore
    from clawstore.hub import Hub, Principal

    store_url, catalog_url, kind, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    hub = Hub(clawstore.open(store_url), catalog_url)
    backend = hub.store.backend
    name = "remove_manifests" if kind == "manifest" else "remove_blobs"
    real = getattr(backend, name)
    calls = []
    lock = threading.Lock()

    def remove_then_hang(digests):
        n = real(digests)
        with lock:
            calls.append(len(digests))
            hang = len(calls) == nth
        if hang:
            print(f"mid-batch {sum(calls)}", flush=True)
            threading.Event().wait()  # killed here, its transaction open
        return n

    setattr(backend, name, remove_then_hang)
    hub.gc(Principal.local_admin(), grace=0, sweep_batch=12, sweep_chunk=4)
    print("finished", flush=True)
    """
)


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    from s3_server import store_url as s3_url

    return str(s3_url(request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "nth"), [("manifest", 2), ("blob", 5)])
def test_gc_killed_mid_batch_then_run_again(store_url: str, catalog_url: str, kind: str, nth: int) -> None:
    hub = Hub(clawstore.open(store_url), catalog_url, create_catalog=True)
    try:
        live = []
        with hub.session(ADMIN, "app") as s:
            for i in range(6):
                live.append(push_artifact(s, "app", f"v{i}", [f"live {i}".encode(), b"shared layer"]))
            for i in range(16):  # garbage: untagged, with blobs of their own and one shared
                push_artifact(
                    s, "app", None, [f"dead {i}".encode(), f"dead too {i}".encode(), b"shared layer"]
                )
        live_manifests = {d.digest for d in live}
        before_m, before_b = store_objects(hub.store)
        assert len(before_m) == 22

        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, store_url, catalog_url, kind, str(nth)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("mid-batch"), (line, proc.stderr.read() if proc.stderr else "")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)

        # Killed mid-batch: what it deleted is gone, its transaction rolled back, so the trash
        # still holds those rows (resumable) and nothing a tag reaches was touched.
        mid_m, mid_b = store_objects(hub.store)
        assert live_manifests <= mid_m
        if kind == "manifest":
            assert mid_m < before_m and mid_b == before_b  # manifests go first, blobs after
        else:
            assert mid_m == live_manifests and mid_b < before_b
        with hub.catalog.tx() as conn:
            assert conn.execute(c.gc_trash.select().limit(1)).first() is not None
        for i in range(6):
            assert hub.store.resolve("app", f"v{i}") == live[i].digest
        assert store_fsck(hub.store).ok

        r = hub.gc(ADMIN, grace=0, sweep_batch=12, sweep_chunk=4)
        manifests, blobs = store_objects(hub.store)
        assert manifests == live_manifests
        want_blobs = {str(clawstore.digest_bytes(f"live {i}".encode())) for i in range(6)}
        want_blobs |= {str(clawstore.digest_bytes(b"shared layer")), clawstore.mediatypes.EMPTY_DIGEST}
        assert blobs == want_blobs  # nothing left behind, nothing referenced lost
        with hub.catalog.tx() as conn:
            assert conn.execute(c.gc_trash.select().limit(1)).first() is None
        assert hub.fsck(ADMIN).ok, hub.fsck(ADMIN).problems  # catalog == store
        assert store_fsck(hub.store).ok
        assert r.tags_reconciled == 0
        # The store still takes pushes of what was collected, and they are whole.
        with hub.session(ADMIN, "app") as s:
            again = push_artifact(s, "app", "again", [b"dead 0", b"dead too 0", b"shared layer"])
        assert hub.store.has_manifest(again.digest) and store_fsck(hub.store).ok
    finally:
        hub.close()
