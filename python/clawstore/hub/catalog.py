"""The hub catalog: SQLAlchemy Core tables, the engine, and the transactions everything else uses.

The catalog records references, never bytes: repositories, tags (and every move of a tag),
manifests with their media type / artifactType / size / subject, manifest->blob and
manifest->manifest edges, blob sizes, pins, leases, principals, grants and retention policies.

Engines: a SQLite file (default `<store root>/catalog.sqlite`) or PostgreSQL by URL
(`postgresql+psycopg://postgres@127.0.0.1:5432/test`). A `schema=NAME` query parameter on a
PostgreSQL URL (or the `schema` argument) puts every table in that schema (created if absent);
tests use it to isolate runs.

Transactions (`Catalog.tx`) are serialisable in the way GC needs:
- SQLite: every transaction is `BEGIN IMMEDIATE` (one writer at a time, WAL, busy timeout).
- PostgreSQL: every write transaction first takes the one `catalog_lock` row FOR SHARE; GC's
  mark transaction takes it FOR UPDATE. Pushes run side by side, GC's mark waits for in-flight
  push transactions and new ones wait for it: the mark sees a consistent set of roots.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from clawstore import mediatypes as mt
from clawstore.errors import ClawstoreError
from clawstore.hub.migrations import upgrade

DIGEST = String(200)
NAME = String(255)

metadata = MetaData()

repositories = Table(
    "repositories",
    metadata,
    Column("name", NAME, primary_key=True),
    Column("created_at", Float, nullable=False),
)

manifests = Table(
    "manifests",
    metadata,
    Column("digest", DIGEST, primary_key=True),
    Column("media_type", NAME, nullable=False),
    Column("artifact_type", NAME),
    Column("size", BigInteger, nullable=False),
    Column("subject", DIGEST),
    Column("config", DIGEST),
    Column("created_at", Float, nullable=False),  # first recorded
    Column("seen_at", Float, nullable=False),  # last pushed / recorded: the grace clock
    Column("adopted", Boolean, nullable=False, default=False),  # found in the store by GC/fsck
    Index("ix_manifests_subject", "subject"),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

repo_manifests = Table(
    "repo_manifests",
    metadata,
    Column("repository", NAME, primary_key=True),
    Column("digest", DIGEST, primary_key=True),
    Column("pushed_at", Float, nullable=False),
    Index("ix_repo_manifests_digest", "digest"),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

#: Blobs that belong to a repository without a manifest naming them yet: a finished registry
#: upload or a cross-repository mount (distribution's layer links). Not a GC root.
repo_blobs = Table(
    "repo_blobs",
    metadata,
    Column("repository", NAME, primary_key=True),
    Column("digest", DIGEST, primary_key=True),
    Column("pushed_at", Float, nullable=False),
    Index("ix_repo_blobs_digest", "digest"),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

#: Hub-wide settings shared by every process on the catalog (the registry's token signing key).
settings = Table(
    "settings",
    metadata,
    Column("name", NAME, primary_key=True),
    Column("value", Text, nullable=False),
)

tags = Table(
    "tags",
    metadata,
    Column("repository", NAME, primary_key=True),
    Column("tag", String(128), primary_key=True),
    Column("digest", DIGEST, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_tags_digest", "digest"),
)

tag_history = Table(
    "tag_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("repository", NAME, nullable=False),
    Column("tag", String(128), nullable=False),
    Column("old_digest", DIGEST),
    Column("new_digest", DIGEST),
    Column("at", Float, nullable=False),
    Column("actor", NAME),
    Index("ix_tag_history_ref", "repository", "tag"),
)

blobs = Table(
    "blobs",
    metadata,
    Column("digest", DIGEST, primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
    Column("adopted", Boolean, nullable=False, default=False),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

manifest_blobs = Table(
    "manifest_blobs",
    metadata,
    Column("manifest", DIGEST, primary_key=True),
    Column("blob", DIGEST, primary_key=True),
    Index("ix_manifest_blobs_blob", "blob"),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

#: Liveness flows parent -> child. kind 'child': an index lists `child`; kind 'referrer': `child`
#: has `parent` as its subject (so a live subject keeps its referrers).
manifest_edges = Table(
    "manifest_edges",
    metadata,
    Column("parent", DIGEST, primary_key=True),
    Column("child", DIGEST, primary_key=True),
    Column("kind", String(16), primary_key=True),
    Index("ix_manifest_edges_child", "child"),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

pins = Table(
    "pins",
    metadata,
    Column("digest", DIGEST, primary_key=True),
    Column("reason", String(1000)),
    Column("actor", NAME),
    Column("created_at", Float, nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("holder", NAME),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_leases_expires", "expires_at"),
)

lease_resources = Table(
    "lease_resources",
    metadata,
    Column("lease_id", String(64), primary_key=True),
    Column("digest", DIGEST, primary_key=True),
    Index("ix_lease_resources_digest", "digest"),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

volumes = Table(
    "volumes",
    metadata,
    Column("name", NAME, primary_key=True),
    Column("created_at", Float, nullable=False),
)

volume_leases = Table(
    "volume_leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("volume", NAME, nullable=False),
    Column("holder", NAME, nullable=False),
    Column("mode", String(2), nullable=False),  # 'ro' | 'rw'
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_volume_leases_volume", "volume"),
)

principals = Table(
    "principals",
    metadata,
    Column("name", NAME, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("principal", NAME, nullable=False),
    Column("secret_hash", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    Index("ix_tokens_principal", "principal"),
)

grants = Table(
    "grants",
    metadata,
    Column("principal", NAME, primary_key=True),
    Column("action", String(16), primary_key=True),
    Column("pattern", NAME, primary_key=True),
)

retention_policies = Table(
    "retention_policies",
    metadata,
    Column("pattern", NAME, primary_key=True),
    Column("keep_last", Integer),
    Column("keep_within", Float),  # seconds
    Column("keep_tags", String(1000)),  # regular expression
    Column("untagged_grace", Float),  # seconds
    Column("created_at", Float, nullable=False),
)

#: Garbage chosen by GC's mark transaction, waiting for its store objects to be deleted. A push
#: that needs one of these digests deletes its row ("rescue") before relying on the object.
gc_trash = Table(
    "gc_trash",
    metadata,
    Column("digest", DIGEST, primary_key=True),
    Column("kind", String(16), nullable=False),  # 'blob' | 'manifest'
    Column("size", BigInteger, nullable=False),
    Column("queued_at", Float, nullable=False),
    sqlite_with_rowid=False,  # clustered by the key (migration sqlite_clustered_1)
)

catalog_lock = Table(
    "catalog_lock",
    metadata,
    Column("id", Integer, primary_key=True),
)


def now() -> float:
    return time.time()


def _shown_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show it without anything after '@'
        return url.rsplit("@", 1)[-1] if "@" in url else url


def default_catalog_url(store_root: str | Path) -> str:
    return f"sqlite:///{Path(store_root).absolute() / 'catalog.sqlite'}"


class Catalog:
    """An engine plus schema migration and the transaction discipline described above."""

    def __init__(self, url: str, *, schema: str | None = None, migrate: bool = True) -> None:
        try:
            self._open(url, schema)
        except ClawstoreError:
            raise
        except (ImportError, ValueError, SQLAlchemyError) as e:
            # A mistyped URL, an unknown dialect, a driver that is not installed, a server that
            # does not answer: one line, never a traceback (and never the password).
            shown = _shown_url(url)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClawstoreError(f"cannot open catalog {shown}: {first}") from None
        if migrate:
            self.migrate()

    def exists(self) -> bool:
        """Whether this catalog was ever created (SQLite: the file; PostgreSQL: the schema's
        migration table). Opening with `migrate=False` and asking this creates nothing."""
        if self.dialect == "sqlite":
            db = self.engine.url.database
            return not db or db == ":memory:" or Path(db).exists()
        from sqlalchemy import inspect

        with self.engine.connect() as c:
            return inspect(c).has_table("alembic_version", schema=self.schema)

    def migrate(self) -> None:
        db = self.engine.url.database
        if self.dialect == "sqlite" and db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        try:
            upgrade(self.engine)
        except SQLAlchemyError as e:
            first = str(e).strip().splitlines()[0]
            raise ClawstoreError(f"cannot open catalog {self.url}: {first}") from None

    def _open(self, url: str, schema: str | None) -> None:
        u = make_url(url)
        schema = schema or u.query.get("schema")  # type: ignore[assignment]
        if "schema" in u.query:
            u = u.difference_update_query(["schema"])
        if isinstance(schema, tuple):
            schema = schema[-1]
        self.url = u.render_as_string(hide_password=True)
        self.schema = schema
        self.dialect = u.get_backend_name()
        if self.dialect == "sqlite":
            # Pool as many connections as a server runs request threads (anyio's default 40):
            # an overflow connection is opened and closed for every request beyond the pool.
            # (A memory database has one connection per thread, SQLAlchemy's own pool.)
            memory = not u.database or u.database == ":memory:"
            pool: dict[str, Any] = {} if memory else {"pool_size": 16, "max_overflow": 48}
            self.engine: Engine = create_engine(
                u, connect_args={"timeout": 120, "check_same_thread": False}, **pool
            )
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        elif self.dialect == "postgresql":
            self.engine = create_engine(u, pool_size=4, max_overflow=8, pool_pre_ping=True)
            if schema:
                if not schema.replace("_", "").isalnum():
                    raise ClawstoreError(f"invalid catalog schema name {schema!r}")

                def _search_path(dbapi_conn: Any, _rec: Any) -> None:
                    cur = dbapi_conn.cursor()
                    cur.execute(f'SET search_path TO "{schema}"')
                    cur.close()
                    dbapi_conn.commit()

                # Listen before the first connection, so every pooled connection has the path.
                event.listen(self.engine, "connect", _search_path)
                with self.engine.begin() as c:
                    # IF NOT EXISTS still races between sessions: serialise on an advisory lock.
                    c.exec_driver_sql("SELECT pg_advisory_xact_lock(1668047223)")
                    c.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        else:
            raise ClawstoreError(f"unsupported catalog database {self.dialect!r} (sqlite or postgresql)")

    @contextmanager
    def tx(self, *, exclusive: bool = False) -> Iterator[Connection]:
        """A transaction. On PostgreSQL, `exclusive` excludes every other catalog transaction
        that went through here (GC mark); otherwise transactions share the catalog lock."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                mode = "UPDATE" if exclusive else "SHARE"
                conn.execute(text(f"SELECT id FROM catalog_lock WHERE id = 1 FOR {mode}"))
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction: permission checks and lookups on hot read paths (every
        registry GET). SQLite: a deferred BEGIN, a WAL snapshot that never waits for a writer
        nor makes one wait (tx() is BEGIN IMMEDIATE: every registry GET of every worker queued
        on the one write lock, sleeping in SQLite's busy handler). PostgreSQL: a plain
        transaction without the catalog lock (an MVCC snapshot needs none; a GC mark, which
        holds that lock exclusively, does not stop readers). Writing in it is a bug: SQLite
        would have to upgrade the snapshot, which fails when another writer got there first."""
        with self.engine.connect() as conn:
            conn.execution_options(clawstore_read_only=True)
            with conn.begin():
                yield conn

    def close(self) -> None:
        self.engine.dispose()

    def drop_schema(self) -> None:
        """Drop this catalog's PostgreSQL schema (tests) or every table (SQLite)."""
        if self.dialect == "postgresql" and self.schema:
            with self.engine.begin() as c:
                c.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        else:
            with self.engine.begin() as c:
                metadata.drop_all(c)
                c.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        self.engine.dispose()


def _sqlite_connect(dbapi_conn: Any, _rec: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
    cur = dbapi_conn.cursor()
    # The busy timeout first, so every later statement on this connection waits for locks.
    cur.execute("PRAGMA busy_timeout=120000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA cache_size=-32768")  # 32 MiB page cache: GC touches millions of rows
    cur.execute("PRAGMA temp_store=MEMORY")
    _set_wal(cur)
    cur.close()


def _set_wal(cur: Any) -> None:
    """Switch the database to WAL (persistent in the file), one connection at a time.

    Switching a rollback-journal database (every new catalog) to WAL reads the header under a
    SHARED lock and then needs EXCLUSIVE. When several connections do that at once, one holds
    PENDING while the others hold SHARED: SQLite sees a deadlock and fails the others with
    SQLITE_BUSY ("database is locked") at once, WITHOUT calling the busy handler, so no busy
    timeout helps. Hub replicas starting together or CLI commands racing on a fresh store hit
    it. The switch therefore runs under an flock(2) on a lock file beside the database (never
    the database file itself: closing any descriptor of it would drop SQLite's POSIX locks), so
    it never races; once the file is in WAL mode the switch is a no-op that needs no write lock.
    """
    db = next((r[2] for r in cur.execute("PRAGMA database_list") if r[1] == "main"), "")
    if not db:  # :memory: or a temporary database: nothing shared, WAL does not apply
        return
    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        # Already switched (every connection after the catalog's first): asking takes no
        # lock file, so new connections of a busy server do not queue on the flock.
        return
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        os.close(fd)  # releases the flock
    if str(mode).lower() != "wal":
        raise ClawstoreError(
            f"catalog {db}: SQLite refused WAL mode (journal mode {mode}); use a local filesystem"
        )


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the write lock up front (no deadlock upgrading a read to a write); readers
    # (Catalog.read) take a snapshot.
    read_only = conn.get_execution_options().get("clawstore_read_only", False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def upsert(
    conn: Connection,
    table: Table,
    rows: list[dict[str, Any]],
    keys: list[str],
    update: list[str] | None = None,
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET update / DO NOTHING, on either dialect."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(table)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table)
    if update:
        stmt = stmt.on_conflict_do_update(
            index_elements=keys, set_={c: getattr(stmt.excluded, c) for c in update}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    # A fixed row order makes concurrent upserts take row locks in the same order (no deadlocks).
    rows = sorted(rows, key=lambda r: tuple(str(r[k]) for k in keys))
    for i in range(0, len(rows), 5000):
        conn.execute(stmt, rows[i : i + 5000])


# -- queries shared by the hub, GC, fsck ---------------------------------------------------------
def ensure_repository(conn: Connection, repo: str, t: float | None = None) -> None:
    upsert(conn, repositories, [{"name": repo, "created_at": t or now()}], ["name"])


def record_blob(
    conn: Connection, digest: str, size: int, t: float | None = None, *, adopted: bool = False
) -> None:
    t = t or now()
    upsert(
        conn,
        blobs,
        [{"digest": str(digest), "size": size, "created_at": t, "seen_at": t, "adopted": adopted}],
        ["digest"],
        None if adopted else ["seen_at", "adopted"],
    )


#: artifactTypes whose `subject` is something they need (kept alive with them), not merely
#: something they refer to.
NEEDS_SUBJECT: frozenset[str] = frozenset({mt.CHECKPOINT})


def record_manifest(
    conn: Connection,
    digest: str,
    manifest: Any,
    size: int,
    *,
    repo: str | None = None,
    t: float | None = None,
    adopted: bool = False,
    extra_blobs: dict[str, int] | None = None,
) -> None:
    """Upsert a manifest with its edges, the blob rows it references (plus `extra_blobs`, in the
    same statement: one sorted upsert per transaction keeps row-lock order global), and repo
    membership."""
    from clawstore.manifest import ImageManifest

    t = t or now()
    digest = str(digest)
    config = str(manifest.config.digest) if isinstance(manifest, ImageManifest) else None
    subject = str(manifest.subject.digest) if manifest.subject is not None else None
    row = {
        "digest": digest,
        "media_type": manifest.media_type,
        "artifact_type": manifest.artifact_type,
        "size": size,
        "subject": subject,
        "config": config,
        "created_at": t,
        "seen_at": t,
        "adopted": adopted,
    }
    upsert(conn, manifests, [row], ["digest"], None if adopted else ["seen_at", "adopted"])
    blob_rows: dict[str, dict[str, Any]] = {
        d: {"digest": d, "size": sz, "created_at": t, "seen_at": t, "adopted": adopted}
        for d, sz in (extra_blobs or {}).items()
    }
    for d in manifest.blobs():
        blob_rows[str(d.digest)] = {
            "digest": str(d.digest),
            "size": d.size,
            "created_at": t,
            "seen_at": t,
            "adopted": adopted,
        }
    upsert(conn, blobs, list(blob_rows.values()), ["digest"], None if adopted else ["seen_at", "adopted"])
    upsert(conn, manifest_blobs, [{"manifest": digest, "blob": b} for b in blob_rows], ["manifest", "blob"])
    edges = [
        {"parent": digest, "child": str(d.digest), "kind": "child"}
        for d in getattr(manifest, "manifests", ())
    ]
    if subject is not None:
        edges.append({"parent": subject, "child": digest, "kind": "referrer"})
        if manifest.artifact_type in NEEDS_SUBJECT:
            # A checkpoint's subject is the volume it needs: liveness flows to it as well
            # (what a checkpoint needs, GC keeps), unlike a signature's subject.
            edges.append({"parent": digest, "child": subject, "kind": "needs"})
    upsert(conn, manifest_edges, edges, ["parent", "child", "kind"])
    if repo is not None:
        ensure_repository(conn, repo, t)
        upsert(
            conn,
            repo_manifests,
            [{"repository": repo, "digest": digest, "pushed_at": t}],
            ["repository", "digest"],
            None if adopted else ["pushed_at"],
        )


def linked_repositories(conn: Connection, digest: str) -> set[str]:
    """The repositories `digest` belongs to, as distribution's repository links would say: a
    manifest pushed to or tagged in a repository belongs to it; so does every blob it references
    and every manifest an index in it lists (transitively); and a blob uploaded or mounted into
    it (`repo_blobs`)."""
    rows = conn.execute(
        text(
            """
            WITH RECURSIVE up(d) AS (
                SELECT CAST(:d AS VARCHAR(200))
                UNION
                SELECT x.parent FROM (
                    SELECT e.parent AS parent, e.child AS child FROM manifest_edges e
                    WHERE e.kind = 'child'
                    UNION ALL
                    SELECT mb.manifest AS parent, mb.blob AS child FROM manifest_blobs mb
                ) x JOIN up ON x.child = up.d
            )
            SELECT rm.repository FROM repo_manifests rm JOIN up ON rm.digest = up.d
            UNION
            SELECT t.repository FROM tags t JOIN up ON t.digest = up.d
            UNION
            SELECT rb.repository FROM repo_blobs rb WHERE rb.digest = CAST(:d AS VARCHAR(200))
            """
        ),
        {"d": str(digest)},
    )
    return {r[0] for r in rows}


#: Namespace (first key) of the tag advisory locks (`lock_tag`); the two-key form never
#: collides with the one-key catalog-creation lock.
TAG_LOCK_SPACE = 1952539751


def lock_tag(conn: Connection, repo: str, tag: str) -> None:
    """Hold `repo:tag` until the transaction ends (PostgreSQL: a transaction advisory lock on a
    hash of the name; a collision only serialises two unrelated tags). SQLite needs none: its
    write transactions are serial (BEGIN IMMEDIATE)."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            text(f"SELECT pg_advisory_xact_lock({TAG_LOCK_SPACE}, hashtext(:name))"),
            {"name": f"{repo}:{tag}"},
        )


def set_tag(
    conn: Connection, repo: str, tag: str, digest: str | None, *, actor: str | None, t: float | None = None
) -> str | None:
    """Point (or with digest None, remove) a tag in the catalog and append to its history.
    Returns the previous catalog value."""
    from sqlalchemy import delete, select

    t = t or now()
    old = conn.execute(select(tags.c.digest).where(tags.c.repository == repo, tags.c.tag == tag)).scalar()
    if old == (str(digest) if digest is not None else None):
        return old
    if digest is None:
        conn.execute(delete(tags).where(tags.c.repository == repo, tags.c.tag == tag))
    else:
        ensure_repository(conn, repo, t)
        upsert(
            conn,
            tags,
            [{"repository": repo, "tag": tag, "digest": str(digest), "updated_at": t}],
            ["repository", "tag"],
            ["digest", "updated_at"],
        )
    conn.execute(
        tag_history.insert().values(
            repository=repo,
            tag=tag,
            old_digest=old,
            new_digest=str(digest) if digest is not None else None,
            at=t,
            actor=actor,
        )
    )
    return old


__all__ = [
    "Catalog",
    "blobs",
    "catalog_lock",
    "default_catalog_url",
    "ensure_repository",
    "gc_trash",
    "grants",
    "lease_resources",
    "leases",
    "manifest_blobs",
    "manifest_edges",
    "manifests",
    "metadata",
    "now",
    "pins",
    "principals",
    "record_blob",
    "record_manifest",
    "repo_blobs",
    "repo_manifests",
    "repositories",
    "retention_policies",
    "set_tag",
    "settings",
    "tag_history",
    "tags",
    "tokens",
    "upsert",
    "volume_leases",
    "volumes",
]
