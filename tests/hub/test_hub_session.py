"""Every read and write a hub session offers is leased, recorded, authorized by the hub, or
refused. The table below classifies each public name of `HubSession`; a name added to the
session (or to `ArtifactStore`, which it is) without a row here fails the first test, and each
row's check calls the method and looks at the catalog to see that it does what its class says."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore import PermissionDeniedError
from clawstore import mediatypes as mt
from clawstore.hub import Hub, HubSession
from clawstore.hub import catalog as c
from clawstore.hub.session import SessionBackend
from clawstore.manifest import ImageManifest
from hubutil import ADMIN, push_artifact
from sqlalchemy import select

REPO = "sess/app"


def _held(hub: Hub, s: HubSession) -> set[str]:
    with hub.catalog.tx() as conn:
        q = select(c.lease_resources.c.digest).where(c.lease_resources.c.lease_id == s.lease.id)
        return {r[0] for r in conn.execute(q)}


class World:
    """A pushed artifact (outside the session under test) and the digests to read."""

    def __init__(self, hub: Hub, tmp: Path) -> None:
        self.hub = hub
        self.tmp = tmp
        with hub.session(ADMIN, REPO) as s:
            self.art = push_artifact(s, REPO, "v1", [b"layer bytes for the session test"])
        m = hub.store.get_manifest_typed(self.art.digest)
        self.blob = str(m.layers[0].digest)  # type: ignore[union-attr]
        self.manifest = str(self.art.digest)


Check = Callable[[World, HubSession], None]


def leased_read(call: Callable[[HubSession, str], object], target: str = "blob") -> Check:
    def check(w: World, s: HubSession) -> None:
        d = getattr(w, target)
        assert d not in _held(w.hub, s)
        call(s, d)
        assert d in _held(w.hub, s), "read without holding the digest"

    return check


def refused(call: Callable[[HubSession, World], object]) -> Check:
    def check(w: World, s: HubSession) -> None:
        with pytest.raises(PermissionDeniedError):
            call(s, w)

    return check


def check_put_blob(w: World, s: HubSession) -> None:
    d = s.put_blob(b"new blob from the session")
    assert str(d.digest) in _held(w.hub, s)
    s.close()
    with w.hub.catalog.tx() as conn:
        row = conn.execute(select(c.blobs.c.size).where(c.blobs.c.digest == str(d.digest))).scalar()
    assert row == d.size, "blob not recorded"


def check_put_manifest(w: World, s: HubSession) -> None:
    d = push_artifact(s, "other/repo", None, [b"session manifest layer"])
    assert str(d.digest) in _held(w.hub, s)
    row = w.hub.catalog_manifest(ADMIN, REPO, d.digest)
    assert row is not None and row["size"] == d.size
    with w.hub.catalog.tx() as conn:
        repos = {r[0] for r in conn.execute(select(c.repo_manifests.c.repository))}
    assert s.repo in repos  # recorded in the session's repository


def check_operation(w: World, s: HubSession) -> None:
    """Within an operation the store does not ask the backend again about what it has just
    written or read (existence checks), but it still holds and records everything."""
    with s.operation():
        m = s.get_manifest_typed(w.manifest)  # learnt: it and the blobs it references
        assert isinstance(m, ImageManifest) and str(m.layers[0].digest) == w.blob
        assert w.blob not in _held(w.hub, s)
        layer = s.put_blob(b"operation layer")
        d = s.put_manifest(ImageManifest(m.config, (*m.layers, layer), artifact_type="a/b").to_json())
        assert {str(d.digest), str(layer.digest), w.blob} <= _held(w.hub, s)
        assert w.hub.catalog_manifest(ADMIN, REPO, d.digest) is not None
        s.tag(REPO, "op", d.digest)
        assert [h["new_digest"] for h in w.hub.tag_history(ADMIN, REPO, "op")] == [str(d.digest)]


def check_tag(w: World, s: HubSession) -> None:
    s.tag(REPO, "moved", w.manifest)
    assert w.manifest in _held(w.hub, s)
    assert [h["new_digest"] for h in w.hub.tag_history(ADMIN, REPO, "moved")] == [w.manifest]


def check_untag(w: World, s: HubSession) -> None:
    s.untag(REPO, "v1")
    assert [h["new_digest"] for h in w.hub.tag_history(ADMIN, REPO, "v1")] == [w.manifest, None]


def authorized(call: Callable[[HubSession], object]) -> Check:
    """Allowed for the session's principal, PermissionDeniedError for one without pull."""

    def check(w: World, s: HubSession) -> None:
        call(s)
        w.hub.permissions.create_principal("nobody")
        nobody = w.hub.permissions.authenticate(w.hub.permissions.issue_token("nobody"))
        w.hub.permissions.grant("nobody", "push", "elsewhere/*")
        with w.hub.session(nobody, "elsewhere/x") as other, pytest.raises(PermissionDeniedError):
            call(other)

    return check


def check_list_repos(w: World, s: HubSession) -> None:
    assert REPO in s.list_repos()
    w.hub.permissions.create_principal("nobody")
    nobody = w.hub.permissions.authenticate(w.hub.permissions.issue_token("nobody"))
    w.hub.permissions.grant("nobody", "push", "elsewhere/*")
    with w.hub.session(nobody, "elsewhere/x") as other:
        assert other.list_repos() == []  # filtered by the hub's permission check


def check_close(w: World, s: HubSession) -> None:
    lease = s.lease.id
    s.close()
    with w.hub.catalog.tx() as conn:
        assert conn.execute(select(c.leases).where(c.leases.c.id == lease)).first() is None
    with pytest.raises(clawstore.ClawstoreError):
        s.has_blob(w.blob)  # a closed session reads nothing


def check_hold(w: World, s: HubSession) -> None:
    s.hold(w.blob)
    assert w.blob in _held(w.hub, s)


def plain(expected: Callable[[HubSession], object]) -> Check:
    """Not a read or write of content: a value describing the session."""

    def check(w: World, s: HubSession) -> None:
        assert expected(s)

    return check


SURFACE: dict[str, Check] = {
    # leased reads
    "get_blob": leased_read(lambda s, d: s.get_blob(d).read()),
    "read_blob": leased_read(lambda s, d: s.read_blob(d)),
    "get_blob_to_path": leased_read(lambda s, d: s.get_blob_to_path(d, Path(s.url[7:]).parent / "out")),
    "blob_local_path": leased_read(lambda s, d: s.blob_local_path(d)),
    "get_blob_range": leased_read(lambda s, d: s.get_blob_range(d, 1, 3)),
    "stat_blob": leased_read(lambda s, d: s.stat_blob(d)),
    "has_blob": leased_read(lambda s, d: s.has_blob(d)),
    "get_manifest": leased_read(lambda s, d: s.get_manifest(d), "manifest"),
    "get_manifest_typed": leased_read(lambda s, d: s.get_manifest_typed(d), "manifest"),
    "has_manifest": leased_read(lambda s, d: s.has_manifest(d), "manifest"),
    "stat_manifest": leased_read(lambda s, d: s.stat_manifest(d), "manifest"),
    "resolve": leased_read(lambda s, d: s.resolve(REPO, "v1"), "manifest"),
    "resolve_ref": leased_read(lambda s, d: s.resolve_ref(f"{REPO}:v1"), "manifest"),
    "hold": check_hold,
    "operation": check_operation,
    # recorded writes
    "put_blob": check_put_blob,
    "put_manifest": check_put_manifest,
    "tag": check_tag,
    "untag": check_untag,
    # authorized by the hub (names, not content)
    "list_tags": authorized(lambda s: s.list_tags(REPO)),
    "list_repos": check_list_repos,
    # refused
    "delete_blob": refused(lambda s, w: s.delete_blob(w.blob)),
    "delete_manifest": refused(lambda s, w: s.delete_manifest(w.manifest)),
    "iter_blobs": refused(lambda s, w: list(s.iter_blobs())),
    "iter_manifests": refused(lambda s, w: list(s.iter_manifests())),
    "delete_blobs": refused(lambda s, w: s.delete_blobs([w.blob])),
    "delete_manifests": refused(lambda s, w: s.delete_manifests([w.manifest])),
    "iter_blob_sizes": refused(lambda s, w: list(s.iter_blob_sizes())),
    "iter_manifest_sizes": refused(lambda s, w: list(s.iter_manifest_sizes())),
    "cleanup": refused(lambda s, w: s.cleanup(0)),
    # the session itself
    "close": check_close,
    "url": plain(lambda s: s.url.startswith("file://")),
    "backend": plain(lambda s: isinstance(s.backend, SessionBackend)),
    "principal": plain(lambda s: s.principal == ADMIN),
    "repo": plain(lambda s: s.repo == REPO),
    "lease": plain(lambda s: bool(s.lease.id)),
    # no presigned URL through a session (it would skip the lease and the repository link
    # check): the wrapper has no such capability, and Hub.blob_url is the checked way
    "blob_url": plain(lambda s: s.blob_url("sha256:" + "0" * 64, 60) is None),
    "read_concurrency": plain(lambda s: s.read_concurrency >= 1),
    "remove_batch": plain(lambda s: s.remove_batch >= 1),
    "remove_concurrency": plain(lambda s: s.remove_concurrency >= 1),
}


def public_names(obj: object) -> set[str]:
    """Public attributes of a class or an instance (methods, properties, instance attributes)."""
    names = {n for n in dir(obj) if not n.startswith("_")}
    names |= {n for n in getattr(obj, "__annotations__", {}) if not n.startswith("_")}
    return names


def test_every_public_name_of_a_session_is_classified(hub: Hub) -> None:
    with hub.session(ADMIN, REPO) as s:
        names = public_names(s)
    missing = names - SURFACE.keys()
    assert not missing, f"HubSession offers {sorted(missing)} without a lease/record/refusal check here"
    assert not SURFACE.keys() - names, "stale rows"


def test_session_backend_wraps_every_backend_method() -> None:
    """The wrapper implements the whole Backend contract itself (nothing falls through)."""
    from clawstore.backends.base import Backend

    for name in public_names(Backend):
        if name == "url":
            continue
        assert name in SessionBackend.__dict__, f"SessionBackend does not wrap {name}"


@pytest.mark.parametrize("name", sorted(SURFACE))
def test_session_surface(name: str, catalog_url: str, tmp_path: Path) -> None:
    hub = Hub(clawstore.open(tmp_path / "store"), catalog_url)
    try:
        w = World(hub, tmp_path)
        with hub.session(ADMIN, REPO) as s:
            SURFACE[name](w, s)
    finally:
        hub.close()


def test_put_manifest_parses_and_digests_once(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import clawstore.store as store_mod

    calls: dict[str, int] = {"parse": 0, "digest": 0}
    real_parse, real_digest = store_mod.parse_manifest, store_mod.digest_bytes

    def parse(*a: Any, **k: Any) -> Any:
        calls["parse"] += 1
        return real_parse(*a, **k)

    def digest(*a: Any, **k: Any) -> Any:
        calls["digest"] += 1
        return real_digest(*a, **k)

    with hub.session(ADMIN, REPO) as s:
        cfg = s.put_blob(mt.EMPTY_JSON, media_type=mt.OCI_EMPTY)
        m = clawstore.ImageManifest(
            clawstore.Descriptor(cfg.digest, cfg.size, mt.OCI_EMPTY), (), artifact_type="application/vnd.test"
        )
        monkeypatch.setattr(store_mod, "parse_manifest", parse)
        monkeypatch.setattr(store_mod, "digest_bytes", digest)
        import clawstore.hub.session as session_mod

        assert not hasattr(session_mod, "parse_manifest") and not hasattr(session_mod, "digest_bytes")
        s.put_manifest(m.to_json())
    assert calls == {"parse": 1, "digest": 1}


def test_blob_rows_are_batched_and_a_held_digest_needs_no_head(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob whose digest is known only after the write: its catalog row waits for the next
    manifest (or the end of the session), and writing content the lease already held needs no
    look at the store afterwards."""
    backend_cls = type(hub.store.backend)
    looks: list[str] = []
    real_blob_size = backend_cls.blob_size

    def counting_blob_size(self: Any, digest: Any) -> Any:
        looks.append(str(digest))
        return real_blob_size(self, digest)

    def blob_row(digest: str) -> Any:
        with hub.catalog.tx() as conn:
            return conn.execute(select(c.blobs.c.size).where(c.blobs.c.digest == digest)).scalar()

    monkeypatch.setattr(backend_cls, "blob_size", counting_blob_size)
    with hub.session(ADMIN, REPO) as s:
        d = s.put_blob(b"written with no expected digest")
        assert looks == [str(d.digest)]  # not held before the write: one look after the lease
        assert blob_row(str(d.digest)) is None  # batched, not one transaction per blob
        looks.clear()
        assert s.put_blob(b"written with no expected digest") == d
        assert looks == []  # held before this write began: nothing can have swept it
    assert blob_row(str(d.digest)) == d.size
