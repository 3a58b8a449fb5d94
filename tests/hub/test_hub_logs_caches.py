"""Logs and caches through the hub, on SQLite and PostgreSQL: cache budgets with LRU eviction
(restores update last use) reclaimed by GC without touching blobs another entry holds; log
retention by age with the hub's policies; the log writer through a recording hub session."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from clawstore import caches, logs
from clawstore.hub import Hub, Policy
from clawstore.hub import catalog as c
from clawstore.hub.caches import CacheCatalog
from hubutil import ADMIN
from sqlalchemy import update


def _tree(root: Path, seed: int, n: int = 40, size: int = 4000) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i}").write_bytes(os.urandom(size) if seed else bytes([i]) * size)


def test_cache_budget_evicts_least_recently_used(hub: Hub, tmp_path: Path) -> None:
    cc = CacheCatalog(hub)
    sizes = {}
    for k in ("a", "b", "c"):
        _tree(tmp_path / k, seed=1)
        sizes[k] = cc.save(ADMIN, f"key-{k}", tmp_path / k, scope="ci", base=None).entry.stored_size
        time.sleep(0.01)
    # "a" is the oldest, but a restore makes it the most recently used
    assert cc.restore(ADMIN, "key-a", tmp_path / "out-a", scope="ci").kind == "hit"
    assert [r.key for r in cc.entries("ci")] == ["key-b", "key-c", "key-a"]
    budget = int(2.5 * max(sizes.values()))  # room for two entries (sizes differ by a few bytes)
    cc.set_budget("ci", budget)  # one entry must go: the least recently used, "b"
    dry = cc.evict("ci", dry_run=True)
    assert [k for k, _ in dry.evicted] == ["key-b"] and dry.bytes_after <= budget
    assert {e.key for e in caches.entries(hub.store, scope="ci")} == {"key-a", "key-b", "key-c"}
    r = cc.evict("ci")
    assert [k for k, _ in r.evicted] == ["key-b"]
    assert {e.key for e in caches.entries(hub.store, scope="ci")} == {"key-a", "key-c"}
    assert [x.key for x in cc.entries("ci")] == ["key-c", "key-a"]
    # a save past the budget evicts at once (never the entry just saved)
    _tree(tmp_path / "d", seed=1)
    cc.save(ADMIN, "key-d", tmp_path / "d", scope="ci", base=None)
    left = {e.key for e in caches.entries(hub.store, scope="ci")}
    assert "key-d" in left and "key-c" not in left
    assert caches.unique_bytes(caches.entries(hub.store, scope="ci")) <= budget


def test_eviction_through_gc_keeps_blobs_other_entries_hold(hub: Hub, tmp_path: Path) -> None:
    cc = CacheCatalog(hub)
    src = tmp_path / "src"
    _tree(src, seed=1, n=100)
    base = cc.save(ADMIN, "deps-1", src, scope="x").entry
    (src / "f0").write_bytes(os.urandom(4000))
    delta = cc.save(ADMIN, "deps-2", src, scope="x")
    assert delta.base == "deps-1"
    shared = base.layers[0].digest
    assert delta.entry.layers[0].digest == shared
    cc.set_budget("x", delta.entry.stored_size + 10)  # keeps only the newer entry
    cc.restore(ADMIN, "deps-2", tmp_path / "o", scope="x")
    r = cc.evict("x")
    assert [k for k, _ in r.evicted] == ["deps-1"]
    hub.gc(ADMIN, grace=0)
    assert hub.store.has_blob(shared)  # deps-2 still needs the base layer
    assert not hub.store.has_blob(base.index.digest)  # deps-1's own index went
    out = tmp_path / "after-gc"
    assert caches.restore(hub.store, "deps-2", out, scope="x").kind == "hit"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    # with deps-2 gone as well, GC reclaims everything of both
    caches.delete(hub.store, "deps-2", scope="x")
    cc.sync("x")
    hub.gc(ADMIN, grace=0)
    assert not hub.store.has_blob(shared)


def test_sync_picks_up_entries_saved_without_the_hub(hub: Hub, tmp_path: Path) -> None:
    _tree(tmp_path / "s", seed=0)
    caches.save(hub.store, "plain", tmp_path / "s", scope="y")
    cc = CacheCatalog(hub)
    assert [r.key for r in cc.entries("y")] == []
    cc.sync("y")
    assert [r.key for r in cc.entries("y")] == ["plain"]
    caches.delete(hub.store, "plain", scope="y")
    cc.sync("y")
    assert cc.entries("y") == []


def test_log_retention_by_age(hub: Hub) -> None:
    with hub.session(ADMIN, "logs/old") as s, logs.LogWriter(s, "logs/old:out", max_age=None) as w:
        w.append(b"old session\n" * 1000)
    with hub.session(ADMIN, "logs/new") as s, logs.LogWriter(s, "logs/new:out", max_age=None) as w:
        w.append(b"new session\n")
    old_segments = [x.descriptor.digest for x in logs.load(hub.store, "logs/old:out").segments]
    # the old log was last written a day ago
    with hub.catalog.tx() as conn:
        conn.execute(
            update(c.tags).where(c.tags.c.repository == "logs/old").values(updated_at=c.now() - 86400)
        )
    hub.set_policy(ADMIN, Policy("logs/**", keep_within=3600))
    dry = hub.apply_retention(ADMIN, dry_run=True, grace=0)
    assert [(r, t) for r, t, _d in dry.tags] == [("logs/old", "out")]
    assert dry.bytes > 0
    hub.apply_retention(ADMIN, grace=0)
    assert hub.store.list_tags("logs/old") == []
    assert not any(hub.store.has_blob(d) for d in old_segments)
    assert b"".join(logs.read(hub.store, "logs/new:out")) == b"new session\n"


def test_log_writer_through_a_hub_session_is_recorded(hub: Hub) -> None:
    with hub.session(ADMIN, "logs/rec") as s, logs.LogWriter(s, "logs/rec:out", max_age=None) as w:
        for i in range(5):
            w.append(b"%d\n" % i)
            w.flush()
    with hub.catalog.tx() as conn:
        from sqlalchemy import select

        tag = conn.execute(select(c.tags.c.digest).where(c.tags.c.repository == "logs/rec")).scalar()
    assert tag == str(hub.store.resolve("logs/rec", "out"))
    # GC with no grace keeps every segment of the tagged log (superseded manifests may go)
    hub.gc(ADMIN, grace=0)
    assert logs.verify(hub.store, "logs/rec:out").ok
    assert b"".join(logs.read(hub.store, "logs/rec:out")) == b"0\n1\n2\n3\n4\n"


@pytest.mark.parametrize("budget", ["none", "1"])
def test_budget_set_and_remove(hub: Hub, budget: str) -> None:
    cc = CacheCatalog(hub)
    cc.set_budget("z", 10)
    assert cc.budget("z") == 10
    cc.set_budget("z", None if budget == "none" else 1)
    assert cc.budget("z") == (None if budget == "none" else 1)
