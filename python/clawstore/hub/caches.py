"""Cache budgets and least-recently-used eviction, recorded in the hub catalog.

`clawstore.caches` stores entries (tags in `caches/<scope>`); this module keeps, per entry, when
it was created and last restored (`cache_entries`), and a byte budget per scope
(`cache_budgets`). `evict` untags the least recently used entries of a scope until the distinct
blobs of the entries left fit its budget (entries share base layers, so the budget counts each
blob once); their bytes are reclaimed by the next GC, which keeps every blob that another entry,
a tag, a pin or a lease still holds. Saves and restores through the hub record use here
(`record`, `touch`); entries saved without the hub are picked up by `sync` with their creation
time as last use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Column, Float, Index, String, Table, delete, select, update

from clawstore import caches
from clawstore.errors import ClawstoreError, NotFoundError, RefNotFoundError, TagConflictError
from clawstore.hub import catalog as c

if TYPE_CHECKING:
    from clawstore.hub.hub import Hub
    from clawstore.hub.permissions import Principal

cache_entries = Table(
    "cache_entries",
    c.metadata,
    Column("scope", c.NAME, primary_key=True),
    Column("key", String(512), primary_key=True),
    Column("digest", c.DIGEST, nullable=False),
    Column("size", BigInteger, nullable=False),  # stored bytes of its blobs, shared ones included
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=False),
    Index("ix_cache_entries_lru", "scope", "last_used_at"),
)

cache_budgets = Table(
    "cache_budgets",
    c.metadata,
    Column("scope", c.NAME, primary_key=True),
    Column("max_bytes", BigInteger, nullable=False),
)


@dataclass(frozen=True)
class EntryRecord:
    scope: str
    key: str
    digest: str
    size: int
    created_at: float
    last_used_at: float


@dataclass
class EvictionReport:
    scope: str
    dry_run: bool
    budget: int | None
    bytes_before: int = 0
    bytes_after: int = 0
    #: (key, digest) of each entry untagged (or that would be)
    evicted: list[tuple[str, str]] = field(default_factory=list)


class CacheCatalog:
    """Budgets, last use and eviction of cache entries, over a Hub's store and catalog."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.catalog = hub.catalog

    # -- records ---------------------------------------------------------------------------------
    def record(self, entry: caches.CacheEntry, *, used: bool = False) -> None:
        """Record an entry (after a save); `used` also sets its last use to now."""
        t = c.now()
        row = {
            "scope": entry.scope,
            "key": entry.key,
            "digest": str(entry.digest),
            "size": entry.stored_size,
            "created_at": entry.created_at,
            "last_used_at": t if used else entry.created_at,
        }
        with self.catalog.tx() as conn:
            c.upsert(conn, cache_entries, [row], ["scope", "key"], ["digest", "size"])

    def touch(self, entry: caches.CacheEntry) -> None:
        """A restore used `entry`: it becomes the most recently used of its scope."""
        self.record(entry)
        with self.catalog.tx() as conn:
            conn.execute(
                update(cache_entries)
                .where(cache_entries.c.scope == entry.scope, cache_entries.c.key == entry.key)
                .values(last_used_at=c.now())
            )

    def entries(self, scope: str) -> list[EntryRecord]:
        """Recorded entries of a scope, least recently used first."""
        caches.repository(scope)
        ce = cache_entries
        with self.catalog.tx() as conn:
            rows = conn.execute(
                select(ce).where(ce.c.scope == scope).order_by(ce.c.last_used_at, ce.c.created_at, ce.c.key)
            ).all()
        return [EntryRecord(r.scope, r.key, r.digest, r.size, r.created_at, r.last_used_at) for r in rows]

    def sync(self, scope: str) -> list[caches.CacheEntry]:
        """Make the records match the store: add entries saved without the hub (last use = their
        creation), drop records of entries no longer tagged. Returns the store's entries."""
        live = caches.entries(self.hub.store, scope=scope)
        keys = {e.key for e in live}
        with self.catalog.tx() as conn:
            rows = [
                {
                    "scope": scope,
                    "key": e.key,
                    "digest": str(e.digest),
                    "size": e.stored_size,
                    "created_at": e.created_at,
                    "last_used_at": e.created_at,
                }
                for e in live
            ]
            c.upsert(conn, cache_entries, rows, ["scope", "key"], ["digest", "size"])
            recorded = conn.execute(select(cache_entries.c.key).where(cache_entries.c.scope == scope)).all()
            for (k,) in recorded:
                if k not in keys:
                    conn.execute(
                        delete(cache_entries).where(cache_entries.c.scope == scope, cache_entries.c.key == k)
                    )
        return live

    def forget(self, scope: str, key: str) -> None:
        with self.catalog.tx() as conn:
            conn.execute(
                delete(cache_entries).where(cache_entries.c.scope == scope, cache_entries.c.key == key)
            )

    # -- save / restore through the hub ---------------------------------------------------------
    def save(
        self, principal: Principal, key: str, directory: str | os.PathLike[str], **kw: Any
    ) -> caches.SaveResult:
        """`caches.save` in a hub session (catalog records, a GC lease while it writes), then
        the record and, if the scope has a budget, eviction of what no longer fits."""
        scope = kw.get("scope", caches.DEFAULT_SCOPE)
        with self.hub.session(principal, caches.repository(scope), kind="cache") as s:
            result = caches.save(s, key, directory, **kw)
        self.record(result.entry)
        if result.created_now and self.budget(scope) is not None:
            self.evict(scope, keep=(key,), actor=f"cache-evict:{principal.name}")
        return result

    def restore(
        self, principal: Principal, key: str, directory: str | os.PathLike[str], **kw: Any
    ) -> caches.RestoreResult:
        """`caches.restore` (needs pull on the scope); a hit or partial hit updates the entry's
        last use."""
        scope = kw.get("scope", caches.DEFAULT_SCOPE)
        self.hub.permissions.check(principal, "pull", caches.repository(scope))
        result = caches.restore(self.hub.store, key, directory, **kw)
        if result.entry is not None:
            self.touch(result.entry)
        return result

    # -- budgets ---------------------------------------------------------------------------------
    def set_budget(self, scope: str, max_bytes: int | None) -> None:
        """Set (or with None, remove) the byte budget of a scope."""
        caches.repository(scope)
        with self.catalog.tx() as conn:
            if max_bytes is None:
                conn.execute(delete(cache_budgets).where(cache_budgets.c.scope == scope))
                return
            if max_bytes < 0:
                raise ClawstoreError("cache budget must be >= 0 bytes")
            c.upsert(
                conn, cache_budgets, [{"scope": scope, "max_bytes": max_bytes}], ["scope"], ["max_bytes"]
            )

    def budget(self, scope: str) -> int | None:
        with self.catalog.tx() as conn:
            v = conn.execute(select(cache_budgets.c.max_bytes).where(cache_budgets.c.scope == scope)).scalar()
        return int(v) if v is not None else None

    def budgets(self) -> dict[str, int]:
        with self.catalog.tx() as conn:
            return {r.scope: int(r.max_bytes) for r in conn.execute(select(cache_budgets))}

    # -- eviction --------------------------------------------------------------------------------
    def evict(
        self, scope: str, *, dry_run: bool = False, keep: tuple[str, ...] = (), actor: str = "cache-evict"
    ) -> EvictionReport:
        """Untag least-recently-used entries of `scope` until what is left fits its budget
        (entries in `keep` are never chosen). The blobs go at the next GC."""
        budget = self.budget(scope)
        live = {e.key: e for e in self.sync(scope)}
        report = EvictionReport(scope, dry_run, budget)
        report.bytes_before = caches.unique_bytes(live.values())
        report.bytes_after = report.bytes_before
        if budget is None:
            return report
        order = [r.key for r in self.entries(scope) if r.key in live and r.key not in keep]
        left = dict(live)
        for key in order:
            if caches.unique_bytes(left.values()) <= budget:
                break
            entry = left.pop(key)
            report.evicted.append((key, str(entry.digest)))
        report.bytes_after = caches.unique_bytes(left.values())
        if dry_run:
            return report
        repo = caches.repository(scope)
        done: list[tuple[str, str]] = []
        for key, digest in report.evicted:
            tag = caches.tag_of(key)
            # Store and catalog in one transaction holding the tag's lock, as hub sessions move
            # tags: a put re-tagging the key comes wholly before (our compare-and-swap fails and
            # the entry stays) or wholly after.
            with self.catalog.tx() as conn:
                c.lock_tag(conn, repo, tag)
                try:
                    self.hub.store.untag(repo, tag, expect=digest)
                except (TagConflictError, RefNotFoundError, NotFoundError):
                    continue
                c.set_tag(conn, repo, tag, None, actor=actor)
                conn.execute(
                    delete(cache_entries).where(cache_entries.c.scope == scope, cache_entries.c.key == key)
                )
            done.append((key, digest))
        report.evicted = done
        return report

    def evict_all(self, *, dry_run: bool = False) -> list[EvictionReport]:
        """`evict` every scope that has a budget."""
        return [self.evict(scope, dry_run=dry_run) for scope in sorted(self.budgets())]


__all__ = ["CacheCatalog", "EntryRecord", "EvictionReport", "cache_budgets", "cache_entries"]
