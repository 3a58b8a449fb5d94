"""`clawstore.hub.Hub`: the one entry point the hub service uses.

Every method takes the calling `Principal` first and raises `PermissionDeniedError` before doing
anything else. Content goes store first, then catalog, under a GC lease (see `clawstore.hub.gc`
for the protocol that makes pushes safe against a concurrent GC with grace 0):

    hub = Hub.open("file:///var/lib/clawstore")                 # catalog.sqlite beside the store
    me = hub.authenticate(token)
    with hub.session(me, "checkpoints/alice") as store:         # an ArtifactStore that records
        clawstore.checkpoints.create(store, "checkpoints/alice:latest", workdir)

A session (`clawstore.hub.session`) is a plain `ArtifactStore` over a recording, leasing wrapper
of the hub's backend: the wrapper adds each digest to the session's lease before relying on it,
records manifests/blobs/tags in the catalog after the store write, and asks this class's
`_authorize` before every tag operation. Permission checks live here only. Artifact kinds
(checkpoints, volumes) take a session like any store and never know about the catalog.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select

from clawstore import mediatypes as mt
from clawstore.backends.base import LocalRoot
from clawstore.digest import Digest
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    ManifestNotFoundError,
    PermissionDeniedError,
    RefNotFoundError,
    TagConflictError,
)
from clawstore.hub import catalog as c
from clawstore.hub.fsck import FsckReport, fsck
from clawstore.hub.gc import GarbageCollector, GCReport
from clawstore.hub.leases import DEFAULT_TTL, Lease, Leases, VolumeLease
from clawstore.hub.permissions import Permissions, Principal
from clawstore.hub.retention import Policy, Retention, RetentionReport
from clawstore.hub.session import HubSession, SessionBackend
from clawstore.hub.uploads import Uploads, UploadState
from clawstore.manifest import Descriptor
from clawstore.names import Reference, validate_repository
from clawstore.reader import VerifyingReader
from clawstore.store import ArtifactStore
from clawstore.types import ANY, BlobSource


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
            if not isinstance(store.backend, LocalRoot):
                raise ClawstoreError(
                    "a store without a local root needs a catalog URL (e.g. postgresql+psycopg://...)"
                )
            catalog = c.default_catalog_url(store.backend.root)
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
        self.uploads = Uploads(self.catalog, self.store, self.leases)

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
    def _authorize(self, principal: Principal, action: str, repo: str) -> None:
        """The hub's one permission check for content: PermissionDeniedError unless allowed."""
        self.permissions.check(principal, action, validate_repository(repo))

    def _may_read(
        self, principal: Principal, digest: Digest | str, repo: str | None = None, *, own: str | None = None
    ) -> bool:
        """Whether `digest` is linked (see `catalog.linked_repositories`) to `repo` (when the
        request names one: the caller's pull on it is checked separately), or else to `own` (a
        session's repository) or any repository `principal` may pull. A digest is served on no
        other grounds: knowing a digest is not a right to its content."""
        if principal.system:
            return True
        with self.catalog.read() as conn:
            repos = c.linked_repositories(conn, str(Digest.parse(digest)))
        if repo is not None:
            return repo in repos
        if own is not None and own in repos:
            return True
        return self.permissions.may(principal, "pull", repos)

    def require_in_repository(self, principal: Principal, repo: str, digest: Digest | str) -> None:
        """For readers that go to the store themselves (checkpoint restore by digest): pull on
        `repo`, and `digest` linked to it; ManifestNotFoundError otherwise (as if absent)."""
        self._authorize(principal, "pull", repo)
        if not self._may_read(principal, digest, repo):
            raise ManifestNotFoundError(f"manifest {digest} not found in {repo}")

    def _open_session(
        self,
        principal: Principal,
        repo: str,
        kind: str,
        ttl: float = DEFAULT_TTL,
        lease: Lease | None = None,
    ) -> HubSession:
        """A session on a new lease, or on `lease` (which then outlives the session)."""
        own_lease = lease is None
        if lease is None:
            lease = self.leases.create(kind, principal.name, ttl)
        backend = SessionBackend(
            self.store.backend,
            self.catalog,
            lease,
            repo=repo,
            actor=principal.name,
            authorize=partial(self._authorize, principal),
            may_read=partial(self._may_read, principal, own=repo),
            release_lease=own_lease,
        )
        return HubSession(backend, principal)

    @contextmanager
    def session(
        self, principal: Principal, repo: str, *, ttl: float = DEFAULT_TTL, kind: str = "upload"
    ) -> Iterator[HubSession]:
        """A recording, leased ArtifactStore for pushing to (and pulling from) `repo`."""
        self._authorize(principal, "push", repo)
        s = self._open_session(principal, repo, kind, ttl)
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

    def _readable_blob(self, principal: Principal, repo: str, digest: Digest | str) -> Digest:
        """`digest` as a blob `principal` may read in `repo`: pull granted there and the blob
        linked to it; BlobNotFoundError (the same as an absent one) otherwise."""
        self._authorize(principal, "pull", repo)
        d = Digest.parse(digest)
        if not self._may_read(principal, d, repo):
            raise BlobNotFoundError(f"blob {d} not found in {repo}")
        return d

    def get_blob(self, principal: Principal, repo: str, digest: Digest | str) -> VerifyingReader:
        """A blob of `repo`: one referenced by a manifest in it (not merely stored: a digest of
        another repository is "not found" here, exactly like an absent one)."""
        d = self._readable_blob(principal, repo, digest)
        return self.store.get_blob(d)

    def get_manifest(self, principal: Principal, repo: str, reference: str) -> bytes:
        """`reference` is a tag or a digest (of a manifest in `repo`)."""
        self._authorize(principal, "pull", repo)
        if ":" in reference:
            d = Digest.parse(reference)
            if not self._may_read(principal, d, repo):
                raise ManifestNotFoundError(f"manifest {d} not found in {repo}")
        else:
            d = self.store.resolve(repo, reference)
        return self.store.get_manifest(d)

    def resolve(self, principal: Principal, repo: str, tag: str) -> Digest:
        self._authorize(principal, "pull", repo)
        return self.store.resolve(repo, tag)

    def tag(
        self, principal: Principal, repo: str, tag: str, digest: Digest | str, expect: Any = ANY
    ) -> Digest | None:
        self._authorize(principal, "push", repo)  # before anything is written (the lease)
        with closing(self._open_session(principal, repo, "tag", 600)) as s:
            return s.tag(repo, tag, digest, expect)

    def untag(self, principal: Principal, repo: str, tag: str, expect: Any = ANY) -> Digest:
        self._authorize(principal, "delete", repo)
        with closing(self._open_session(principal, repo, "tag", 600)) as s:
            return s.untag(repo, tag, expect)

    def list_tags(self, principal: Principal, repo: str) -> list[str]:
        self._authorize(principal, "pull", repo)
        return self.store.list_tags(repo)

    def list_repos(self, principal: Principal) -> list[str]:
        out = []
        for repo in self.store.list_repos():
            try:
                self._authorize(principal, "pull", repo)
            except PermissionDeniedError:
                continue
            out.append(repo)
        return out

    def tag_history(self, principal: Principal, repo: str, tag: str | None = None) -> list[dict[str, Any]]:
        self._authorize(principal, "pull", repo)
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
        self._authorize(principal, "pull", repo)
        if not self._may_read(principal, digest, repo):
            return None
        with self.catalog.tx() as conn:
            r = conn.execute(select(c.manifests).where(c.manifests.c.digest == str(digest))).first()
        return dict(r._mapping) if r is not None else None

    def referrers(self, principal: Principal, repo: str, digest: Digest | str) -> list[dict[str, Any]]:
        """Manifests of `repo` whose subject is `digest`."""
        self._authorize(principal, "pull", repo)
        with self.catalog.tx() as conn:
            rows = conn.execute(select(c.manifests).where(c.manifests.c.subject == str(digest))).all()
            return [
                dict(r._mapping)
                for r in rows
                if principal.system or repo in c.linked_repositories(conn, r.digest)
            ]

    # -- what the OCI registry needs beyond the above ----------------------------------------
    def allowed_actions(self, principal: Principal, repo: str, wanted: set[str]) -> set[str]:
        """Which of `wanted` (pull/push/delete) `principal` may do on `repo`: what a registry
        token scoped to `repo` may carry. Never raises for a missing grant."""
        out = set()
        for action in sorted(wanted):
            try:
                self._authorize(principal, action, repo)
            except PermissionDeniedError:
                continue
            out.add(action)
        return out

    def has_repository(self, principal: Principal, repo: str) -> bool:
        """Whether anything was ever pushed to `repo` (a manifest, a tag, an uploaded blob)."""
        self._authorize(principal, "pull", repo)
        with self.catalog.tx() as conn:
            for q in (
                select(c.repositories.c.name).where(c.repositories.c.name == repo),
                select(c.repo_blobs.c.repository).where(c.repo_blobs.c.repository == repo).limit(1),
            ):
                if conn.execute(q).first() is not None:
                    return True
        return bool(self.store.list_tags(repo))

    def stat_blob(self, principal: Principal, repo: str, digest: Digest | str) -> int:
        """Size of a blob of `repo` (linked to it, as in `get_blob`); BlobNotFoundError."""
        d = self._readable_blob(principal, repo, digest)
        return self.store.stat_blob(d)

    def blob_url(self, principal: Principal, repo: str, digest: Digest | str, ttl: float) -> str | None:
        """A time-limited URL of a blob of `repo` (linked to it, as in `get_blob`, and stored:
        BlobNotFoundError otherwise), or None when the store cannot make one (local). What the
        registry redirects blob GETs to when told to."""
        d = self._readable_blob(principal, repo, digest)
        url = self.store.blob_url(d, ttl)
        if url is not None:
            self.store.stat_blob(d)  # a URL of nothing would be the client's 404 from S3
        return url

    def read_blob_range(
        self, principal: Principal, repo: str, digest: Digest | str, offset: int, length: int
    ) -> bytes:
        """Part of a blob of `repo` (unverified: a part cannot be checked against the digest of
        the whole; the client checks the whole it reassembles)."""
        d = self._readable_blob(principal, repo, digest)
        return self.store.get_blob_range(d, offset, length)

    def mount_blob(self, principal: Principal, repo: str, digest: Digest | str, source: str) -> Descriptor:
        """Link a blob of `source` into `repo` without moving bytes (push on `repo`, pull on
        `source`, and the blob linked to `source`); BlobNotFoundError otherwise. Held by a lease
        of the upload TTL, like an uploaded blob, until a manifest references it."""
        self._authorize(principal, "push", repo)
        self._authorize(principal, "pull", validate_repository(source))
        d = Digest.parse(digest)
        if not self._may_read(principal, d, source):
            raise BlobNotFoundError(f"blob {d} not found in {source}")
        lease = self.leases.create("registry-mount", principal.name, self.uploads.ttl)
        lease.add([str(d)])
        size = self.store.stat_blob(d)  # held now: it stays
        with self.catalog.tx() as conn:
            c.upsert(
                conn,
                c.repo_blobs,
                [{"repository": repo, "digest": str(d), "pushed_at": c.now()}],
                ["repository", "digest"],
                ["pushed_at"],
            )
        return Descriptor(d, size)

    def unlink_blob(self, principal: Principal, repo: str, digest: Digest | str) -> None:
        """Remove an uploaded or mounted blob from `repo` (delete grant). Manifests of `repo`
        that reference it still link it; the bytes go with GC. BlobNotFoundError if it was not
        uploaded to or mounted in `repo`."""
        self._authorize(principal, "delete", repo)
        d = Digest.parse(digest)
        with self.catalog.tx() as conn:
            r = conn.execute(
                c.repo_blobs.delete().where(
                    c.repo_blobs.c.repository == repo, c.repo_blobs.c.digest == str(d)
                )
            )
        if not r.rowcount:
            raise BlobNotFoundError(f"blob {d} not found in {repo}")

    def delete_manifest(self, principal: Principal, repo: str, digest: Digest | str) -> list[str]:
        """Remove manifest `digest` from `repo` (delete grant): untag every tag of `repo` that
        points at it, then drop its link to `repo`. The bytes go with GC. Returns the tags
        removed; ManifestNotFoundError if it was not in `repo`."""
        self._authorize(principal, "delete", repo)
        d = Digest.parse(digest)
        if not self._may_read(principal, d, repo):
            raise ManifestNotFoundError(f"manifest {d} not found in {repo}")
        removed = []
        with closing(self._open_session(principal, repo, "tag", 600)) as s:
            for tag in s.list_tags(repo):
                try:
                    s.untag(repo, tag, expect=d)
                except (TagConflictError, RefNotFoundError):
                    continue
                removed.append(tag)
        with self.catalog.tx() as conn:
            conn.execute(
                c.repo_manifests.delete().where(
                    c.repo_manifests.c.repository == repo, c.repo_manifests.c.digest == str(d)
                )
            )
        return removed

    def setting(self, name: str, make: Any) -> str:
        """A hub-wide setting, created by `make()` on first use; every process on the catalog
        reads the same value (the first insert wins)."""
        with self.catalog.tx() as conn:
            v = conn.execute(select(c.settings.c.value).where(c.settings.c.name == name)).scalar()
            if v is not None:
                return str(v)
            c.upsert(conn, c.settings, [{"name": name, "value": str(make())}], ["name"])
        with self.catalog.tx() as conn:
            return str(conn.execute(select(c.settings.c.value).where(c.settings.c.name == name)).scalar_one())

    # -- resumable uploads (registry upload sessions; see clawstore.hub.uploads) ---------------
    def _upload_session(self, principal: Principal, repo: str, lease: Lease) -> HubSession:
        return self._open_session(principal, repo, "registry-upload", lease=lease)

    def start_upload(self, principal: Principal, repo: str) -> UploadState:
        self._authorize(principal, "push", repo)
        return self.uploads.start(repo, principal.name)

    def upload_status(self, principal: Principal, repo: str, upload_id: str) -> UploadState:
        self._authorize(principal, "push", repo)
        return self.uploads.get(upload_id, repo, principal.name)

    def upload_chunk(
        self, principal: Principal, repo: str, upload_id: str, src: BinaryIO, start: int | None = None
    ) -> UploadState:
        self._authorize(principal, "push", repo)
        st = self.uploads.get(upload_id, repo, principal.name)
        return self.uploads.append(st, src, partial(self._upload_session, principal, repo), start)

    def finish_upload(
        self, principal: Principal, repo: str, upload_id: str, digest: Digest | str, src: BinaryIO | None
    ) -> Descriptor:
        self._authorize(principal, "push", repo)
        d = Digest.parse(digest)
        st = self.uploads.get(upload_id, repo, principal.name)
        return self.uploads.finish(st, d, src, partial(self._upload_session, principal, repo))

    def cancel_upload(self, principal: Principal, repo: str, upload_id: str) -> None:
        self._authorize(principal, "push", repo)
        self.uploads.cancel(self.uploads.get(upload_id, repo, principal.name))

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
        return self.retention_policies.apply(self.store, dry_run=dry_run, grace=grace, actor=principal.name)

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
        if r.digest is not None and not self._may_read(principal, r.digest, r.repository):
            raise ManifestNotFoundError(f"manifest {r.digest} not found in {r.repository}")
        lease = self.leases.create("export", principal.name)
        try:
            digest = self.store.resolve_ref(r)
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


__all__ = ["Hub"]
