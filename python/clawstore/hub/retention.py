"""Retention policies per repository pattern.

A policy applies to every repository its glob pattern matches (see `permissions.pattern_matches`).
Tag rules (a tag survives if ANY rule of ANY matching policy keeps it; a policy without tag rules
keeps every tag):
- `keep_last=N`: the N most recently moved tags of the repository;
- `keep_within=SECONDS`: tags moved within that long;
- `keep_tags=REGEX`: tags whose name matches the regular expression (full match).
Untagged rule: `untagged_grace=SECONDS` deletes manifests pushed to the repository, tagged
nowhere and pushed longer ago than that, even inside GC's own grace period (the longest grace of
the matching policies applies). It can only shorten GC's grace, never extend it: everything
unreachable is collected by GC after GC's grace anyway.

`apply` plans every repository in one pass over the catalog, untags in the store (several at a
time) and in the catalog (hundreds per transaction), then runs GC once with the untagged
manifests forced, so a run reclaims the bytes it reports, through GC's batched sweep.
`dry_run` changes nothing and reports the same plan and the
bytes that run would reclaim (GC's mark in a rolled-back transaction with the plan applied);
`retention_bytes` is the part due to the plan alone (the same mark without the plan subtracted).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from clawstore.errors import ClawstoreError, RefNotFoundError, TagConflictError
from clawstore.hub import catalog as c
from clawstore.hub.gc import GarbageCollector
from clawstore.hub.permissions import pattern_matches, pattern_regex

if TYPE_CHECKING:
    from clawstore.store import ArtifactStore

#: Catalog tag removals per transaction.
UNTAG_BATCH = 500


@dataclass(frozen=True)
class Policy:
    pattern: str
    keep_last: int | None = None
    keep_within: float | None = None
    keep_tags: str | None = None
    untagged_grace: float | None = None

    def __post_init__(self) -> None:
        pattern_regex(self.pattern)
        if self.keep_last is not None and self.keep_last < 0:
            raise ClawstoreError("keep_last must be >= 0")
        if self.keep_within is not None and self.keep_within < 0:
            raise ClawstoreError("keep_within must be >= 0")
        if self.untagged_grace is not None and self.untagged_grace < 0:
            raise ClawstoreError("untagged_grace must be >= 0")
        if self.keep_tags is not None:
            try:
                re.compile(self.keep_tags)
            except re.error as e:
                raise ClawstoreError(f"keep_tags is not a regular expression: {e}") from None

    @property
    def has_tag_rules(self) -> bool:
        return self.keep_last is not None or self.keep_within is not None or self.keep_tags is not None


@dataclass
class RetentionReport:
    dry_run: bool
    tags: list[tuple[str, str, str]] = field(default_factory=list)  # (repo, tag, digest) untagged
    manifests: list[str] = field(default_factory=list)  # untagged manifests deleted (forced)
    bytes: int = 0  # bytes the GC of this run reclaims (or would)
    retention_bytes: int = 0  # of which due to this plan (dry run only)
    gc_manifests: int = 0
    gc_blobs: int = 0


class Retention:
    def __init__(self, catalog: c.Catalog) -> None:
        self.catalog = catalog

    def set(self, p: Policy) -> None:
        with self.catalog.tx() as conn:
            c.upsert(
                conn,
                c.retention_policies,
                [
                    {
                        "pattern": p.pattern,
                        "keep_last": p.keep_last,
                        "keep_within": p.keep_within,
                        "keep_tags": p.keep_tags,
                        "untagged_grace": p.untagged_grace,
                        "created_at": c.now(),
                    }
                ],
                ["pattern"],
                ["keep_last", "keep_within", "keep_tags", "untagged_grace"],
            )

    def remove(self, pattern: str) -> bool:
        with self.catalog.tx() as conn:
            r = conn.execute(delete(c.retention_policies).where(c.retention_policies.c.pattern == pattern))
            return bool(r.rowcount)

    def list(self) -> list[Policy]:
        rp = c.retention_policies
        with self.catalog.tx() as conn:
            rows = conn.execute(select(rp).order_by(rp.c.pattern)).all()
        return [Policy(r.pattern, r.keep_last, r.keep_within, r.keep_tags, r.untagged_grace) for r in rows]

    def plan(self, now: float | None = None) -> tuple[list[tuple[str, str, str]], list[str]]:
        """(tags to remove, untagged manifests to delete), from the catalog."""
        t = now if now is not None else c.now()
        policies = self.list()
        if not policies:
            return [], []
        with self.catalog.tx() as conn:
            repos = [r[0] for r in conn.execute(select(c.repositories.c.name))]
            all_tags = conn.execute(
                select(c.tags.c.repository, c.tags.c.tag, c.tags.c.digest, c.tags.c.updated_at)
            ).all()
            members = conn.execute(select(c.repo_manifests)).all()
        by_repo: dict[str, list[tuple[str, str, float]]] = {}
        for r in all_tags:
            by_repo.setdefault(r.repository, []).append((r.tag, r.digest, r.updated_at))
        remove: list[tuple[str, str, str]] = []
        grace_of: dict[str, float] = {}
        for repo in sorted(repos):
            matching = [p for p in policies if pattern_matches(p.pattern, repo)]
            if not matching:
                continue
            graces = [p.untagged_grace for p in matching if p.untagged_grace is not None]
            if graces:
                grace_of[repo] = max(graces)
            rules = [p for p in matching if p.has_tag_rules]
            if not rules:
                continue
            ordered = sorted(by_repo.get(repo, []), key=lambda x: (-x[2], x[0]))
            for i, (tag, digest, updated) in enumerate(ordered):
                keep = False
                for p in rules:
                    if p.keep_last is not None and i < p.keep_last:
                        keep = True
                    if p.keep_within is not None and updated >= t - p.keep_within:
                        keep = True
                    if p.keep_tags is not None and re.fullmatch(p.keep_tags, tag):
                        keep = True
                if not keep:
                    remove.append((repo, tag, digest))
        removed = {(r, tg) for r, tg, _ in remove}
        still_tagged = {r.digest for r in all_tags if (r.repository, r.tag) not in removed}
        untagged: set[str] = set()
        for m in members:
            g = grace_of.get(m.repository)
            if g is not None and m.digest not in still_tagged and m.pushed_at < t - g:
                untagged.add(m.digest)
        return remove, sorted(untagged)

    def apply(self, store: ArtifactStore, *, dry_run: bool, grace: float, actor: str) -> RetentionReport:
        """Untag what the policies drop, then collect (or, dry run, report what would go)."""
        report = RetentionReport(dry_run=dry_run)
        gc = GarbageCollector(self.catalog, store)
        if dry_run:
            tags, untagged = self.plan()
            report.tags, report.manifests = tags, untagged
            with self.catalog.engine.connect() as conn:
                tx = conn.begin()
                try:
                    before, _, _ = gc.mark(conn, grace=grace, dry_run=True)
                    for repo, tag, _d in tags:
                        conn.execute(delete(c.tags).where(c.tags.c.repository == repo, c.tags.c.tag == tag))
                    after, _, _ = gc.mark(conn, grace=grace, dry_run=True, force=untagged)
                finally:
                    tx.rollback()
            report.bytes = sum(v[1] for v in after.values())
            report.retention_bytes = report.bytes - sum(v[1] for v in before.values())
            report.gc_manifests = after.get("manifest", (0, 0))[0]
            report.gc_blobs = after.get("blob", (0, 0))[0]
            return report
        gc.reconcile_tags()
        tags, untagged = self.plan()
        report.tags = self._untag(store, tags, actor)
        r = gc.run(grace=grace, force=untagged, scan_store=False, reconcile=False)
        forced = set(untagged)
        report.manifests = [d for k, d, _s in r.garbage if k == "manifest" and d in forced]
        report.bytes = r.bytes
        report.gc_manifests, report.gc_blobs = r.manifests, r.blobs
        return report

    def _untag(
        self, store: ArtifactStore, tags: list[tuple[str, str, str]], actor: str
    ) -> list[tuple[str, str, str]]:
        """Remove `tags` from the store (compare-and-swap against the planned digest: a tag moved
        meanwhile stays) and from the catalog, UNTAG_BATCH per catalog transaction, which holds
        the batch's tag locks (`catalog.lock_tag`, taken in sorted order) across both writes as
        hub sessions do: a replica's tag() of the same tag comes wholly before or wholly after,
        never between our store write and our catalog write. The store removals of a batch run
        `store.read_concurrency` at a time (at most 8). Returns the tags removed."""
        workers = max(1, min(8, store.read_concurrency, len(tags)))

        def untag(t: tuple[str, str, str]) -> bool:
            repo, tag, digest = t
            try:
                store.untag(repo, tag, expect=digest)  # moved meanwhile: leave it
            except (TagConflictError, RefNotFoundError):
                return False
            return True

        removed: list[tuple[str, str, str]] = []
        with ThreadPoolExecutor(workers, thread_name_prefix="retention") as pool:
            for i in range(0, len(tags), UNTAG_BATCH):
                chunk = sorted(tags[i : i + UNTAG_BATCH])
                with self.catalog.tx() as conn:
                    for repo, tag, _d in chunk:
                        c.lock_tag(conn, repo, tag)
                    done = [t for t, ok in zip(chunk, pool.map(untag, chunk), strict=True) if ok]
                    for repo, tag, _d in done:
                        c.set_tag(conn, repo, tag, None, actor=f"retention:{actor}")
                removed.extend(done)
        return removed


__all__ = ["Policy", "Retention", "RetentionReport"]
