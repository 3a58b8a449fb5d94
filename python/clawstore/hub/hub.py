"""`clawstore.hub.Hub`: the one entry point the hub service uses.

Every method takes the calling `Principal` first and raises `PermissionDeniedError` before doing
anything else. Content goes store first, then catalog, under a GC lease (see `clawstore.hub.gc`
for the protocol that makes pushes safe against a concurrent GC with grace 0):

    hub = Hub.open("file:///var/lib/clawstore")                 # catalog.sqlite beside the store
    me = hub.authenticate(token)
    with hub.session(me, "checkpoints/alice") as store:         # an ArtifactStore that records
        clawstore.checkpoints.create(store, "checkpoints/alice:latest", workdir)

A session is an `ArtifactStore` over the same backend that adds each digest to its lease before
relying on it, records manifests/blobs/tags in the catalog after the store write, and checks
tag operations against the principal's grants. Artifact kinds (checkpoints, volumes) take it
like any store and never know about the catalog.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from clawstore import mediatypes as mt
from clawstore.backends.base import ANY, BlobSource
from clawstore.digest import DEFAULT_ALGORITHM, Digest, digest_bytes
from clawstore.errors import (
    ClawstoreError,
    ManifestNotFoundError,
    PermissionDeniedError,
)
from clawstore.hub import catalog as c
from clawstore.hub.fsck import FsckReport, fsck
from clawstore.hub.gc import GarbageCollector, GCReport
from clawstore.hub.leases import DEFAULT_TTL, Lease, Leases, VolumeLease
from clawstore.hub.permissions import Permissions, Principal
from clawstore.hub.retention import Policy, Retention, RetentionReport
from clawstore.manifest import Descriptor, parse_manifest, references
from clawstore.names import Reference, validate_repository, validate_tag
from clawstore.reader import VerifyingReader
from clawstore.store import ArtifactStore


class HubSession(ArtifactStore):
    """An ArtifactStore bound to a principal, a repository and a GC lease (see module doc)."""

    def __init__(self, hub: Hub, principal: Principal, repo: str, lease: Lease) -> None:
        super().__init__(hub.store.backend)
        self.hub = hub
        self.principal = principal
        self.repo = repo
        self.lease = lease
        self._held: set[str] = set()
        self._pending: dict[str, int] = {}  # blobs written, catalog rows not yet
        self._closed = False

    def __repr__(self) -> str:
        return f"HubSession({self.repo!r}, {self.principal!r})"

    # -- leasing -----------------------------------------------------------------------------
    def hold(self, *digests: str) -> None:
        """Make `digests` GC roots for the life of this session (and rescue them from GC's trash).
        Digests this session already holds cost nothing (one transaction for the rest)."""
        new = {str(Digest.parse(d)) for d in digests} - self._held
        # Trust the cache only while the lease is far from expiry; otherwise add (a heartbeat,
        # which raises LeaseConflictError if the lease already lapsed).
        if new or self.lease.expires_at - time.time() < self.lease.ttl / 2:
            self.lease.add(new)
            self._held |= new

    # -- blobs -------------------------------------------------------------------------------
    def put_blob(self, src: BlobSource, expected: Digest | str | None = None, **kw: Any) -> Descriptor:
        if expected is not None:
            self.hold(expected)
            d = super().put_blob(src, expected, **kw)
            # Held by the lease already; its catalog row is written with the next manifest (or
            # when the session ends), one transaction for many blobs.
            self._pending[str(d.digest)] = d.size
            return d
        for _attempt in range(3):
            d = super().put_blob(src, None, **kw)
            with self.hub.catalog.tx() as conn:
                self.hub.leases.add_in(conn, self.lease, [str(d.digest)])
                c.record_blob(conn, d.digest, d.size)
            self._held.add(str(d.digest))
            # GC may have deleted an identical object between our write and the lease.
            if self.backend.blob_size(d.digest) == d.size:
                return d
            if isinstance(src, bytes | bytearray | memoryview | str | os.PathLike):
                continue
            if hasattr(src, "seek"):
                src.seek(0)  # type: ignore[union-attr]
                continue
            break
        raise ClawstoreError(f"blob {d.digest} was collected while uploading; retry the upload")

    def has_blob(self, digest: Digest | str) -> bool:
        self.hold(digest)
        return super().has_blob(digest)

    def stat_blob(self, digest: Digest | str) -> int:
        self.hold(digest)
        return super().stat_blob(digest)

    def delete_blob(self, digest: Digest | str) -> None:
        raise PermissionDeniedError("hub sessions do not delete blobs: untag and run gc")

    def delete_manifest(self, digest: Digest | str) -> None:
        raise PermissionDeniedError("hub sessions do not delete manifests: untag and run gc")

    # -- manifests ---------------------------------------------------------------------------
    def put_manifest(
        self, data: bytes, media_type: str | None = None, *, expected: Digest | str | None = None
    ) -> Descriptor:
        data = bytes(data)
        m = parse_manifest(data, media_type)
        exp = Digest.parse(expected) if expected is not None else None
        digest = digest_bytes(data, exp.algorithm if exp else DEFAULT_ALGORITHM)
        refs = references(m)
        self.hold(digest, *(d.digest for d in refs.blobs), *(d.digest for d in refs.manifests))
        desc = super().put_manifest(data, media_type, expected=expected)
        with self.hub.catalog.tx() as conn:
            pending, self._pending = self._pending, {}
            c.record_manifest(conn, desc.digest, m, len(data), repo=self.repo, extra_blobs=pending)
        return desc

    def _flush(self, conn: Any) -> None:
        t = c.now()
        rows = [
            {"digest": d, "size": size, "created_at": t, "seen_at": t, "adopted": False}
            for d, size in self._pending.items()
        ]
        c.upsert(conn, c.blobs, rows, ["digest"], ["seen_at", "adopted"])
        self._pending.clear()

    def has_manifest(self, digest: Digest | str) -> bool:
        self.hold(digest)
        return super().has_manifest(digest)

    # -- tags --------------------------------------------------------------------------------
    def resolve(self, repo: str, tag: str) -> Digest:
        self.hub.permissions.check(self.principal, "pull", validate_repository(repo))
        return super().resolve(repo, tag)

    def tag(self, repo: str, tag: str, digest: Digest | str, expect: Any = ANY) -> Digest | None:
        self.hub.permissions.check(self.principal, "push", validate_repository(repo))
        validate_tag(tag)
        d = Digest.parse(digest)
        self.hold(d)
        with self.hub.catalog.tx() as conn:
            if not GarbageCollector(self.hub.catalog, self.hub.store)._ensure_manifest(conn, str(d)):
                raise ManifestNotFoundError(f"cannot tag {repo}:{tag}: manifest {d} not found")
            # Tagging is a push of the manifest into `repo`: it restarts its grace clock.
            t = c.now()
            c.ensure_repository(conn, repo, t)
            conn.execute(c.manifests.update().where(c.manifests.c.digest == str(d)).values(seen_at=t))
            c.upsert(
                conn,
                c.repo_manifests,
                [{"repository": repo, "digest": str(d), "pushed_at": t}],
                ["repository", "digest"],
                ["pushed_at"],
            )
        # Held (and rescued) now: if GC deleted part of it before that, refuse to tag a torso.
        self._check_references(parse_manifest(self.get_manifest(d)))
        prev = super().tag(repo, tag, d, expect)
        with self.hub.catalog.tx() as conn:
            c.set_tag(conn, repo, tag, d, actor=self.principal.name)
        return prev

    def untag(self, repo: str, tag: str, expect: Any = ANY) -> Digest:
        self.hub.permissions.check(self.principal, "delete", validate_repository(repo))
        prev = super().untag(repo, tag, expect)
        with self.hub.catalog.tx() as conn:
            c.set_tag(conn, repo, tag, None, actor=self.principal.name)
        return prev

    def list_tags(self, repo: str) -> list[str]:
        self.hub.permissions.check(self.principal, "pull", validate_repository(repo))
        return super().list_tags(repo)

    def list_repos(self) -> list[str]:
        return self.hub.list_repos(self.principal)

    def cleanup(self, older_than: float = 3600.0) -> Any:
        raise PermissionDeniedError("cleanup belongs to gc")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                if self._pending:
                    with self.hub.catalog.tx() as conn:
                        self._flush(conn)
            finally:
                self.lease.release()


class Hub:
    """Store + catalog + permissions + leases + retention + GC. See the module docstring."""

    def __init__(
        self,
        store: ArtifactStore,
        catalog: c.Catalog | str | None = None,
        *,
        schema: str | None = None,
        create_catalog: bool = False,
    ) -> None:
        """`catalog`: a Catalog, a URL, or None for `<local store>/catalog.sqlite`. A URL naming
        a catalog that does not exist yet, beside a store that already has content, is refused
        unless `create_catalog`: a mistyped URL must not silently start an empty catalog that
        knows none of the store's pins, leases and grants (GC against it would not see them)."""
        self.store = store
        explicit = catalog is not None
        if catalog is None:
            root = getattr(store.backend, "root", None)
            if root is None:
                raise ClawstoreError(
                    "a store without a local root needs a catalog URL (e.g. postgresql+psycopg://...)"
                )
            catalog = c.default_catalog_url(root)
        if isinstance(catalog, c.Catalog):
            self.catalog = catalog
        else:
            cat = c.Catalog(catalog, schema=schema, migrate=False)
            try:
                if explicit and not create_catalog and not cat.exists() and _has_content(store):
                    raise ClawstoreError(
                        f"no catalog at {cat.url}, but the store {store.url} has content: a new, "
                        "empty catalog would know none of its pins, leases and grants. Check the "
                        "catalog URL; to start a catalog for this store, use --create-catalog"
                    )
                cat.migrate()
            except BaseException:
                cat.close()
                raise
            self.catalog = cat
        self.permissions = Permissions(self.catalog)
        self.leases = Leases(self.catalog)
        self.retention_policies = Retention(self.catalog)

    @classmethod
    def open(
        cls,
        store_url: str | os.PathLike[str] | None = None,
        catalog_url: str | None = None,
        *,
        schema: str | None = None,
        create_catalog: bool = False,
    ) -> Hub:
        import clawstore

        return cls(
            clawstore.open(store_url),
            catalog_url or os.environ.get("CLAWSTORE_CATALOG"),
            schema=schema,
            create_catalog=create_catalog,
        )

    def close(self) -> None:
        self.catalog.close()
        self.store.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- identity ----------------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal:
        return self.permissions.authenticate(token)

    def create_principal(self, principal: Principal, name: str) -> None:
        self.permissions.check(principal, "admin")
        self.permissions.create_principal(name)

    def issue_token(self, principal: Principal, name: str) -> str:
        self.permissions.check(principal, "admin")
        return self.permissions.issue_token(name)

    def revoke_token(self, principal: Principal, token_or_id: str) -> bool:
        self.permissions.check(principal, "admin")
        return self.permissions.revoke_token(token_or_id)

    def grant(self, principal: Principal, name: str, action: str, pattern: str) -> None:
        self.permissions.check(principal, "admin")
        self.permissions.grant(name, action, pattern)

    def revoke_grant(self, principal: Principal, name: str, action: str, pattern: str) -> bool:
        self.permissions.check(principal, "admin")
        return self.permissions.revoke_grant(name, action, pattern)

    # -- content -----------------------------------------------------------------------------
    @contextmanager
    def session(
        self, principal: Principal, repo: str, *, ttl: float = DEFAULT_TTL, kind: str = "upload"
    ) -> Iterator[HubSession]:
        """A recording, leased ArtifactStore for pushing to (and pulling from) `repo`."""
        self.permissions.check(principal, "push", validate_repository(repo))
        lease = self.leases.create(kind, principal.name, ttl)
        s = HubSession(self, principal, repo, lease)
        try:
            yield s
        finally:
            s.close()

    def push_blob(
        self,
        principal: Principal,
        repo: str,
        src: BlobSource,
        expected: Digest | str | None = None,
        media_type: str = mt.OCTET_STREAM,
    ) -> Descriptor:
        with self.session(principal, repo) as s:
            return s.put_blob(src, expected, media_type=media_type)

    def push_manifest(
        self,
        principal: Principal,
        repo: str,
        data: bytes,
        *,
        tag: str | None = None,
        media_type: str | None = None,
    ) -> Descriptor:
        with self.session(principal, repo) as s:
            d = s.put_manifest(data, media_type)
            if tag is not None:
                s.tag(repo, tag, d.digest)
            return d

    def get_blob(self, principal: Principal, repo: str, digest: Digest | str) -> VerifyingReader:
        self.permissions.check(principal, "pull", validate_repository(repo))
        return self.store.get_blob(digest)

    def get_manifest(self, principal: Principal, repo: str, reference: str) -> bytes:
        """`reference` is a tag or a digest."""
        self.permissions.check(principal, "pull", validate_repository(repo))
        d = Digest.parse(reference) if ":" in reference else self.store.resolve(repo, reference)
        return self.store.get_manifest(d)

    def resolve(self, principal: Principal, repo: str, tag: str) -> Digest:
        self.permissions.check(principal, "pull", validate_repository(repo))
        return self.store.resolve(repo, tag)

    def tag(
        self, principal: Principal, repo: str, tag: str, digest: Digest | str, expect: Any = ANY
    ) -> Digest | None:
        lease = self.leases.create("tag", principal.name, 600)
        try:
            self.permissions.check(principal, "push", validate_repository(repo))
            return HubSession(self, principal, repo, lease).tag(repo, tag, digest, expect)
        finally:
            lease.release()

    def untag(self, principal: Principal, repo: str, tag: str, expect: Any = ANY) -> Digest:
        self.permissions.check(principal, "delete", validate_repository(repo))
        prev = self.store.untag(repo, tag, expect)
        with self.catalog.tx() as conn:
            c.set_tag(conn, repo, tag, None, actor=principal.name)
        return prev

    def list_tags(self, principal: Principal, repo: str) -> list[str]:
        self.permissions.check(principal, "pull", validate_repository(repo))
        return self.store.list_tags(repo)

    def list_repos(self, principal: Principal) -> list[str]:
        out = []
        for repo in self.store.list_repos():
            try:
                self.permissions.check(principal, "pull", repo)
            except PermissionDeniedError:
                continue
            out.append(repo)
        return out

    def tag_history(self, principal: Principal, repo: str, tag: str | None = None) -> list[dict[str, Any]]:
        self.permissions.check(principal, "pull", validate_repository(repo))
        h = c.tag_history
        q = select(h).where(h.c.repository == repo).order_by(h.c.id)
        if tag is not None:
            q = q.where(h.c.tag == tag)
        with self.catalog.tx() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def catalog_manifest(
        self, principal: Principal, repo: str, digest: Digest | str
    ) -> dict[str, Any] | None:
        """The catalog's row for a manifest (digest, media type, artifactType, size, subject...)."""
        self.permissions.check(principal, "pull", validate_repository(repo))
        with self.catalog.tx() as conn:
            r = conn.execute(select(c.manifests).where(c.manifests.c.digest == str(digest))).first()
        return dict(r._mapping) if r is not None else None

    def referrers(self, principal: Principal, repo: str, digest: Digest | str) -> list[dict[str, Any]]:
        self.permissions.check(principal, "pull", validate_repository(repo))
        with self.catalog.tx() as conn:
            rows = conn.execute(select(c.manifests).where(c.manifests.c.subject == str(digest))).all()
        return [dict(r._mapping) for r in rows]

    # -- pins and leases ---------------------------------------------------------------------
    def pin(self, principal: Principal, digest: Digest | str, reason: str = "") -> None:
        self.permissions.check(principal, "admin")
        d = Digest.parse(digest)
        lease = self.leases.create("pin", principal.name, 600)
        try:
            lease.add([d])  # rescues it from GC's trash first
            with self.catalog.tx() as conn:
                c.upsert(
                    conn,
                    c.pins,
                    [{"digest": str(d), "reason": reason, "actor": principal.name, "created_at": c.now()}],
                    ["digest"],
                    ["reason"],
                )
        finally:
            lease.release()

    def unpin(self, principal: Principal, digest: Digest | str) -> None:
        self.permissions.check(principal, "admin")
        with self.catalog.tx() as conn:
            conn.execute(c.pins.delete().where(c.pins.c.digest == str(digest)))

    def lease(
        self, principal: Principal, repo: str, kind: str = "restore", ttl: float = DEFAULT_TTL
    ) -> Lease:
        """A GC lease for work in progress on `repo` (restores need pull, everything else push)."""
        self.permissions.check(principal, "pull" if kind == "restore" else "push", validate_repository(repo))
        return self.leases.create(kind, principal.name, ttl)

    def list_leases(self, principal: Principal) -> list[dict[str, Any]]:
        """GC and volume leases: all of them for an admin, else only the caller's own."""
        holder = self._own_only(principal)
        out: list[dict[str, Any]] = []
        for r in self.leases.list(holder):
            out.append({**r, "type": "gc"})
        for r in self.leases.list_volume(holder):
            out.append({**r, "type": "volume", "kind": f"volume-{r['mode']}", "resources": 1})
        return sorted(out, key=lambda r: (r["created_at"], r["id"]))

    def release_lease(self, principal: Principal, lease_id: str) -> bool:
        """Release a GC or volume lease (an admin any, others only their own). False if none."""
        own = self._own_only(principal)
        found = self.leases.holder_of(lease_id)
        if found is None:
            return False
        kind, holder = found
        if own is not None and own != holder:
            raise PermissionDeniedError(f"{principal.name} may not release lease {lease_id} (not theirs)")
        if kind == "gc":
            self.leases.release(lease_id)
        else:
            self.leases.release_volume(lease_id)
        return True

    def _own_only(self, principal: Principal) -> str | None:
        """None for an admin (everything), else the principal's name (after a token check)."""
        try:
            self.permissions.check(principal, "admin")
            return None
        except PermissionDeniedError:
            self.permissions.authenticated(principal)
            return principal.name

    def acquire_volume(
        self,
        principal: Principal,
        volume: str,
        mode: str = "rw",
        *,
        holder: str | None = None,
        ttl: float = 60.0,
    ) -> VolumeLease:
        """A volume lease: many 'ro' holders or one 'rw' holder; LeaseConflictError otherwise."""
        self.permissions.check(principal, "push" if mode == "rw" else "pull", validate_repository(volume))
        return self.leases.acquire_volume(volume, holder or principal.name, mode, ttl)

    # -- retention, gc, fsck -----------------------------------------------------------------
    def set_policy(self, principal: Principal, policy: Policy) -> None:
        self.permissions.check(principal, "admin")
        self.retention_policies.set(policy)

    def remove_policy(self, principal: Principal, pattern: str) -> bool:
        self.permissions.check(principal, "admin")
        return self.retention_policies.remove(pattern)

    def policies(self, principal: Principal) -> list[Policy]:
        self.permissions.check(principal, "admin")
        return self.retention_policies.list()

    def apply_retention(
        self, principal: Principal, *, dry_run: bool = False, grace: float = 3600.0
    ) -> RetentionReport:
        self.permissions.check(principal, "admin")
        return self.retention_policies.apply(self, dry_run=dry_run, grace=grace, actor=principal.name)

    def gc(
        self,
        principal: Principal,
        *,
        grace: float = 3600.0,
        dry_run: bool = False,
        scan_store: bool = True,
        **kw: Any,
    ) -> GCReport:
        self.permissions.check(principal, "admin")
        return GarbageCollector(self.catalog, self.store).run(
            grace=grace, dry_run=dry_run, scan_store=scan_store, **kw
        )

    def fsck(self, principal: Principal, *, rebuild: bool = False, verify_blobs: bool = False) -> FsckReport:
        self.permissions.check(principal, "admin")
        return fsck(self.catalog, self.store, rebuild=rebuild, verify_blobs=verify_blobs)

    # -- OCI image layout --------------------------------------------------------------------
    def export_oci(self, principal: Principal, ref: str, directory: str | os.PathLike[str]) -> Descriptor:
        from clawstore.hub.export import export_oci

        r = Reference.parse(ref)
        self.permissions.check(principal, "pull", r.repository)
        lease = self.leases.create("export", principal.name)
        try:
            digest = r.digest or self.store.resolve(r.repository, r.tag or "latest")
            lease.add([digest])
            return export_oci(self.store, digest, Path(directory), ref_name=r.tag)
        finally:
            lease.release()

    def import_oci(
        self,
        principal: Principal,
        directory: str | os.PathLike[str],
        repo: str,
        *,
        tags: list[str] | None = None,
    ) -> list[tuple[str, Digest]]:
        from clawstore.hub.export import import_oci

        with self.session(principal, repo, kind="import") as s:
            return import_oci(s, Path(directory), repo, tags=tags)


def _has_content(store: ArtifactStore) -> bool:
    """Any tag or blob at all (one listing call each, stopping at the first)."""
    if store.list_repos():
        return True
    return next(iter(store.iter_blobs()), None) is not None


__all__ = ["Hub", "HubSession"]
