"""Caches: dependency and build caches keyed by the caller, with GitHub actions/cache semantics.

    caches.save(store, "npm-linux-" + lock_hash, "node_modules", scope="org/app")
    r = caches.restore(store, "npm-linux-" + lock_hash, "node_modules",
                       restore_keys=["npm-linux-"], scope="org/app")
    r.kind  # "hit" (exact key), "partial" (a prefix matched), or "miss"

An entry is an OCI image manifest (artifactType and config mediaType
`application/vnd.elasticclaw.cache.v1+json`) tagged in repository `caches/<scope>`; the tag is a
hash of the key (keys are up to 512 characters of almost anything), the key itself is in the
manifest's annotations and config. Entries are immutable: saving an existing key is a no-op, and
of two concurrent saves of one key the first to tag wins.

Lookup (`lookup`, `restore`), as actions/cache documents it: the exact key, else the newest entry
whose key starts with the key, else each restore key in order as a prefix, newest entry first.

Layers are the volume layer format (tar+zstd, packed by the Rust core) with a content-digest
file index: a new entry is packed as a delta (changed files plus whiteouts) over the entry in
its scope whose key shares the longest prefix with it (newest first), so entries that share most
files store them once, in the base's layer. Past `max_chain` layers, or when the deltas outweigh
the base, the entry is packed whole. Restore into a missing or empty directory unpacks in Rust
into a temporary directory renamed into place; into a non-empty directory it compares the tree
with the entry's index (content digests) and writes only the paths that differ and removes the
paths the entry does not have.

Budgets, last use and eviction belong to the hub (`clawstore.hub.caches`): this module only
reads and writes the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import zstandard

from clawstore import _core
from clawstore import mediatypes as mt
from clawstore.digest import Digest
from clawstore.errors import (
    DigestMismatchError,
    InvalidManifestError,
    InvalidNameError,
    NotFoundError,
    RefNotFoundError,
    TagConflictError,
    UnsafeArchiveError,
)
from clawstore.manifest import Descriptor, ImageManifest, canonical_json, parse_manifest
from clawstore.names import validate_repository
from clawstore.store import ArtifactStore
from clawstore.types import MISSING

CONFIG_VERSION: Final = 1
DEFAULT_SCOPE: Final = "default"
REPO_PREFIX: Final = "caches"
MAX_KEY_LENGTH: Final = 512
DEFAULT_MAX_CHAIN: Final = 8
DEFAULT_SQUASH_RATIO: Final = 1.0

A_KEY: Final = "io.elasticclaw.cache.key"
A_CREATED_AT: Final = "io.elasticclaw.cache.created_at"
A_CREATED: Final = "org.opencontainers.image.created"
A_UNCOMPRESSED: Final = "io.elasticclaw.layer.uncompressed_size"
A_DIFF_ID: Final = "io.elasticclaw.layer.diff_id"


def validate_key(key: str) -> str:
    """A cache key: 1..512 characters, no commas (actions/cache splits key lists on them), no
    control characters. InvalidNameError otherwise."""
    if not isinstance(key, str) or not key:
        raise InvalidNameError("cache key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidNameError(f"cache key is {len(key)} characters, over the {MAX_KEY_LENGTH} limit")
    if "," in key:
        raise InvalidNameError(f"cache key {key[:60]!r} contains a comma")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise InvalidNameError(f"cache key {key[:60]!r} contains a control character")
    return key


def validate_prefix(prefix: str) -> str:
    if prefix == "":
        raise InvalidNameError("restore key must be non-empty")
    return validate_key(prefix)


def repository(scope: str) -> str:
    """The repository holding a scope's entries (`caches/<scope>`); InvalidNameError if the scope
    is not a valid repository path."""
    if not isinstance(scope, str) or not scope:
        raise InvalidNameError("cache scope must be a non-empty string")
    try:
        return validate_repository(f"{REPO_PREFIX}/{scope}")
    except InvalidNameError:
        raise InvalidNameError(
            f"invalid cache scope {scope!r}: lowercase alphanumeric components separated by '/'"
        ) from None


def tag_of(key: str) -> str:
    return "k" + hashlib.sha256(validate_key(key).encode()).hexdigest()[:48]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    digest: Digest
    scope: str
    key: str
    created_at: float
    manifest: ImageManifest
    config: Mapping[str, Any]

    @property
    def tag(self) -> str:
        return tag_of(self.key)

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.manifest.layers if d.media_type == mt.CACHE_LAYER)

    @property
    def index(self) -> Descriptor:
        idx = self.config.get("index")
        if not isinstance(idx, dict):
            raise InvalidManifestError(f"cache entry {self.digest}: config has no index descriptor")
        return Descriptor.from_dict(idx, "config.index")

    @property
    def files(self) -> int:
        return int(self.config.get("files", 0))

    @property
    def bytes(self) -> int:
        return int(self.config.get("bytes", 0))

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Every blob the entry holds (config, layers, index)."""
        return (self.manifest.config, *self.manifest.layers)

    @property
    def stored_size(self) -> int:
        """Compressed bytes of the blobs it references (shared ones counted here too)."""
        return sum(d.size for d in self.blobs)


def _load(store: ArtifactStore, digest: Digest, scope: str) -> CacheEntry:
    m = parse_manifest(store.get_manifest(digest))
    if not isinstance(m, ImageManifest) or m.artifact_type != mt.CACHE or m.config.media_type != mt.CACHE:
        raise InvalidManifestError(f"{digest} is not a cache entry")
    try:
        config = json.loads(store.read_blob(m.config.digest))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifestError(f"cache entry {digest}: config is not JSON: {e}") from None
    if not isinstance(config, dict) or config.get("version") != CONFIG_VERSION:
        raise InvalidManifestError(f"cache entry {digest}: unsupported config")
    key = config.get("key")
    notes = m.annotations or {}
    if not isinstance(key, str) or notes.get(A_KEY) != key:
        raise InvalidManifestError(f"cache entry {digest}: key missing or inconsistent")
    try:
        validate_key(key)
        created = float(notes.get(A_CREATED_AT, ""))
    except (InvalidNameError, ValueError):
        raise InvalidManifestError(f"cache entry {digest}: bad key or creation time") from None
    for d in m.layers:
        if d.media_type not in (mt.CACHE_LAYER, mt.CACHE_INDEX_ZSTD):
            raise InvalidManifestError(f"cache entry {digest}: unexpected layer type {d.media_type!r}")
    return CacheEntry(digest, scope, key, created, m, config)


def get(store: ArtifactStore, key: str, *, scope: str = DEFAULT_SCOPE) -> CacheEntry | None:
    """The entry saved under exactly `key`, or None."""
    repo = repository(scope)
    try:
        digest = store.resolve(repo, tag_of(key))
    except RefNotFoundError:
        return None
    entry = _load(store, digest, scope)
    if entry.key != key:
        raise InvalidManifestError(f"{repo}:{tag_of(key)} holds key {entry.key!r}, not {key!r}")
    return entry


def entries(store: ArtifactStore, *, scope: str = DEFAULT_SCOPE) -> list[CacheEntry]:
    """Every entry of a scope, newest first (unreadable ones skipped)."""
    repo = repository(scope)
    out: list[CacheEntry] = []
    try:
        tags = store.list_tags(repo)
    except NotFoundError:
        return []
    for tag in tags:
        try:
            out.append(_load(store, store.resolve(repo, tag), scope))
        except (InvalidManifestError, NotFoundError):
            continue
    out.sort(key=lambda e: (-e.created_at, e.key))
    return out


def scopes(store: ArtifactStore) -> list[str]:
    pre = REPO_PREFIX + "/"
    return [r[len(pre) :] for r in store.list_repos() if r.startswith(pre)]


def match(
    keys: Sequence[tuple[str, float]], key: str, restore_keys: Sequence[str] = ()
) -> tuple[str, str] | None:
    """Pure lookup over (key, created_at) pairs: ("hit", key) for the exact key, else
    ("partial", key) for the newest key starting with `key`, then with each restore key in
    order; None on a miss. This is actions/cache's documented order."""
    validate_key(key)
    for p in restore_keys:
        validate_prefix(p)
    if any(k == key for k, _t in keys):
        return ("hit", key)
    newest_first = sorted(keys, key=lambda kt: (-kt[1], kt[0]))
    for prefix in (key, *restore_keys):
        for k, _t in newest_first:
            if k.startswith(prefix):
                return ("partial", k)
    return None


def lookup(
    store: ArtifactStore, key: str, restore_keys: Sequence[str] = (), *, scope: str = DEFAULT_SCOPE
) -> tuple[str, CacheEntry | None]:
    """("hit" | "partial" | "miss", entry)."""
    validate_key(key)
    for p in restore_keys:
        validate_prefix(p)
    exact = get(store, key, scope=scope)
    if exact is not None:
        return "hit", exact
    all_entries = entries(store, scope=scope)
    m = match([(e.key, e.created_at) for e in all_entries], key, restore_keys)
    if m is None:
        return "miss", None
    return m[0], next(e for e in all_entries if e.key == m[1])


# -- save ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SaveResult:
    entry: CacheEntry
    #: False when the key already existed (entries are immutable) and nothing was written.
    created_now: bool
    #: The entry this one was packed as a delta over, if any.
    base: str | None = None
    #: Compressed bytes of the new layer (0 if none was needed).
    new_bytes: int = 0
    seconds: float = 0.0


def _rebased(base_index: bytes, scan: Any) -> Any:
    """The base entry's index with each path's inode, device, ctime and link count taken from
    `scan` where the path exists in both: diffing `scan` against it then finds what differs in
    type, size, mode, owner, mtime, link target (or content) only, and never mistakes a
    directory with a new inode (a fresh restore, a CI checkout) for a recreated one."""
    return scan.rebased(_core.decode_index(base_index))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _uncompressed(d: Descriptor) -> int | None:
    v = (d.annotations or {}).get(A_UNCOMPRESSED)
    return int(v) if v is not None and v.isdigit() else None


def save(
    store: ArtifactStore,
    key: str,
    directory: str | os.PathLike[str],
    *,
    scope: str = DEFAULT_SCOPE,
    base: str | None = "auto",
    max_chain: int = DEFAULT_MAX_CHAIN,
    squash_ratio: float = DEFAULT_SQUASH_RATIO,
    level: int = 3,
    threads: int = 0,
    content_digests: bool = False,
) -> SaveResult:
    """Save `directory` as the entry `key` of `scope`; a no-op if the key exists.

    Files are compared with the base entry by type, size, mode, owner, mtime and link target
    (the quick check of rsync; a fresh checkout or restore changes inode numbers and ctimes,
    which therefore do not count); with `content_digests`, by content too (reads every file).

    `base` is the key of the entry to pack a delta over: "auto" (the entry of the scope sharing
    the longest key prefix, newest first), a key, or None (always pack whole)."""
    started = time.monotonic()
    repo = repository(scope)
    tag = tag_of(key)
    existing = get(store, key, scope=scope)
    if existing is not None:
        return SaveResult(existing, False, seconds=time.monotonic() - started)
    root = Path(directory)
    if not root.is_dir() or root.is_symlink():
        raise NotADirectoryError(f"not a directory: {root}")
    if max_chain < 1:
        raise ValueError("max_chain must be at least 1")

    base_entry: CacheEntry | None = None
    if base == "auto":
        candidates = entries(store, scope=scope)
        if candidates:
            base_entry = max(candidates, key=lambda e: (_common_prefix(e.key, key), e.created_at))
    elif base is not None:
        base_entry = get(store, base, scope=scope)
        if base_entry is None:
            raise RefNotFoundError(f"cache base {base!r} not found in scope {scope!r}")

    scan = _core.scan_tree(root, content_digests=content_digests)
    delta = None
    base_layers: tuple[Descriptor, ...] = ()
    if base_entry is not None:
        old = _rebased(store.read_blob(base_entry.index.digest), scan)
        d = scan.diff(old, content=content_digests)
        sizes = [_uncompressed(x) for x in base_entry.layers]
        too_long = len(base_entry.layers) + 1 > max_chain
        outweighs = (
            any(s is None for s in sizes)
            or not sizes
            or sum(s or 0 for s in sizes[1:]) + d.changed_bytes > squash_ratio * (sizes[0] or 0)
        )
        if d.is_empty() and not too_long:
            base_layers = base_entry.layers
        elif not too_long and not outweighs:
            delta, base_layers = d, base_entry.layers
        else:
            base_entry = None

    layers: tuple[Descriptor, ...] = base_layers
    new_bytes = 0
    if not base_layers or delta is not None:
        with _core.PackStream(scan, delta, level=level, threads=threads) as stream:
            stored = store.put_blob(stream, media_type=mt.CACHE_LAYER)  # type: ignore[arg-type]
            packed = stream.result()
        if stored.digest != packed["digest"] or stored.size != packed["size"]:
            raise DigestMismatchError(
                f"store recorded the cache layer as {stored.digest}, packer {packed['digest']}"
            )
        layer = Descriptor(
            stored.digest,
            stored.size,
            mt.CACHE_LAYER,
            annotations={A_DIFF_ID: packed["diff_id"], A_UNCOMPRESSED: str(packed["uncompressed_size"])},
        )
        layers = (*base_layers, layer)
        new_bytes = stored.size

    index_desc = store.put_blob(scan.encode(), media_type=mt.CACHE_INDEX_ZSTD)
    created_at = time.time()
    config = {
        "version": CONFIG_VERSION,
        "key": key,
        "scope": scope,
        "entries": len(scan),
        "files": scan.files,
        "bytes": scan.bytes,
        "index": index_desc.to_dict(),
        "base": str(base_entry.digest) if base_entry is not None else None,
    }
    config_desc = store.put_blob(canonical_json(config), media_type=mt.CACHE)
    notes = {
        A_KEY: key,
        A_CREATED_AT: repr(created_at),
        A_CREATED: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    manifest = ImageManifest(
        config=config_desc, layers=(*layers, index_desc), artifact_type=mt.CACHE, annotations=notes
    )
    stored_m = store.put_manifest(manifest.to_json(), mt.OCI_MANIFEST)
    try:
        store.tag(repo, tag, stored_m.digest, expect=MISSING)
    except TagConflictError:
        winner = get(store, key, scope=scope)
        if winner is None:
            raise
        return SaveResult(winner, False, seconds=time.monotonic() - started)
    entry = CacheEntry(stored_m.digest, scope, key, created_at, manifest, config)
    return SaveResult(
        entry,
        True,
        base=base_entry.key if base_entry is not None else None,
        new_bytes=new_bytes,
        seconds=time.monotonic() - started,
    )


# -- restore -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RestoreResult:
    #: "hit" (exact key), "partial" (a prefix matched) or "miss" (nothing written)
    kind: str
    key: str | None
    entry: CacheEntry | None
    dest: Path
    #: entries written and paths removed (a fresh restore writes every entry)
    written: int = 0
    removed: int = 0
    seconds: float = 0.0


def _empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return not any(True for _ in it)


def restore(
    store: ArtifactStore,
    key: str,
    directory: str | os.PathLike[str],
    *,
    restore_keys: Sequence[str] = (),
    scope: str = DEFAULT_SCOPE,
    check_content: bool = False,
) -> RestoreResult:
    """Restore the entry `lookup` finds into `directory` (see the module docstring). Into a
    non-empty directory, files are compared by type, size, mode, mtime and link target, and with
    `check_content` by content as well (for entries saved with content digests)."""
    started = time.monotonic()
    target = Path(directory).absolute()
    kind, entry = lookup(store, key, restore_keys, scope=scope)
    if entry is None:
        return RestoreResult("miss", None, None, target, seconds=time.monotonic() - started)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise NotADirectoryError(f"restore target is not a directory: {target}")
    if target.exists() and not _empty(target):
        written, removed = _restore_in_place(store, entry, target, check_content)
    else:
        written, removed = _restore_fresh(store, entry, target), 0
    return RestoreResult(kind, entry.key, entry, target, written, removed, time.monotonic() - started)


def _restore_fresh(store: ArtifactStore, entry: CacheEntry, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    declared = [_uncompressed(d) for d in entry.layers]
    all_declared = all(s is not None for s in declared)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.cache-restore-", dir=target.parent))
    try:
        unpacker = _core.Unpacker(
            tmp,
            max_bytes=sum(s or 0 for s in declared) if all_declared else None,
            max_ratio=0 if all_declared else None,
        )
        for d, size in zip(entry.layers, declared, strict=True):
            local = store.blob_local_path(d.digest)
            if local is not None:
                st = unpacker.apply(local, digest=str(d.digest), size=size)
            else:
                with store.get_blob(d.digest) as r:
                    st = unpacker.apply(r, size=size)
            if st["compressed"] != d.size:
                raise DigestMismatchError(
                    f"layer {d.digest} is {st['compressed']} bytes, descriptor says {d.size}"
                )
        totals = unpacker.finish()
        if target.exists():
            target.rmdir()  # empty (checked by the caller); rename(2) needs it gone or empty
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return int(totals["entries"])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _mtime_ns(m: tarfile.TarInfo) -> int:
    text = m.pax_headers.get("mtime")
    if text:
        whole, _, frac = text.partition(".")
        with contextlib.suppress(ValueError):
            return int(whole) * 1_000_000_000 + int((frac + "000000000")[:9])
    return int(m.mtime) * 1_000_000_000


def _restore_in_place(
    store: ArtifactStore, entry: CacheEntry, target: Path, check_content: bool = False
) -> tuple[int, int]:
    """Write only the paths whose type, content or metadata differ from the entry's index, and
    remove the paths the entry lacks. Returns (written, removed)."""
    want = {e[0]: e for e in _core.decode_index(store.read_blob(entry.index.digest)).entries()}
    hashed = check_content and any(e[6] is not None for e in want.values())
    have = {e[0]: e for e in _core.scan_tree(target, content_digests=hashed).entries()}
    # Compared: (path, kind, size, mode, mtime_ns, link target) and, when checking content and
    # the index has them, content digests. Inode numbers and ctimes always differ between trees.
    width = 7 if hashed else 6

    def same(p: str) -> bool:
        h = have.get(p)
        return h is not None and h[:width] == want[p][:width]

    gone = [p for p in have if p not in want]
    removed = 0
    touched_dirs: set[str] = set()
    for p in sorted(gone, key=len, reverse=True):
        if (target / p).exists() or (target / p).is_symlink():
            _remove(target / p)
        touched_dirs.add(os.path.dirname(p) or ".")
        removed += 1
    changed = {p for p in want if not same(p)}
    kinds = {p: e[1] for p, e in want.items()}
    written = _extract(store, entry, target, changed, kinds) if changed else 0
    # Writing or removing an entry moves its directory's mtime: put every such directory (and
    # each changed one) back to the entry's, deepest first.
    touched_dirs |= {os.path.dirname(p) or "." for p in changed if p != "."}
    touched_dirs |= {p for p in changed if want[p][1] == "dir"}
    for name in sorted(touched_dirs, key=lambda x: (-x.count("/"), x)):
        e = want.get(name)
        if e is not None and e[1] == "dir":
            if name in changed:
                os.chmod(target / name, e[3] & 0o7777)
            os.utime(target / name, ns=(e[4], e[4]), follow_symlinks=False)
    return written, removed


def _extract(
    store: ArtifactStore, entry: CacheEntry, target: Path, changed: set[str], kinds: dict[str, str]
) -> int:
    """Extract the members named in `changed` from the entry's layers (later layers win)."""
    written = 0
    for layer in entry.layers:
        with store.get_blob(layer.digest) as raw:
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for m in tar:
                    name = m.name.removeprefix("./") or "."
                    if name not in changed or name == ".":
                        continue
                    path = target / name
                    want_dir = kinds.get(name) == "dir"
                    if path.is_symlink() or (path.exists() and path.is_dir() != want_dir):
                        _remove(path)
                    elif path.exists() and not want_dir:
                        path.unlink()
                    try:
                        tar.extract(m, target, filter="data", set_attrs=not m.isdir())
                    except tarfile.FilterError as e:
                        raise UnsafeArchiveError(
                            f"cache entry {entry.digest}: unsafe member {name!r}: {e}"
                        ) from None
                    if m.isfile():
                        os.utime(path, ns=(_mtime_ns(m), _mtime_ns(m)), follow_symlinks=False)
                    written += 1
    return written


def delete(store: ArtifactStore, key: str, *, scope: str = DEFAULT_SCOPE) -> CacheEntry:
    """Untag an entry (its blobs go at the next GC unless another entry or a lease holds them)."""
    entry = get(store, key, scope=scope)
    if entry is None:
        raise RefNotFoundError(f"cache key {key!r} not found in scope {scope!r}")
    store.untag(repository(scope), entry.tag, expect=entry.digest)
    return entry


def unique_bytes(store_entries: Iterable[CacheEntry]) -> int:
    """Stored bytes of the distinct blobs a set of entries references."""
    seen: dict[str, int] = {}
    for e in store_entries:
        for d in e.blobs:
            seen[str(d.digest)] = d.size
    return sum(seen.values())


__all__ = [
    "DEFAULT_SCOPE",
    "CacheEntry",
    "RestoreResult",
    "SaveResult",
    "delete",
    "entries",
    "get",
    "lookup",
    "match",
    "repository",
    "restore",
    "save",
    "scopes",
    "tag_of",
    "unique_bytes",
    "validate_key",
]
