"""Catalog: migrations, what a push records, fsck drift and rebuild — on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import clawstore
import pytest
from alembic.script import ScriptDirectory
from clawstore.hub import Catalog, Hub
from clawstore.hub import catalog as c
from clawstore.hub.migrations import alembic_config, current, upgrade
from hubutil import ADMIN, make_catalog_url, push_artifact, push_index
from sqlalchemy import select


def test_migrations_reach_head_and_are_idempotent(catalog_url: str) -> None:
    cat = Catalog(catalog_url)
    assert current(cat) == ScriptDirectory.from_config(alembic_config()).get_current_head()
    Catalog(catalog_url).close()  # second open: no-op upgrade
    with cat.tx() as conn:
        assert conn.execute(select(c.catalog_lock.c.id)).scalar() == 1
    cat.close()


def _sqlite_tables(path: Path) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return {
            name: sql for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        }


def test_sqlite_catalog_of_the_previous_revision_is_clustered_with_its_rows(tmp_path: Path) -> None:
    """A SQLite catalog made at `registry_1` (rowid tables) upgrades to tables clustered by
    their key, every row and index kept, and a push through the hub works on it; downgrading
    gives rowid tables back with the same rows."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    old = Catalog(url, migrate=False)
    upgrade(old, "registry_1")
    assert "WITHOUT ROWID" not in _sqlite_tables(tmp_path / "catalog.sqlite")["blobs"]
    store = clawstore.open(tmp_path / "store")
    with Hub(store, old).session(ADMIN, "team/app") as s:
        first = push_artifact(s, "team/app", "v1", [b"layer one"])
    with old.tx() as conn:
        before = {
            t: sorted(map(tuple, conn.execute(select(getattr(c, t)))))
            for t in ("blobs", "manifests", "manifest_blobs", "repo_manifests", "tags")
        }
        conn.execute(
            c.gc_trash.insert().values(digest="sha256:" + "ab" * 32, kind="blob", size=1, queued_at=1.0)
        )
    assert before["blobs"] and before["manifest_blobs"]
    old.close()

    cat = Catalog(url)  # opening migrates to head
    tables = _sqlite_tables(tmp_path / "catalog.sqlite")
    # What the schema declares clustered (sqlite_with_rowid=False) is what the migration made so.
    clustered = {
        t.name for t in c.metadata.sorted_tables if t.dialect_options["sqlite"]["with_rowid"] is False
    }
    assert {"blobs", "manifests", "manifest_blobs", "gc_trash"} <= clustered
    for table, ddl in tables.items():
        if table in {t.name for t in c.metadata.sorted_tables}:
            assert ddl.rstrip().endswith("WITHOUT ROWID") == (table in clustered), table
    for index in (
        "ix_manifest_blobs_blob",
        "ix_manifest_edges_child",
        "ix_manifests_subject",
        "ix_repo_blobs_digest",
        "ix_repo_manifests_digest",
        "ix_lease_resources_digest",
    ):
        assert index in tables, index
    with cat.tx() as conn:
        after = {t: sorted(map(tuple, conn.execute(select(getattr(c, t))))) for t in before}
        assert conn.execute(select(c.gc_trash.c.digest)).scalars().all() == ["sha256:" + "ab" * 32]
    assert after == before
    hub = Hub(store, cat)
    with hub.session(ADMIN, "team/app") as s:
        second = push_artifact(s, "team/app", "v2", [b"layer two"])
    assert hub.resolve(ADMIN, "team/app", "v1") == first.digest
    assert hub.resolve(ADMIN, "team/app", "v2") == second.digest

    with cat.tx() as conn:
        edges = sorted(map(tuple, conn.execute(select(c.manifest_blobs))))
    assert len(edges) > len(after["manifest_blobs"])
    cfg = alembic_config()
    with cat.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "registry_1")
    assert "WITHOUT ROWID" not in _sqlite_tables(tmp_path / "catalog.sqlite")["manifest_blobs"]
    with cat.tx() as conn:
        assert sorted(map(tuple, conn.execute(select(c.manifest_blobs)))) == edges
    cat.close()


_OPENERS = 12
_ROUNDS = 10
_barrier: Any = None


def _init_opener(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def _open_catalog(url: str) -> str | None:
    """In a worker process: wait for every opener, then open (create + migrate) the catalog."""
    try:
        cat = Catalog(url, migrate=False)  # no connection yet: the race is in the first one
        try:
            _barrier.wait(120)  # as close together as processes get
            upgrade(cat)  # what Catalog(url) does on open: connect (WAL switch), migrate
        finally:
            cat.close()
        return None
    except BaseException as e:  # reported to the test, which fails with it
        return f"{type(e).__name__}: {e}"


def test_concurrent_opens_migrate_once(catalog_kind: str, tmp_path: Path) -> None:
    """Many PROCESSES opening one fresh catalog at the same instant (hub replicas starting
    together, CLI commands racing) all succeed and migrate it exactly once, round after round.
    On SQLite this caught 'database is locked' from the switch to WAL mode, which SQLite fails
    without calling the busy handler when several connections try it at once (see
    catalog._set_wal); processes, not threads, because that is how replicas race."""
    ctx = multiprocessing.get_context("spawn")
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with ctx.Pool(_OPENERS, initializer=_init_opener, initargs=(ctx.Barrier(_OPENERS),)) as pool:
        for rnd in range(_ROUNDS):
            url, schema = make_catalog_url(catalog_kind, tmp_path / f"r{rnd}")
            if schema is not None:
                url = f"{url}?schema={schema}"
            else:
                (tmp_path / f"r{rnd}").mkdir()
            try:
                errors = [e for e in pool.map(_open_catalog, [url] * _OPENERS, chunksize=1) if e]
                assert not errors, f"round {rnd}: {len(errors)} of {_OPENERS} opens failed: {errors[0]}"
                cat = Catalog(url, migrate=False)
                try:
                    assert current(cat) == head
                    with cat.tx() as conn:  # the data migration ran once: one lock row
                        assert conn.execute(select(c.catalog_lock.c.id)).scalars().all() == [1]
                finally:
                    cat.close()
            finally:
                if schema is not None:
                    Catalog(url, migrate=False).drop_schema()


def test_push_records_manifests_edges_tags_and_history(hub: Hub) -> None:
    with hub.session(ADMIN, "proj/app") as s:
        a = push_artifact(s, "proj/app", "v1", [b"one", b"two"])
        sig = push_artifact(
            s, "proj/app", None, [b"sig"], subject=a, artifact_type="application/vnd.test.sig"
        )
        idx = push_index(s, "proj/app", "multi", [a])
        s.tag("proj/app", "v1", idx.digest)  # a tag move
    row = hub.catalog_manifest(ADMIN, "proj/app", sig.digest)
    assert row is not None
    assert row["subject"] == a.digest
    assert row["artifact_type"] == "application/vnd.test.sig"
    assert row["size"] == sig.size
    assert row["media_type"] == "application/vnd.oci.image.manifest.v1+json"
    with hub.catalog.tx() as conn:
        edges = set(
            conn.execute(select(c.manifest_edges.c.parent, c.manifest_edges.c.child, c.manifest_edges.c.kind))
        )
        mblobs = {
            r[0]
            for r in conn.execute(
                select(c.manifest_blobs.c.blob).where(c.manifest_blobs.c.manifest == a.digest)
            )
        }
        sizes = dict(conn.execute(select(c.blobs.c.digest, c.blobs.c.size)).all())
    assert (idx.digest, a.digest, "child") in edges
    assert (a.digest, sig.digest, "referrer") in edges
    assert len(mblobs) == 3  # two layers + config
    assert all(sizes[b] >= 2 for b in mblobs)
    hist = hub.tag_history(ADMIN, "proj/app", "v1")
    assert [(h["old_digest"], h["new_digest"]) for h in hist] == [(None, a.digest), (a.digest, idx.digest)]
    assert [r["digest"] for r in hub.referrers(ADMIN, "proj/app", a.digest)] == [sig.digest]
    hub.untag(ADMIN, "proj/app", "v1")
    assert hub.tag_history(ADMIN, "proj/app", "v1")[-1]["new_digest"] is None
    assert hub.fsck(ADMIN).ok


def test_fsck_reports_drift_and_rebuild_repairs_it(hub: Hub, tmp_path: Path) -> None:
    with hub.session(ADMIN, "r") as s:
        a = push_artifact(s, "r", "keep", [b"kept"])
        b = push_artifact(s, "r", "gone", [b"will vanish"])
    store = hub.store
    # Writes that bypass the hub, and damage:
    orphan = store.put_blob(b"orphan blob")
    store.tag("r", "direct", a.digest)
    victim = next(d.digest for d in store.get_manifest_typed(b.digest).layers)
    store.delete_blob(victim)
    r = hub.fsck(ADMIN)
    kinds = {k for k, _ in r.problems}
    assert {"uncatalogued", "missing", "tag", "dangling"} <= kinds
    assert any(orphan.digest in d for _, d in r.problems)
    assert any("r:direct" in d for _, d in r.problems)
    # Rebuild from the store: the catalog now mirrors it (the dangling manifest stays reported).
    hub.fsck(ADMIN, rebuild=True)
    r2 = hub.fsck(ADMIN)
    assert {k for k, _ in r2.problems} == {"dangling"}
    with hub.catalog.tx() as conn:
        assert conn.execute(select(c.tags.c.digest).where(c.tags.c.tag == "direct")).scalar() == a.digest
        assert conn.execute(select(c.blobs.c.digest).where(c.blobs.c.digest == orphan.digest)).scalar()


def test_fsck_verify_blobs_detects_bit_flip(hub: Hub) -> None:
    with hub.session(ADMIN, "r") as s:
        a = push_artifact(s, "r", "t", [b"x" * 1000])
    layer = hub.store.get_manifest_typed(a.digest).layers[0]
    path = hub.store.backend.blob_path(layer.digest)  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[500] ^= 0x01
    path.write_bytes(bytes(data))
    assert hub.fsck(ADMIN).ok  # sizes agree: only re-hashing can tell
    r = hub.fsck(ADMIN, verify_blobs=True)
    assert [k for k, _ in r.problems] == ["bad-blob"]


def test_default_catalog_lives_beside_local_store(tmp_path: Path) -> None:
    h = Hub(clawstore.open(tmp_path / "s"))
    assert (tmp_path / "s" / "catalog.sqlite").is_file()
    h.close()


def test_unsupported_catalog_url_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(clawstore.ClawstoreError, match="unsupported catalog"):
        Catalog("mysql://x@localhost/db")


def test_reads_neither_wait_for_a_writer_nor_see_its_uncommitted_rows(catalog_url: str) -> None:
    """`Catalog.read()` (permission checks, repository links: every registry GET) runs beside a
    transaction that holds the write lock (SQLite: BEGIN IMMEDIATE) and sees the committed state."""
    import threading

    cat = Catalog(catalog_url)
    try:
        with cat.tx() as conn:
            c.upsert(conn, c.principals, [{"name": "before", "created_at": 1.0, "disabled": False}], ["name"])
        writing, release = threading.Event(), threading.Event()

        def writer() -> None:
            with cat.tx(exclusive=True) as conn:
                c.upsert(
                    conn, c.principals, [{"name": "during", "created_at": 2.0, "disabled": False}], ["name"]
                )
                writing.set()
                release.wait(60)

        w = threading.Thread(target=writer)
        w.start()
        assert writing.wait(30)
        seen: list[set[str]] = []

        def reader() -> None:
            with cat.read() as conn:
                seen.append(set(conn.execute(select(c.principals.c.name)).scalars()))

        r = threading.Thread(target=reader)
        r.start()
        r.join(30)  # a read that queued behind the writer would still be waiting here
        finished = not r.is_alive()
        release.set()
        w.join()
        r.join()
        assert finished, "a read waited for the writer"
        assert "before" in seen[0] and "during" not in seen[0]
    finally:
        cat.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_catalog_opens(url: str) -> None:
    """A throwaway hub on a memory catalog: no connection-pool sizing applies to it."""
    cat = Catalog(url)
    try:
        with cat.tx() as conn:
            assert conn.execute(select(c.catalog_lock.c.id)).scalar() == 1
        with cat.read() as conn:
            assert conn.execute(select(c.catalog_lock.c.id)).scalar() == 1
    finally:
        cat.close()
