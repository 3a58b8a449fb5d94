"""Catalog <-> store consistency: report drift, and rebuild the catalog from the store.

Checks: every store manifest verifies against its digest and parses; every blob and child
manifest it references exists in the store with the descriptor's size; catalog rows match
store objects (both directions); catalog tags equal store tags. With `verify_blobs`, every blob
is re-hashed. `rebuild` replaces the content part of the catalog (repositories, tags, manifests,
edges, blobs) by a walk of the store; principals, grants, policies, pins, leases and tag
history are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import delete, select

from clawstore.errors import ClawstoreError, DigestMismatchError, NotFoundError, RefNotFoundError
from clawstore.hub import catalog as c
from clawstore.manifest import parse_manifest, references
from clawstore.store import ArtifactStore


@dataclass
class FsckReport:
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)
    manifests: int = 0
    blobs: int = 0
    tags: int = 0
    rebuilt: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, detail: str) -> None:
        self.problems.append((kind, detail))


def fsck(
    catalog: c.Catalog, store: ArtifactStore, *, rebuild: bool = False, verify_blobs: bool = False
) -> FsckReport:
    report = FsckReport()
    # Listed with sizes first (S3: the fanout's prefixes in parallel, no HEAD per blob): the
    # manifests' references are checked against it.
    listed = {str(d): size for d, size in store.iter_blob_sizes()}
    store_manifests: dict[str, object] = {}
    for d in store.iter_manifests():
        report.manifests += 1
        try:
            data = store.get_manifest(d)
            m = parse_manifest(data)
        except (DigestMismatchError, ClawstoreError) as e:
            report.add("bad-manifest", f"{d}: {e}")
            continue
        store_manifests[str(d)] = (m, len(data))
        refs = references(m)
        for b in refs.blobs:
            size = listed.get(str(b.digest))
            if size is None:  # written since the listing?
                size = store.backend.blob_size(b.digest)
            if size is None:
                report.add("dangling", f"manifest {d} references missing blob {b.digest}")
            elif size != b.size:
                report.add("size", f"blob {b.digest} is {size} bytes, manifest {d} says {b.size}")
        for ch in refs.manifests:
            if not store.has_manifest(ch.digest):
                report.add("dangling", f"index {d} references missing manifest {ch.digest}")
    store_blobs: dict[str, int] = {}
    for d, size in listed.items():
        report.blobs += 1
        store_blobs[d] = size
        if verify_blobs:
            try:
                with store.get_blob(d) as r:
                    while r.read(1 << 20):
                        pass
            except DigestMismatchError as e:
                report.add("bad-blob", f"{d}: {e}")
            except NotFoundError:
                del store_blobs[d]  # removed since listed (gc running)
    store_tags: dict[tuple[str, str], str] = {}
    for repo in store.list_repos():
        for tag in store.list_tags(repo):
            try:
                target = str(store.resolve(repo, tag))
            except RefNotFoundError:
                continue
            report.tags += 1
            store_tags[(repo, tag)] = target
            if target not in store_manifests:
                report.add("dangling", f"tag {repo}:{tag} points at missing manifest {target}")

    if rebuild:
        with catalog.tx(exclusive=True) as conn:
            for t in (
                c.tags,
                c.repo_manifests,
                c.manifest_edges,
                c.manifest_blobs,
                c.manifests,
                c.blobs,
                c.repositories,
                c.gc_trash,
            ):
                conn.execute(delete(t))
            now = c.now()
            for d, size in store_blobs.items():
                c.record_blob(conn, d, size, now)
            repos_of: dict[str, str] = {target: repo for (repo, _t), target in store_tags.items()}
            for d, (m, size) in store_manifests.items():
                c.record_manifest(conn, d, m, size, repo=repos_of.get(d), t=now)
            for (repo, tag), target in store_tags.items():
                if target in store_manifests:
                    c.set_tag(conn, repo, tag, target, actor="fsck-rebuild", t=now)
            # record_manifest adds rows for referenced blobs; drop those the store lacks again.
            for d in [b for (b,) in conn.execute(select(c.blobs.c.digest))]:
                if d not in store_blobs:
                    conn.execute(delete(c.blobs).where(c.blobs.c.digest == d))
        report.rebuilt = True
        return report

    with catalog.tx() as conn:
        cat_manifests = {r[0]: r[1] for r in conn.execute(select(c.manifests.c.digest, c.manifests.c.size))}
        cat_blobs = {r[0]: r[1] for r in conn.execute(select(c.blobs.c.digest, c.blobs.c.size))}
        cat_tags = {
            (r[0], r[1]): r[2]
            for r in conn.execute(select(c.tags.c.repository, c.tags.c.tag, c.tags.c.digest))
        }
        trash = {r[0] for r in conn.execute(select(c.gc_trash.c.digest))}
    for d in sorted(set(store_manifests) - set(cat_manifests) - trash):
        report.add("uncatalogued", f"manifest {d} is in the store, not in the catalog")
    for d in sorted(set(cat_manifests) - set(store_manifests)):
        report.add("missing", f"catalog manifest {d} is not in the store")
    for d in sorted(set(store_blobs) - set(cat_blobs) - trash):
        report.add("uncatalogued", f"blob {d} is in the store, not in the catalog")
    for d in sorted(set(cat_blobs) - set(store_blobs)):
        report.add("missing", f"catalog blob {d} is not in the store")
    for d in sorted(set(cat_blobs) & set(store_blobs)):
        if cat_blobs[d] != store_blobs[d]:
            report.add("size", f"blob {d}: catalog says {cat_blobs[d]} bytes, store has {store_blobs[d]}")
    for ref in sorted(set(store_tags) | set(cat_tags)):
        if store_tags.get(ref) != cat_tags.get(ref):
            report.add("tag", f"{ref[0]}:{ref[1]}: store {store_tags.get(ref)}, catalog {cat_tags.get(ref)}")
    return report


__all__ = ["FsckReport", "fsck"]
