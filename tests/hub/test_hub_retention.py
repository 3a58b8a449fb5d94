"""Retention policies: keep last N, keep within, keep tags matching, untagged grace; the dry
run lists exactly what the real run then removes, with the same bytes."""

from __future__ import annotations

import pytest
from clawstore import ClawstoreError
from clawstore.hub import Hub
from clawstore.hub import catalog as c
from clawstore.hub.retention import Policy
from hubutil import ADMIN, push_artifact, store_objects


def _age_tag(hub: Hub, repo: str, tag: str, seconds: float) -> None:
    with hub.catalog.tx() as conn:
        conn.execute(
            c.tags.update()
            .where(c.tags.c.repository == repo, c.tags.c.tag == tag)
            .values(updated_at=c.tags.c.updated_at - seconds)
        )


def _age_everything(hub: Hub, seconds: float) -> None:
    with hub.catalog.tx() as conn:
        conn.execute(c.manifests.update().values(seen_at=c.manifests.c.seen_at - seconds))
        conn.execute(c.blobs.update().values(seen_at=c.blobs.c.seen_at - seconds))
        conn.execute(c.repo_manifests.update().values(pushed_at=c.repo_manifests.c.pushed_at - seconds))


def test_keep_last_within_and_matching(hub: Hub) -> None:
    with hub.session(ADMIN, "ci/app") as s:
        for i in range(6):
            push_artifact(s, "ci/app", f"build-{i}", [f"payload {i}".encode()])
        push_artifact(s, "ci/app", "release-1", [b"release"])
    with hub.session(ADMIN, "other") as s:
        push_artifact(s, "other", "build-0", [b"untouched"])
    for i in range(6):
        _age_tag(hub, "ci/app", f"build-{i}", 1000 * (6 - i))  # build-5 newest
    _age_tag(hub, "ci/app", "release-1", 100_000)
    _age_everything(hub, 100_000)
    hub.set_policy(ADMIN, Policy("ci/**", keep_last=2, keep_tags=r"release-.*"))
    hub.set_policy(ADMIN, Policy("ci/*", keep_within=3500))  # keeps build-3 too (3000 s old)
    dry = hub.apply_retention(ADMIN, dry_run=True, grace=3600)
    removed = sorted(t for _r, t, _d in dry.tags)
    assert removed == ["build-0", "build-1", "build-2"]
    assert dry.bytes > 0 and dry.retention_bytes == dry.bytes  # nothing else was garbage
    before = store_objects(hub.store)
    assert hub.store.list_tags("ci/app") == sorted(
        ["build-0", "build-1", "build-2", "build-3", "build-4", "build-5", "release-1"]
    )
    assert store_objects(hub.store) == before  # dry run changed nothing
    real = hub.apply_retention(ADMIN, grace=3600)
    assert sorted(t for _r, t, _d in real.tags) == removed
    assert real.bytes == dry.bytes and real.gc_manifests == dry.gc_manifests == 3
    assert hub.store.list_tags("ci/app") == ["build-3", "build-4", "build-5", "release-1"]
    assert hub.store.list_tags("other") == ["build-0"]
    assert hub.fsck(ADMIN).ok


def test_untagged_grace_shortens_gc_grace_for_matching_repos(hub: Hub) -> None:
    with hub.session(ADMIN, "tmp/x") as s:
        scratch = push_artifact(s, "tmp/x", None, [b"scratch"])
    with hub.session(ADMIN, "prod/x") as s:
        kept = push_artifact(s, "prod/x", None, [b"prod scratch"])
    _age_everything(hub, 600)  # 10 minutes old: inside the 1 h GC grace
    hub.set_policy(ADMIN, Policy("tmp/**", untagged_grace=60))
    dry = hub.apply_retention(ADMIN, dry_run=True, grace=3600)
    assert dry.manifests == [scratch.digest]
    r = hub.apply_retention(ADMIN, grace=3600)
    assert r.manifests == [scratch.digest]
    manifests, _ = store_objects(hub.store)
    assert scratch.digest not in manifests and kept.digest in manifests
    assert hub.fsck(ADMIN).ok


def test_no_policy_no_change(hub: Hub) -> None:
    with hub.session(ADMIN, "a") as s:
        push_artifact(s, "a", "t", [b"x"])
    r = hub.apply_retention(ADMIN, grace=0)
    assert r.tags == [] and hub.store.list_tags("a") == ["t"]


def test_invalid_policies_rejected() -> None:
    with pytest.raises(ClawstoreError):
        Policy("x", keep_last=-1)
    with pytest.raises(ClawstoreError):
        Policy("x", keep_tags="(")


def test_one_run_over_many_repositories(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """One policy over 12 repositories: one apply untags across all of them (catalog removals
    batched, several transactions here), and one GC sweep collects every dropped manifest;
    the catalog's tags equal the store's afterwards, each removal in the tag history."""
    from clawstore.hub import retention

    monkeypatch.setattr(retention, "UNTAG_BATCH", 5)
    kept = {}
    for r in range(12):
        repo = f"fleet/agent{r}"
        with hub.session(ADMIN, repo) as s:
            for i in range(3):
                d = push_artifact(s, repo, f"snap-{i}", [f"{repo} {i}".encode()])
                _age_tag(hub, repo, f"snap-{i}", 1000 * (3 - i))
        kept[repo] = d.digest  # snap-2, the newest
    _age_everything(hub, 100_000)
    hub.set_policy(ADMIN, Policy("fleet/*", keep_last=1))
    dry = hub.apply_retention(ADMIN, dry_run=True, grace=0)
    r = hub.apply_retention(ADMIN, grace=0)
    assert len(r.tags) == 24 and sorted(r.tags) == sorted(dry.tags)
    assert (r.gc_manifests, r.bytes) == (dry.gc_manifests, dry.bytes) and r.gc_manifests == 24
    manifests, _blobs = store_objects(hub.store)
    assert manifests == set(kept.values())
    for repo, digest in kept.items():
        assert hub.store.list_tags(repo) == ["snap-2"] and hub.store.resolve(repo, "snap-2") == digest
    with hub.catalog.tx() as conn:
        cat = {(t.repository, t.tag) for t in conn.execute(c.tags.select())}
        history = conn.execute(
            c.tag_history.select().where(c.tag_history.c.actor == "retention:local-admin")
        ).all()
    assert cat == {(repo, "snap-2") for repo in kept}
    assert len(history) == 24 and all(h.new_digest is None for h in history)
    assert hub.fsck(ADMIN).ok


def test_retention_cannot_land_between_a_tags_store_and_catalog_writes(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 item 10, the interleaving round 54 of a 250-round loop hit: a replica's tag()
    has written the store and not yet the catalog when retention untags the same tag. Retention
    must wait for that tag() to finish (it holds the tag's lock across both writes); before the
    fix it ran in between, and the replica then recorded its older write in the catalog (store
    untagged, catalog tagged)."""
    import threading

    with hub.session(ADMIN, "ci/app") as s:
        old = push_artifact(s, "ci/app", "build-0", [b"build 0"])
        push_artifact(s, "ci/app", "build-1", [b"build 1"])
    _age_tag(hub, "ci/app", "build-0", 1000)
    hub.set_policy(ADMIN, Policy("ci/**", keep_last=1))
    backend = hub.store.backend
    swap = backend.swap_tag
    stored, release = threading.Event(), threading.Event()

    def swap_then_wait(repo: str, tag: str, new: object, expect: object) -> object:
        prev = swap(repo, tag, new, expect)
        if new is not None and threading.current_thread().name == "replica":
            stored.set()  # the replica's store write is done, its catalog write is not
            release.wait(60)
        return prev

    monkeypatch.setattr(backend, "swap_tag", swap_then_wait)
    errors: list[BaseException] = []

    def run(fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as e:
            errors.append(e)

    replica = threading.Thread(
        target=run, args=(lambda: hub.tag(ADMIN, "ci/app", "build-0", old.digest),), name="replica"
    )
    replica.start()
    assert stored.wait(60)
    retention = threading.Thread(target=run, args=(lambda: hub.apply_retention(ADMIN, grace=3600),))
    retention.start()
    retention.join(2)  # without the lock it finishes here, between the replica's two writes
    release.set()
    replica.join(60)
    retention.join(120)
    assert not errors, errors
    assert hub.store.list_tags("ci/app") == ["build-1"]  # retention came last, and won
    report = hub.fsck(ADMIN)
    assert report.ok, report
    assert hub.tag_history(ADMIN, "ci/app", "build-0")[-1]["new_digest"] is None
