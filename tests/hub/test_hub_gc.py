"""GC: roots, grace, referrers, pins, leases, orphans, the trash/rescue protocol, and a
hypothesis state machine against a model — on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import clawstore
import pytest
from clawstore.hub import GarbageCollector, Hub
from hubutil import ADMIN, make_catalog_url, pg_available, push_artifact, push_index, store_objects
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule


def test_untagged_is_collected_tagged_is_kept(hub: Hub) -> None:
    with hub.session(ADMIN, "r") as s:
        keep = push_artifact(s, "r", "keep", [b"shared", b"only-keep"])
        gone = push_artifact(s, "r", "gone", [b"shared", b"only-gone"])
    hub.untag(ADMIN, "r", "gone")
    before = store_objects(hub.store)
    dry = hub.gc(ADMIN, grace=0, dry_run=True)
    assert store_objects(hub.store) == before  # dry run deletes nothing
    assert (dry.manifests, dry.blobs, dry.blob_bytes) == (1, 1, len(b"only-gone"))
    r = hub.gc(ADMIN, grace=0)
    assert (r.manifests, r.blobs, r.bytes) == (dry.manifests, dry.blobs, dry.bytes)
    assert r.manifest_bytes == gone.size
    manifests, blobs = store_objects(hub.store)
    assert manifests == {keep.digest}
    assert clawstore.digest_bytes(b"only-gone") not in blobs
    assert clawstore.digest_bytes(b"shared") in blobs
    assert hub.fsck(ADMIN).ok


def test_grace_protects_recent_garbage(hub: Hub) -> None:
    with hub.session(ADMIN, "r") as s:
        push_artifact(s, "r", None, [b"recent"])
    r = hub.gc(ADMIN, grace=3600)
    assert (r.manifests, r.blobs) == (0, 0)
    r = hub.gc(ADMIN, grace=0)
    assert (r.manifests, r.blobs) == (1, 2)


def test_index_children_and_referrers_of_live_subjects_live(hub: Hub) -> None:
    with hub.session(ADMIN, "r") as s:
        child = push_artifact(s, "r", None, [b"child"])
        push_index(s, "r", "idx", [child])
        sig = push_artifact(s, "r", None, [b"sig-of-child"], subject=child, artifact_type="application/x.sig")
        dead = push_artifact(s, "r", None, [b"dead"])
        dead_sig = push_artifact(
            s, "r", None, [b"sig-of-dead"], subject=dead, artifact_type="application/x.sig"
        )
    hub.gc(ADMIN, grace=0)
    manifests, _ = store_objects(hub.store)
    assert {child.digest, sig.digest} <= manifests
    assert dead.digest not in manifests and dead_sig.digest not in manifests
    assert hub.fsck(ADMIN).ok


def test_pins_and_leases_are_roots(hub: Hub) -> None:
    with hub.session(ADMIN, "r") as s:
        pinned = push_artifact(s, "r", None, [b"pinned"])
        leased = push_artifact(s, "r", None, [b"leased"])
    hub.pin(ADMIN, pinned.digest, "audit")
    lease = hub.lease(ADMIN, "r", "restore", ttl=3600)
    lease.add([leased.digest])
    hub.gc(ADMIN, grace=0)
    manifests, blobs = store_objects(hub.store)
    assert {pinned.digest, leased.digest} <= manifests
    assert clawstore.digest_bytes(b"leased") in blobs
    lease.release()
    hub.unpin(ADMIN, pinned.digest)
    hub.gc(ADMIN, grace=0)
    assert store_objects(hub.store) == (set(), set())


def test_expired_lease_does_not_protect(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from clawstore.hub import catalog

    with hub.session(ADMIN, "r") as s:
        d = push_artifact(s, "r", None, [b"x"])
    lease = hub.leases.create("restore", "t", ttl=10)
    lease.add([d.digest], ttl=10)
    later = time.time() + 20
    monkeypatch.setattr(catalog, "now", lambda: later)
    r = hub.gc(ADMIN, grace=0)
    assert r.manifests == 1 and r.expired_leases >= 1


def test_orphans_are_adopted_then_collected(hub: Hub) -> None:
    orphan = hub.store.put_blob(b"written behind the hub's back")  # plain store: no catalog
    r = hub.gc(ADMIN, grace=0)
    # Adopted in this run at time T; collectable because no lease older than T is live.
    assert r.adopted == 1
    assert not hub.store.has_blob(orphan.digest)


def test_orphan_is_kept_while_an_older_lease_is_live(hub: Hub) -> None:
    """The push that wrote an unrecorded object may hold a lease that predates the adoption:
    until that lease ends, the orphan stays (it may be about to be recorded)."""
    lease = hub.leases.create("upload", "pusher", ttl=3600)
    orphan = hub.store.put_blob(b"mid-push")
    hub.gc(ADMIN, grace=0)
    assert hub.store.has_blob(orphan.digest)
    lease.release()
    hub.gc(ADMIN, grace=0)
    assert not hub.store.has_blob(orphan.digest)


def test_store_tags_written_behind_the_hub_are_roots(hub: Hub) -> None:
    with hub.session(ADMIN, "r") as s:
        d = push_artifact(s, "r", None, [b"direct"])
    hub.store.tag("r", "direct", d.digest)  # bypasses the catalog
    r = hub.gc(ADMIN, grace=0)
    assert r.tags_reconciled == 1 and r.manifests == 0
    assert hub.store.has_manifest(d.digest)
    hub.store.untag("r", "direct")
    r = hub.gc(ADMIN, grace=0)
    assert r.tags_reconciled == 1 and r.manifests == 1


def test_rescue_from_trash_between_mark_and_sweep(hub: Hub) -> None:
    """A push that needs a digest GC has already chosen (in gc_trash, object not yet deleted)
    takes it back; the sweep then leaves the object alone."""
    with hub.session(ADMIN, "r") as s:
        push_artifact(s, "r", None, [b"reused content"])
    gc = GarbageCollector(hub.catalog, hub.store)
    with hub.catalog.tx(exclusive=True) as conn:
        totals, _, _ = gc.mark(conn, grace=0, dry_run=False)
    assert totals["blob"][0] == 2
    blob = clawstore.digest_bytes(b"reused content")
    with hub.session(ADMIN, "r") as s:
        assert s.has_blob(blob)  # leases + rescues it
        gc.drain()  # concurrent sweep: must not delete it
        push_artifact(s, "r", "new", [b"reused content"])
    assert hub.store.has_blob(blob)
    assert hub.fsck(ADMIN).ok


def test_sweep_leaves_the_blobs_of_a_manifest_being_rescued(hub: Hub) -> None:
    """The manifest pass skips a trashed manifest whose row a push is rescuing right now
    (PostgreSQL: its trash row is locked; SKIP LOCKED). The blob pass must then leave that
    manifest's blobs alone: deleting them made the rescued manifest a torso (`fsck`: references
    a missing blob), seen once in 200 rounds of CLI tag against `gc --grace 0s`."""
    if hub.catalog.dialect != "postgresql":
        pytest.skip("SQLite has one writer: a rescue and a sweep cannot overlap")
    from sqlalchemy import text

    with hub.session(ADMIN, "r") as s:
        m = push_artifact(s, "r", None, [b"layer being rescued"])
    layer = clawstore.digest_bytes(b"layer being rescued")
    gc = GarbageCollector(hub.catalog, hub.store)
    with hub.catalog.tx(exclusive=True) as conn:
        gc.mark(conn, grace=0, dry_run=False)
    with hub.catalog.engine.connect() as rescuer:
        tx = rescuer.begin()  # a push's rescue, mid-transaction: the manifest's row is locked
        rescuer.execute(
            text("SELECT digest FROM gc_trash WHERE digest = :d FOR UPDATE"), {"d": str(m.digest)}
        )
        gc.drain()
        assert hub.store.has_manifest(m.digest)  # skipped: being rescued
        assert hub.store.has_blob(layer)  # and so are its blobs
        tx.rollback()  # the rescue gave up: the next collection takes both
    hub.gc(ADMIN, grace=0)
    assert not hub.store.has_manifest(m.digest) and not hub.store.has_blob(layer)
    assert hub.fsck(ADMIN).ok


def test_sweep_before_lease_makes_push_reupload(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: put_blob finds the object already stored (so writes nothing), then GC
    sweeps it before the push's lease commits. The push sees it gone after leasing and writes
    it again."""
    with hub.session(ADMIN, "r") as s:
        push_artifact(s, "r", None, [b"content"])
    blob = clawstore.digest_bytes(b"content")
    backend_cls = type(hub.store.backend)
    real_write_blob = backend_cls.write_blob
    swept: list[bool] = []

    def write_then_sweep(self, src, algorithm, expected):  # type: ignore[no-untyped-def]
        d, size = real_write_blob(self, src, algorithm, expected)
        if d == blob and not swept:
            swept.append(True)
            assert hub.store.has_blob(blob)  # the write found it there and wrote nothing
            hub.gc(ADMIN, grace=0)  # a concurrent GC sweeps it before our lease commits
            assert not hub.store.has_blob(blob)
        return d, size

    # Under the session's wrapper: between the backend's write and the session's lease.
    monkeypatch.setattr(backend_cls, "write_blob", write_then_sweep)
    with hub.session(ADMIN, "r") as s:
        d = s.put_blob(b"content")
    assert swept and d.digest == blob
    assert hub.store.has_blob(blob)  # written again


def test_gc_removes_stale_temp_files(hub: Hub) -> None:
    tmp = hub.store.backend.layout.tmp  # type: ignore[attr-defined]
    junk = tmp / "999999999-deadbeef"  # a pid that does not exist
    junk.write_bytes(b"x" * 100)
    r = hub.gc(ADMIN, grace=0)
    assert r.temp_removed == 1 and r.temp_bytes == 100 and not junk.exists()


# -- stateful model ------------------------------------------------------------------------------
PAYLOADS = [bytes([i]) * (i + 1) for i in range(6)]
TAGS = ["a", "b", "c"]


class GCMachine(RuleBasedStateMachine):
    """Interleave pushes (with shared blobs), tag moves, untags, retention runs and GC against a
    model. Time is simulated by moving `seen_at` back (everything "ages" on `age`)."""

    kind = "sqlite"

    @initialize()
    def setup(self) -> None:
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="gcsm-"))
        url, schema = make_catalog_url(self.kind, self.dir)
        self.hub = Hub(clawstore.open(self.dir / "store"), url, schema=schema)
        # model: manifest digest -> (payload indexes, young?)
        self.manifests: dict[str, tuple[frozenset[int], bool]] = {}
        self.tags: dict[str, str] = {}

    def teardown(self) -> None:
        import shutil

        if hasattr(self, "hub"):
            if self.hub.catalog.schema:
                self.hub.catalog.drop_schema()
            self.hub.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        payloads=st.sets(st.integers(0, len(PAYLOADS) - 1), min_size=1, max_size=3),
        tag=st.sampled_from([*TAGS, None]),
        salt=st.integers(0, 3),
    )
    def push(self, payloads: set[int], tag: str | None, salt: int) -> None:
        with self.hub.session(ADMIN, "m") as s:
            d = push_artifact(
                s,
                "m",
                tag,
                [PAYLOADS[i] for i in sorted(payloads)],
                artifact_type=f"application/vnd.test.a{salt}",
            )
        self.manifests[d.digest] = (frozenset(payloads), True)
        if tag:
            self.tags[tag] = d.digest

    @precondition(lambda self: self.tags)
    @rule(data=st.data())
    def untag(self, data: st.DataObject) -> None:
        tag = data.draw(st.sampled_from(sorted(self.tags)))
        self.hub.untag(ADMIN, "m", tag)
        del self.tags[tag]

    @precondition(lambda self: self.manifests)
    @rule(data=st.data(), tag=st.sampled_from(TAGS))
    def retag(self, data: st.DataObject, tag: str) -> None:
        d = data.draw(st.sampled_from(sorted(self.manifests)))
        self.hub.tag(ADMIN, "m", tag, d)
        payloads, _young = self.manifests[d]
        self.manifests[d] = (payloads, True)  # tagging counts as a push into the repo
        self.tags[tag] = d

    @rule()
    def age(self) -> None:
        """Everything seen so far becomes older than any grace we use."""
        from clawstore.hub import catalog as c

        with self.hub.catalog.tx() as conn:
            conn.execute(c.manifests.update().values(seen_at=c.manifests.c.seen_at - 10_000))
            conn.execute(c.blobs.update().values(seen_at=c.blobs.c.seen_at - 10_000))
        self.manifests = {d: (p, False) for d, (p, _y) in self.manifests.items()}

    @rule(keep_last=st.integers(0, 3))
    def retention(self, keep_last: int) -> None:
        from clawstore.hub.retention import Policy

        self.hub.set_policy(ADMIN, Policy("m", keep_last=keep_last))
        r = self.hub.apply_retention(ADMIN, grace=1000)
        for _repo, tag, _d in r.tags:
            del self.tags[tag]
        self._collected(1000)

    @rule(dry=st.booleans(), sweep=st.sampled_from([None, (1, 1), (3, 2), (4, 4)]))
    def gc(self, dry: bool, sweep: tuple[int, int] | None) -> None:
        before = store_objects(self.hub.store)
        # The batched sweep with tiny batches: several transactions, several chunks each.
        sizes = {"sweep_batch": sweep[0], "sweep_chunk": sweep[1]} if sweep else {}
        r = self.hub.gc(ADMIN, grace=1000, dry_run=dry, **sizes)
        if dry:
            assert store_objects(self.hub.store) == before
            live_m = {d for d, (_p, y) in self.manifests.items() if y or d in self.tags.values()}
            assert r.manifests == len(set(self.manifests) - live_m)
            return
        self._collected(1000)

    def _collected(self, grace: float) -> None:
        live = {d for d, (_p, young) in self.manifests.items() if young or d in self.tags.values()}
        self.manifests = {d: v for d, v in self.manifests.items() if d in live}
        manifests, blobs = store_objects(self.hub.store)
        # Everything unreachable past grace is gone ...
        assert manifests == live
        needed = {str(clawstore.digest_bytes(PAYLOADS[i])) for d in live for i in self.manifests[d][0]}
        if live:
            needed.add(clawstore.mediatypes.EMPTY_DIGEST)
        assert blobs == needed

    @invariant()
    def reachable_is_whole(self) -> None:
        if not hasattr(self, "hub"):
            return
        # ... and nothing reachable from a root is ever deleted.
        for tag, d in self.tags.items():
            assert self.hub.store.resolve("m", tag) == d
            m = self.hub.store.get_manifest_typed(d)
            for b in m.blobs():
                assert self.hub.store.stat_blob(b.digest) == b.size


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_gc_state_machine(kind: str) -> None:

    if kind == "postgres" and not pg_available():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is not reachable")
    machine = type(f"GCMachine_{kind}", (GCMachine,), {"kind": kind})
    machine.TestCase.settings = settings(
        max_examples=60 if kind == "sqlite" else 25,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine.TestCase().runTest()


def test_tagging_a_trashed_manifest_rescues_its_closure(hub: Hub) -> None:
    """GC chose a manifest, its blobs and a referrer; before the sweep someone tags it again.
    The tag's hold rescues the whole closure, so the sweep leaves it whole."""
    with hub.session(ADMIN, "r") as s:
        m = push_artifact(s, "r", None, [b"layer one", b"layer two"])
        sig = push_artifact(s, "r", None, [b"signature"], subject=m, artifact_type="application/x.sig")
    gc = GarbageCollector(hub.catalog, hub.store)
    with hub.catalog.tx(exclusive=True) as conn:
        totals, _, _ = gc.mark(conn, grace=0, dry_run=False)
    assert totals["manifest"][0] == 2 and totals["blob"][0] == 4
    hub.tag(ADMIN, "r", "again", m.digest)
    _drained, removed = gc.drain()
    assert removed == 0
    manifests, blobs = store_objects(hub.store)
    assert {m.digest, sig.digest} <= manifests and len(blobs) == 4
    assert hub.fsck(ADMIN).ok
