"""Issue 16 (security and integrity), hub items: GC against writers outside the hub, tokens
that belong to someone else, lease TTLs and the lease commands. SQLite and PostgreSQL; local and
S3 stores where the store matters."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import clawstore
import pytest
from clawstore import ManifestNotFoundError, PermissionDeniedError
from clawstore.fsck import fsck as store_fsck
from clawstore.hub import GarbageCollector, Hub, Principal
from clawstore.hub import catalog as c
from hubutil import ADMIN, push_artifact
from sqlalchemy import select


@pytest.fixture(params=["local", "s3"])
def any_hub(request: pytest.FixtureRequest, catalog_url: str, tmp_path: Path) -> Iterator[Hub]:
    if request.param == "local":
        store = clawstore.open(tmp_path / "store")
    else:
        store = request.getfixturevalue("s3_store")
    h = Hub(store, catalog_url)
    yield h
    h.catalog.close()


# -- item 2: GC re-reads the store's tags inside its exclusive mark section ---------------------
def test_gc_keeps_what_a_writer_outside_the_hub_tags_during_the_run(
    any_hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`clawstore tag app:prod M` without a catalog, landing after GC read the tags (here: while
    it adopts orphans) used to exit 0 and then lose M and its blobs to that same GC run."""
    hub = any_hub
    with hub.session(ADMIN, "app") as s:
        old = push_artifact(s, "app", None, [b"old-layer"])
    hub.gc(ADMIN, grace=3600)  # M is known, untagged, and (with grace 0 below) garbage

    real_adopt = GarbageCollector.adopt_orphans

    def adopt_then_tag(self: GarbageCollector, conn: object = None) -> int:
        hub.store.tag("app", "prod", old.digest)  # a writer that knows no catalog
        return real_adopt(self, conn)  # type: ignore[arg-type]

    monkeypatch.setattr(GarbageCollector, "adopt_orphans", adopt_then_tag)
    report = hub.gc(ADMIN, grace=0)
    assert report.rescued_by_store_tags >= 2  # the manifest and its layer came back
    assert hub.store.has_manifest(old.digest)
    assert hub.store.has_blob(clawstore.digest_bytes(b"old-layer"))
    assert store_fsck(hub.store).ok
    monkeypatch.setattr(GarbageCollector, "adopt_orphans", real_adopt)
    # and the next run knows the tag as a root
    hub.gc(ADMIN, grace=0)
    assert hub.store.has_manifest(old.digest)
    assert hub.fsck(ADMIN).ok


# -- item 11: a token must belong to the principal it is presented with --------------------------
def test_token_of_another_principal_is_refused(any_hub: Hub) -> None:
    hub = any_hub
    with hub.session(ADMIN, "secret/vault") as s:
        push_artifact(s, "secret/vault", "v1", [b"bob's"])
    bob_token = hub.issue_token(ADMIN, "bob")
    hub.grant(ADMIN, "bob", "pull", "secret/**")
    alice_token = hub.issue_token(ADMIN, "alice")
    alice = hub.authenticate(alice_token)
    forged = Principal("bob", alice.token_id)  # alice's token, bob's name
    with pytest.raises(PermissionDeniedError, match="does not belong"):
        hub.resolve(forged, "secret/vault", "v1")
    bob = hub.authenticate(bob_token)
    assert hub.resolve(bob, "secret/vault", "v1")


# -- item 10: a session's TTL is what its heartbeat extends by ------------------------------------
def test_session_ttl_is_the_heartbeat_ttl(any_hub: Hub) -> None:
    hub = any_hub
    before = time.time()
    with hub.session(ADMIN, "r", ttl=60) as s:
        s.put_blob(b"first write")
        s.put_blob(b"second write", expected=clawstore.digest_bytes(b"second write"))
        with hub.catalog.tx() as conn:
            exp = conn.execute(select(c.leases.c.expires_at).where(c.leases.c.id == s.lease.id)).scalar()
        # 60 s from some instant of this test, never the default 3600 s
        assert exp is not None and exp < time.time() + 61 and exp >= before + 60
        assert s.lease.ttl == 60


# -- item 10: lease ls / release, permission-checked ----------------------------------------------
def test_lease_ls_and_release_are_permission_checked(any_hub: Hub) -> None:
    hub = any_hub
    alice_tok = hub.issue_token(ADMIN, "alice")
    bob_tok = hub.issue_token(ADMIN, "bob")
    hub.grant(ADMIN, "alice", "push", "alice/**")
    hub.grant(ADMIN, "bob", "push", "bob/**")
    alice, bob = hub.authenticate(alice_tok), hub.authenticate(bob_tok)
    la = hub.lease(alice, "alice/x", kind="upload")
    lb = hub.lease(bob, "bob/x", kind="upload")
    vol = hub.acquire_volume(bob, "bob/vol", "rw")
    assert {r["id"] for r in hub.list_leases(alice)} == {la.id}
    assert {r["id"] for r in hub.list_leases(bob)} == {lb.id, vol.id}
    assert {la.id, lb.id, vol.id} <= {r["id"] for r in hub.list_leases(ADMIN)}
    with pytest.raises(PermissionDeniedError):
        hub.release_lease(alice, lb.id)
    assert hub.release_lease(bob, vol.id)
    assert hub.release_lease(ADMIN, la.id)
    assert not hub.release_lease(ADMIN, la.id)
    hub.revoke_token(ADMIN, bob_tok)
    with pytest.raises(PermissionDeniedError):
        hub.list_leases(bob)
    with pytest.raises(PermissionDeniedError):
        hub.release_lease(bob, lb.id)
    assert {r["id"] for r in hub.list_leases(ADMIN)} >= {lb.id}


def test_lease_cli(catalog_url: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["CLAWSTORE_URL"] = str(tmp_path / "store")
    env["CLAWSTORE_CATALOG"] = catalog_url
    env.pop("CLAWSTORE_TOKEN", None)

    def run(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        e = dict(env)
        if token:
            e["CLAWSTORE_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-c", "from clawstore.cli import main; main()", *args],
            capture_output=True,
            text=True,
            env=e,
            timeout=120,
        )

    clawstore.open(tmp_path / "store").put_blob(b"x")
    hub = Hub(clawstore.open(tmp_path / "store"), catalog_url, create_catalog=True)
    tok = hub.issue_token(ADMIN, "carol")
    hub.grant(ADMIN, "carol", "push", "carol/**")
    lease = hub.lease(hub.authenticate(tok), "carol/x", kind="upload", ttl=3600)
    other = hub.lease(ADMIN, "admin/x", kind="upload")
    hub.catalog.close()
    r = run("lease", "ls", token=tok)
    assert r.returncode == 0, r.stderr
    assert lease.id in r.stdout and other.id not in r.stdout
    r = run("lease", "release", other.id, token=tok)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert run("lease", "release", lease.id, token=tok).returncode == 0
    r = run("lease", "ls")
    assert other.id in r.stdout and lease.id not in r.stdout


# -- item 1: a digest is served only where it is linked ------------------------------------------
@pytest.fixture
def tenants(any_hub: Hub) -> tuple[Hub, Principal, clawstore.Descriptor, str]:
    """bob's secret at secret/vault:v1 (manifest digest, and its layer's digest); alice may push
    and pull alice/** only."""
    hub = any_hub
    with hub.session(ADMIN, "secret/vault") as s:
        m = push_artifact(s, "secret/vault", "v1", [b"bob's secret layer"])
    tok = hub.issue_token(ADMIN, "alice")
    hub.grant(ADMIN, "alice", "push", "alice/**")
    hub.grant(ADMIN, "alice", "pull", "alice/**")
    return hub, hub.authenticate(tok), m, str(clawstore.digest_bytes(b"bob's secret layer"))


def test_hub_reads_by_digest_need_a_link(tenants: tuple[Hub, Principal, clawstore.Descriptor, str]) -> None:
    from clawstore.errors import NotFoundError

    hub, alice, m, layer = tenants
    with pytest.raises(NotFoundError):
        hub.get_blob(alice, "alice/nothing", layer)
    with pytest.raises(NotFoundError):
        hub.get_manifest(alice, "alice/nothing", str(m.digest))
    assert hub.catalog_manifest(alice, "alice/nothing", m.digest) is None
    # the owner's side still works, and an admin reads anything
    assert hub.get_manifest(ADMIN, "secret/vault", str(m.digest))
    hub.get_blob(ADMIN, "secret/vault", layer).close()


def test_export_by_digest_needs_a_link(
    tenants: tuple[Hub, Principal, clawstore.Descriptor, str], tmp_path: Path
) -> None:
    from clawstore.errors import NotFoundError

    hub, alice, m, _layer = tenants
    with pytest.raises(NotFoundError):
        hub.export_oci(alice, f"alice/nothing@{m.digest}", tmp_path / "oci")
    assert not (tmp_path / "oci" / "index.json").exists()


def test_tag_cannot_pull_another_repositorys_manifest_in(
    tenants: tuple[Hub, Principal, clawstore.Descriptor, str],
) -> None:
    from clawstore.errors import NotFoundError

    hub, alice, m, layer = tenants
    with pytest.raises(NotFoundError):
        hub.tag(alice, "alice/loot", "v1", m.digest)
    with pytest.raises(NotFoundError):
        hub.get_blob(alice, "alice/loot", layer)


def test_session_reads_and_references_need_a_link_or_the_bytes(
    tenants: tuple[Hub, Principal, clawstore.Descriptor, str], tmp_path: Path
) -> None:
    import json

    from clawstore.errors import DigestMismatchError, InvalidManifestError, NotFoundError

    hub, alice, m, layer = tenants
    with hub.session(alice, "alice/app") as s:
        assert not s.has_blob(layer)
        assert not s.has_manifest(m.digest)
        with pytest.raises(NotFoundError):
            s.read_blob(layer)
        with pytest.raises(NotFoundError):
            s.get_manifest(m.digest)
        # A manifest referencing bob's layer by digest alone is a dangling reference here...
        forged = json.loads(hub.store.get_manifest(m.digest))
        with pytest.raises((InvalidManifestError, NotFoundError)):
            s.put_manifest(json.dumps(forged).encode())
        # ...and claiming it with other bytes of the same size is caught (hashed, not trusted).
        fake = tmp_path / "fake"
        fake.write_bytes(b"X" * len(b"bob's secret layer"))
        with pytest.raises(DigestMismatchError):
            s.put_blob(fake, expected=layer, trust_size=True)
        # Holding the bytes is proof enough: then it is alice's too.
        real = tmp_path / "real"
        real.write_bytes(b"bob's secret layer")
        assert str(s.put_blob(real, expected=layer).digest) == layer
        assert s.read_blob(layer) == b"bob's secret layer"


def test_checkpoint_restore_by_digest_of_another_repository(catalog_url: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["CLAWSTORE_URL"] = str(tmp_path / "store")
    env["CLAWSTORE_CATALOG"] = catalog_url
    env.pop("CLAWSTORE_TOKEN", None)

    def run(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        e = dict(env)
        if token:
            e["CLAWSTORE_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-c", "from clawstore.cli import main; main()", *args],
            capture_output=True,
            text=True,
            env=e,
            timeout=120,
        )

    src = tmp_path / "secret"
    src.mkdir()
    (src / "key").write_text("bob's key")
    r = run("checkpoint", "create", str(src), "secret/vault:v1")
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip().split()[-1]
    assert digest.startswith("sha256:")
    tok = run("token", "issue", "alice").stdout.strip()
    assert run("grant", "add", "alice", "push", "alice/**").returncode == 0
    assert run("grant", "add", "alice", "pull", "alice/**").returncode == 0
    r = run("checkpoint", "restore", f"alice/nothing@{digest}", str(tmp_path / "out"), token=tok)
    assert r.returncode != 0 and r.stderr.startswith("error: "), r.stderr
    assert not (tmp_path / "out" / "key").exists()
    r = run("export", f"alice/nothing@{digest}", "--oci-layout", str(tmp_path / "oci"), token=tok)
    assert r.returncode != 0 and r.stderr.startswith("error: "), r.stderr


# -- item 11: revocation stops open sessions ------------------------------------------------------
def test_revoked_token_stops_an_open_session(any_hub: Hub) -> None:
    hub = any_hub
    tok = hub.issue_token(ADMIN, "dave")
    hub.grant(ADMIN, "dave", "push", "dave/**")
    dave = hub.authenticate(tok)
    with hub.session(dave, "dave/app") as s:
        s.put_blob(b"before revocation")
        hub.revoke_token(ADMIN, tok)
        with pytest.raises(PermissionDeniedError):
            s.put_blob(b"after revocation")
        with pytest.raises(PermissionDeniedError):
            s.put_blob(b"after, known digest", expected=clawstore.digest_bytes(b"after, known digest"))
        with pytest.raises(PermissionDeniedError):
            s.hold(clawstore.digest_bytes(b"anything"))


# -- item 8: what a checkpoint needs, GC keeps; fsck reports a checkpoint whose volume is gone ------
def test_checkpoint_keeps_its_volume_and_fsck_reports_a_lost_one(any_hub: Hub, tmp_path: Path) -> None:
    from clawstore import checkpoints, volumes

    hub = any_hub
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f").write_text("version 1")
    with hub.session(ADMIN, "vol/w") as s:
        v1 = volumes.snapshot(s, ws, "vol/w:latest")
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "state").write_text("s")
    with hub.session(ADMIN, "ck/a") as s:
        ck = checkpoints.create(s, "ck/a:latest", agent, volume="vol/w:latest")
    (ws / "f").write_text("version 2, longer")
    with hub.session(ADMIN, "vol/w") as s:
        v2 = volumes.snapshot(s, ws, "vol/w:latest", full=True)
    assert v2.digest != v1.digest
    hub.gc(ADMIN, grace=0)
    # The checkpoint's volume is still whole and restores.
    assert hub.store.has_manifest(v1.digest)
    out = tmp_path / "out"
    volumes.restore(hub.store, f"vol/w@{v1.digest}", out)
    assert (out / "f").read_text() == "version 1"
    assert store_fsck(hub.store).ok
    # A volume lost anyway (deleted behind GC's back) is an fsck error, not "ok".
    hub.store.delete_manifest(v1.digest)
    report = store_fsck(hub.store)
    assert not report.ok
    assert any("needs manifest" in str(p) and str(ck.descriptor.digest) in str(p) for p in report.problems)


# -- item 10: a replica's tag() between retention's store untag and its catalog write -------------
def test_replica_tag_during_retention_survives(any_hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from clawstore.hub.retention import Policy

    hub = any_hub
    with hub.session(ADMIN, "ci/app") as s:
        old = push_artifact(s, "ci/app", "build-0", [b"old build"])
        push_artifact(s, "ci/app", "build-1", [b"new build"])
    with hub.catalog.tx() as conn:  # build-0 is the older tag
        conn.execute(
            c.tags.update()
            .where(c.tags.c.repository == "ci/app", c.tags.c.tag == "build-0")
            .values(updated_at=c.tags.c.updated_at - 1000)
        )
    hub.set_policy(ADMIN, Policy("ci/**", keep_last=1))
    real_untag = type(hub.store).untag
    replicas: list[threading.Thread] = []
    errors: list[BaseException] = []

    def replica_tags() -> None:
        try:
            Hub(hub.store, hub.catalog).tag(ADMIN, "ci/app", "build-0", old.digest)
        except BaseException as e:
            errors.append(e)

    def untag_then_replica_tags(
        self: clawstore.ArtifactStore, repo: str, tag: str, expect: object = None
    ) -> object:
        prev = real_untag(self, repo, tag, expect)  # type: ignore[arg-type]
        if (repo, tag) == ("ci/app", "build-0"):
            # another replica re-tags it right now, between retention's store and catalog
            # writes: it waits for the tag's lock (retention holds it across both) and lands
            # after; before the per-tag lock it ran in between.
            t = threading.Thread(target=replica_tags)
            t.start()
            replicas.append(t)
            t.join(2)
        return prev

    monkeypatch.setattr(type(hub.store), "untag", untag_then_replica_tags)
    hub.apply_retention(ADMIN, grace=0)
    monkeypatch.setattr(type(hub.store), "untag", real_untag)
    for t in replicas:
        t.join(120)
    assert replicas
    if errors:  # SQLite: the replica's lease waited for retention, whose GC (grace 0) came first
        assert [type(e) for e in errors] == [ManifestNotFoundError], errors
        assert "build-0" not in hub.store.list_tags("ci/app")
    else:  # it landed after retention: tagged, with its content, in the store and the catalog
        assert hub.store.resolve("ci/app", "build-0") == old.digest
        assert hub.store.has_manifest(old.digest)
        assert hub.store.has_blob(clawstore.digest_bytes(b"old build"))
    assert store_fsck(hub.store).ok
    report = hub.fsck(ADMIN)
    assert report.ok, report
