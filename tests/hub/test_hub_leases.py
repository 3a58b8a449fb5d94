"""Volume leases (many readers or one writer, TTL, heartbeat, takeover) and GC leases, on
SQLite and PostgreSQL, including racing processes."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
from clawstore import LeaseConflictError
from clawstore.hub import Hub
from hubutil import ADMIN


def test_many_readers_or_one_writer(hub: Hub) -> None:
    r1 = hub.acquire_volume(ADMIN, "vol/a", "ro", holder="n1")
    r2 = hub.acquire_volume(ADMIN, "vol/a", "ro", holder="n2")
    with pytest.raises(LeaseConflictError, match="n1"):
        hub.acquire_volume(ADMIN, "vol/a", "rw", holder="n3")
    r1.release()
    r2.release()
    w = hub.acquire_volume(ADMIN, "vol/a", "rw", holder="n3")
    with pytest.raises(LeaseConflictError, match="n3"):
        hub.acquire_volume(ADMIN, "vol/a", "ro", holder="n1")
    with pytest.raises(LeaseConflictError):
        hub.acquire_volume(ADMIN, "vol/a", "rw", holder="n4")
    hub.acquire_volume(ADMIN, "vol/b", "rw", holder="n4").release()  # other volumes unaffected
    w.release()
    hub.acquire_volume(ADMIN, "vol/a", "rw", holder="n4").release()


class FakeClock:
    """The catalog's clock (`clawstore.hub.catalog.now`), moved by hand: no sleeps, no flakes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from clawstore.hub import catalog

        self.t = time.time()
        monkeypatch.setattr(catalog, "now", lambda: self.t)

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_ttl_heartbeat_and_takeover(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(monkeypatch)
    w = hub.acquire_volume(ADMIN, "vol/a", "rw", holder="old", ttl=10)
    clock.advance(6)
    w.heartbeat(ttl=10)  # now expires at 16
    clock.advance(6)  # 12: past the original expiry, inside the extended one
    with pytest.raises(LeaseConflictError):
        hub.acquire_volume(ADMIN, "vol/a", "rw", holder="new")
    clock.advance(5)  # 17: expired, so it can be taken over
    new = hub.acquire_volume(ADMIN, "vol/a", "rw", holder="new", ttl=30)
    with pytest.raises(LeaseConflictError, match="expired or was taken over"):
        w.heartbeat()
    assert [h for h, _m, _e in hub.leases.volume_holders("vol/a")] == ["new"]
    new.release()


def test_gc_lease_expiry_and_release(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(monkeypatch)
    lease = hub.leases.create("upload", "x", ttl=10)
    clock.advance(11)
    with pytest.raises(LeaseConflictError):
        lease.add(["sha256:" + "0" * 64])
    lease2 = hub.leases.create("upload", "x", ttl=30)
    lease2.add(["sha256:" + "1" * 64])
    assert any(row["resources"] == 1 for row in hub.leases.list())
    lease2.release()
    assert all(row["id"] != lease2.id for row in hub.leases.list())


def _race(url: str, barrier: mp.synchronize.Barrier, q: mp.Queue, name: str) -> None:  # type: ignore[name-defined]
    from clawstore.hub.catalog import Catalog
    from clawstore.hub.leases import Leases

    leases = Leases(Catalog(url))
    barrier.wait()
    try:
        leases.acquire_volume("vol/race", name, "rw", ttl=60)
        q.put(("won", name))
    except LeaseConflictError:
        q.put(("lost", name))


def test_racing_processes_one_writer_wins(catalog_url: str) -> None:
    from clawstore.hub.catalog import Catalog

    Catalog(catalog_url).close()  # migrate once up front
    ctx = mp.get_context("spawn")
    n = 4
    barrier = ctx.Barrier(n)
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(catalog_url, barrier, q, f"p{i}")) for i in range(n)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(60)
    assert sorted(r for r, _ in results) == ["lost"] * (n - 1) + ["won"]
