"""Agent session checkpoints: a directory as an OCI artifact of framed packs, one file readable at
a time, a few requests plus the changed bytes per checkpoint.

    r = checkpoints.create(store, "checkpoints/alice:latest", "/srv/sessions/alice")
    checkpoints.restore(store, "checkpoints/alice:latest", "/tmp/alice")
    data = checkpoints.cat(store, "checkpoints/alice:latest", "notes/todo.md")

Format (an OCI image manifest, artifactType `application/vnd.elasticclaw.checkpoint.v1+json`):

- `layers`: the **packs** the checkpoint's files live in (`...checkpoint.pack.v1.tar+zstd`), then
  the **large files** (`...checkpoint.file.v1`, one blob per distinct content, raw bytes, shared
  by every checkpoint in the store that has that content). Every blob a checkpoint needs is a
  layer, so GC keeps it and `export` / a registry carries it like any image.
- `config` (`...checkpoint.config.v1+json+zstd`): zstd-compressed JSON with the session metadata,
  the parent checkpoint, the pack table and the **index**: one record per path,
  `{"p": path, "t": "file"|"dir"|"symlink", "m": mode, "mt": mtime_ns, ...}`; files add `"s"`
  size, `"h"` content digest (sha256), `"ct"`/`"i"` ctime and inode (change detection), and a
  location: `"k"` pack number, `"f"`/`"n"` offset and length of its zstd frame in that pack,
  `"o"` offset of its body in the decompressed frame; a large file has no `"k"`: its blob is
  `"h"`. Symlinks have `"l"`, the target. The index is in the config (not a layer of its own) so
  that a checkpoint costs one blob write fewer and a reader one GET fewer.
- The manifest's annotations repeat the summary (`created`, file count, bytes, parent, session)
  so that `ls` reads manifests only.

Packs (rust/checkpoint.rs): files below `threshold` (1 MiB) are packed as a tar stream cut at
member boundaries into groups of ~`group_bytes` (256 KiB), each compressed as its own zstd frame.
Concatenated frames are one valid zstd stream and the groups one valid tar, so a pack is an
ordinary tar+zstd layer; yet one file comes back with one ranged read of its frame (`cat`,
`restore --path`), verified by its content digest. A checkpoint writes new packs (split past
`pack_limit`, 64 MiB) only for files that changed; unchanged files keep pointing into their
parent's packs and cost nothing.

Change detection: a file is unchanged when its size, mtime, ctime and inode equal its parent
record and its mtime/ctime are older than the parent's creation by more than `RACY_NS` (a file
rewritten within the same clock tick as the previous checkpoint is re-read, as git does). ctime
and inode catch `cp -p`, `rsync -a` and `touch -d`, which keep size and mtime.

Compaction: when the file bytes still referenced in the parent's packs fall below
`compact_below` (half) of those packs' file bytes, the checkpoint repacks every small file from
the directory into fresh packs (as restic's prune does), so the old packs drop out of the
manifest and GC can reclaim them once older checkpoints go.

Restore: the index is validated first (canonical relative paths, no duplicates, every entry's
parent a directory of the index — so nothing below a symlink —, locations inside their packs;
UnsafeArchiveError otherwise). The frames needed are fetched with coalesced ranged reads,
`store.read_concurrency` at once; the Rust core slices each body out and checks its digest, and
the layer unpacker (rust/layer/unpack.rs, with its path and limit rules) writes everything into a
fresh temporary directory beside the target, renamed into place at the end: a failed or killed
restore leaves no target (and the next restore removes the leftovers). setuid, setgid and sticky
bits are dropped unless asked for.

Built only on `ArtifactStore` (a hub session is one): uploads pass their digest, so a session
leases them without a catalog transaction per blob.

Requests: `create` runs as one `store.operation()`, in which the store does not ask again about
what it has just written or read (the parent's packs, the index blob, the new config, the
manifest before its tag). On S3 a first checkpoint is GET tag, HEAD + PUT pack (small packs: one
conditional PUT), PUT index blob, config, manifest and tag; a later one GET tag, manifest, config
and index blob, PUT pack, config, manifest and tag (If-Match with the ETag of the GET). A process
remembers the checkpoints it created or loaded lately (`load`, by manifest digest), so the next
checkpoint of a session it made skips the config and index GETs and their decoding.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from clawstore import _core
from clawstore import mediatypes as mt
from clawstore.digest import Digest, digest_file
from clawstore.errors import (
    ClawstoreError,
    DigestMismatchError,
    InvalidManifestError,
    ManifestNotFoundError,
    NotFoundError,
    RefNotFoundError,
    UnsafeArchiveError,
)
from clawstore.manifest import Descriptor, ImageManifest, parse_manifest
from clawstore.names import Reference
from clawstore.restoredir import RestoreDir
from clawstore.store import ArtifactStore
from clawstore.types import ANY, MISSING

ARTIFACT_TYPE: Final = mt.CHECKPOINT
CONFIG_TYPE: Final = mt.CHECKPOINT_CONFIG_ZSTD
PACK_TYPE: Final = mt.CHECKPOINT_PACK
INDEX_TYPE: Final = mt.CHECKPOINT_INDEX_ZSTD
FILE_TYPE: Final = mt.CHECKPOINT_FILE
FORMAT_VERSION: Final = 2

VOLUME_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.volume"
CREATED_ANNOTATION: Final = "org.opencontainers.image.created"
FILES_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.files"
BYTES_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.bytes"
PARENT_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.parent"
SESSION_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.session"

#: Files smaller than this go into packs; the rest are blobs of their own.
DEFAULT_THRESHOLD: Final = 1 << 20
#: A new pack is started past this many file bytes.
DEFAULT_PACK_LIMIT: Final = 64 << 20
#: Uncompressed bytes per zstd frame of a pack (the unit of a ranged read).
DEFAULT_GROUP_BYTES: Final = 256 << 10
#: Repack when the live bytes of the parent's packs fall below this fraction.
DEFAULT_COMPACT_BELOW: Final = 0.5
#: Files modified this close to the parent's creation are re-read: the kernel stamps files from
#: a coarse clock (a tick behind the wall clock we record), so a rewrite just after the parent's
#: scan can carry a timestamp from before it.
RACY_NS: Final = 100_000_000
#: ... and this close on filesystems with whole-second timestamps (ext3, FAT: 2 s, some NFS).
RACY_COARSE_NS: Final = 2_000_000_000
#: Ranged reads of neighbouring frames closer than this are merged into one read ...
COALESCE_GAP: Final = 1 << 20
#: ... up to this size.
MAX_RANGE: Final = 16 << 20
#: File bytes per layer handed to the unpacker (layers are built while the previous one unpacks).
LAYER_BATCH: Final = 4 << 20
#: Indexes up to this many records live in the config; larger ones in an index blob shared by
#: the checkpoints after it, whose configs hold only the records that differ from it.
INLINE_MAX: Final = 256
#: Largest decompressed checkpoint config we accept.
MAX_CONFIG_BYTES: Final = 1 << 30
_SPECIAL_BITS: Final = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


@dataclass
class CheckpointResult:
    descriptor: Descriptor
    config: dict[str, Any]
    files: int = 0
    bytes: int = 0
    #: files read from disk (changed, new, racy or repacked) and their bytes
    hashed_files: int = 0
    hashed_bytes: int = 0
    #: blobs written (packs, large files, config) and bytes sent to the store
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    reused_files: int = 0
    packs: int = 0
    compacted: bool = False
    #: files that vanished or were swapped for something else between scan and read
    skipped: list[str] = field(default_factory=list)

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest


@dataclass
class CheckpointInfo:
    tag: str | None
    digest: Digest
    created: str
    parent: str | None
    files: int
    bytes: int
    session: dict[str, Any]


@dataclass
class CheckpointDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.modified)


@dataclass
class RestoreResult:
    digest: Digest
    dest: Path
    files: int
    bytes: int
    entries: int
    #: ranged reads of packs and whole large-file blobs fetched
    reads: int
    seconds: float


@dataclass(frozen=True)
class Checkpoint:
    """A stored checkpoint: manifest, decoded config and its validated index."""

    digest: Digest
    manifest: ImageManifest
    config: dict[str, Any]
    packs: tuple[Descriptor, ...]
    entries: tuple[dict[str, Any], ...]
    #: the shared index blob's records (pack numbers of this config), when the config is a delta
    base: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def parent(self) -> str | None:
        p = self.config.get("parent")
        return p if isinstance(p, str) else None

    @property
    def created_ns(self) -> int:
        v = self.config.get("created_ns", 0)
        return v if isinstance(v, int) else 0

    def files(self) -> Iterator[dict[str, Any]]:
        return (e for e in self.entries if e["t"] == "file")

    @functools.cached_property
    def by_path(self) -> dict[str, dict[str, Any]]:
        """Every record by its path (built once per checkpoint)."""
        return {e["p"]: e for e in self.entries}


# -- reading and validating ----------------------------------------------------------------------


def resolve_ref(store: ArtifactStore, ref: str | Digest) -> Digest:
    """A digest, REPO@DIGEST or REPO:TAG -> the manifest digest."""
    text = str(ref)
    if text.startswith(("sha256:", "sha512:", "blake3:")):
        return Digest.parse(text)
    r = Reference.parse(text)
    return r.digest or store.resolve(r.repository, r.tag or "latest")


def _bad(digest: Digest, msg: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"checkpoint {digest}: {msg}")


#: sha256 content digests (the format's own), matched without building a Digest per record.
_SHA256: Final = re.compile(r"sha256:[0-9a-f]{64}")
#: Relative paths whose components are all ordinary names (no "", ".", ".." and no NUL).
_PLAIN_PATH: Final = re.compile(r"(?:(?!\.\.?(?:/|\Z))[^/\x00]+/)*(?!\.\.?\Z)[^/\x00]+")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_path(digest: Digest, p: object) -> str:
    if not isinstance(p, str) or not p:
        raise _bad(digest, f"index path {p!r} is not a non-empty string")
    # also "/x", "x/", "a//b"; the regex is the fast path, the split says exactly what is wrong
    if _PLAIN_PATH.fullmatch(p) is None and (
        "\x00" in p or any(part in ("", ".", "..") for part in p.split("/"))
    ):
        raise _bad(digest, f"unsafe path in index: {p!r}")
    return p


def _validate(
    digest: Digest, manifest: ImageManifest, config: dict[str, Any], raw_entries: list[Any]
) -> tuple[tuple[Descriptor, ...], tuple[dict[str, Any], ...]]:
    """Check every record of a checkpoint's index; UnsafeArchiveError on anything a restore could
    be tricked by. Returns the pack descriptors and the entries."""
    layer_sizes = {str(d.digest): d.size for d in manifest.layers}
    raw_packs = config.get("packs")
    if not isinstance(raw_packs, list):
        raise _bad(digest, "config has no pack table")
    packs: list[Descriptor] = []
    for p in raw_packs:
        if not isinstance(p, dict) or not isinstance(p.get("digest"), str) or not _is_int(p.get("size")):
            raise _bad(digest, f"bad pack record {str(p)[:80]!r}")
        d = Digest.parse(p["digest"])
        if layer_sizes.get(str(d)) != p["size"]:
            raise _bad(digest, f"pack {d} is not a layer of the manifest (or its size differs)")
        packs.append(Descriptor(d, p["size"], PACK_TYPE))
    seen: dict[str, str] = {}
    for e in raw_entries:
        if not isinstance(e, dict):
            raise _bad(digest, f"index record is not an object: {str(e)[:80]!r}")
        path = _check_path(digest, e.get("p"))
        kind = e.get("t")
        if path in seen:
            raise _bad(digest, f"duplicate path in index: {path!r}")
        if kind not in ("file", "dir", "symlink"):
            raise _bad(digest, f"{path!r}: unknown entry type {kind!r}")
        parent = path.rpartition("/")[0]
        if parent and seen.get(parent) != "dir":
            # Also refuses anything below a symlink or a file, and implied directories.
            raise _bad(digest, f"{path!r}: parent {parent!r} is not a directory listed before it")
        mode, mtime = e.get("m"), e.get("mt")
        # (type() is int, not _is_int: the same test, inlined on the hot path of every record)
        if type(mode) is not int or not 0 <= mode <= 0o7777:
            raise _bad(digest, f"{path!r}: bad mode {mode!r}")
        if type(mtime) is not int or abs(mtime) >= 1 << 62:
            raise _bad(digest, f"{path!r}: bad mtime {mtime!r}")
        if kind == "symlink":
            target = e.get("l")
            if not isinstance(target, str) or not target or "\x00" in target:
                raise _bad(digest, f"{path!r}: bad symlink target {target!r}")
        elif kind == "file":
            size, h = e.get("s"), e.get("h")
            if type(size) is not int or size < 0:
                raise _bad(digest, f"{path!r}: bad size {size!r}")
            if not isinstance(h, str):
                raise _bad(digest, f"{path!r}: file without a content digest")
            if _SHA256.fullmatch(h) is None:  # the usual case, checked fast; else the full parser
                try:
                    Digest.parse(h)
                except ClawstoreError:
                    raise _bad(digest, f"{path!r}: bad content digest {h!r}") from None
            if "k" in e:
                k, f, n, o = e.get("k"), e.get("f"), e.get("n"), e.get("o")
                if type(k) is not int or type(f) is not int or type(n) is not int or type(o) is not int:
                    raise _bad(digest, f"{path!r}: bad pack location")
                if not 0 <= k < len(packs):
                    raise _bad(digest, f"{path!r}: pack {k} is not in the pack table")
                if f < 0 or n <= 0 or o < 0 or f + n > packs[k].size:
                    raise _bad(digest, f"{path!r}: location {f}+{n} lies outside pack {packs[k].digest}")
            elif layer_sizes.get(h) != size:
                raise _bad(digest, f"{path!r}: blob {h} is not a layer of the manifest")
        seen[path] = kind
    return tuple(packs), tuple(raw_entries)


#: Checkpoints this process created or loaded lately, by manifest digest: the next checkpoint of
#: a session (a hub checkpoints the same sessions again and again) then neither downloads nor
#: decodes and validates its parent's index. Sound because the key is the digest of the
#: verified manifest bytes, which name the config and index blobs by digest: the same key always
#: means the same index. The manifest itself is still read from the store every time (the
#: permission check, a hub session's lease, proof that it is still stored).
RECENT_MAX: Final = 8
#: ... and at most this many index records in all (about 1 KB of memory each).
RECENT_MAX_RECORDS: Final = 100_000
_recent: dict[str, Checkpoint] = {}
_recent_lock = threading.Lock()


def _remember(ck: Checkpoint) -> None:
    if len(ck.entries) > RECENT_MAX_RECORDS:
        return
    with _recent_lock:
        _recent.pop(str(ck.digest), None)
        _recent[str(ck.digest)] = ck
        records = sum(len(c.entries) for c in _recent.values())
        while len(_recent) > RECENT_MAX or records > RECENT_MAX_RECORDS:
            records -= len(_recent.pop(next(iter(_recent))).entries)


def forget_recent() -> None:
    """Drop the in-process cache of recent checkpoints (tests; memory)."""
    with _recent_lock:
        _recent.clear()


def load(store: ArtifactStore, ref: str | Digest) -> Checkpoint:
    """Read and validate a checkpoint by REPO:TAG, REPO@DIGEST or digest."""
    digest = resolve_ref(store, ref)
    data = store.get_manifest(digest)  # verified against the digest
    with _recent_lock:
        known = _recent.get(str(digest))
    if known is not None:
        return known
    ck = _load(digest, ref, store, parse_manifest(data))
    _remember(ck)
    return ck


def _load(digest: Digest, ref: str | Digest, store: ArtifactStore, m: Any) -> Checkpoint:
    if not isinstance(m, ImageManifest) or m.artifact_type != ARTIFACT_TYPE:
        raise InvalidManifestError(
            f"{ref} is not a checkpoint (artifactType {getattr(m, 'artifact_type', None)})"
        )
    if m.config.media_type != CONFIG_TYPE:
        raise InvalidManifestError(f"checkpoint {digest}: config type {m.config.media_type} (old format?)")
    try:
        raw = _core.zstd_decompress(store.read_blob(m.config.digest), MAX_CONFIG_BYTES)
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifestError(f"checkpoint {digest}: config does not decode: {e}") from None
    if not isinstance(config, dict) or config.get("version") != FORMAT_VERSION:
        raise InvalidManifestError(f"checkpoint {digest}: unsupported config (format version 2 expected)")
    base = _read_base(store, digest, m, config)
    packs, entries = _validate(digest, m, config, _merge(digest, config, base))
    return Checkpoint(digest, m, config, packs, entries, base)


def _read_base(
    store: ArtifactStore, digest: Digest, manifest: ImageManifest, config: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The records of the shared index blob a delta config builds on, their pack numbers turned
    into this config's (by pack digest); {} when the config holds the whole index."""
    idx = config.get("index")
    if idx is None:
        return {}
    if not isinstance(idx, dict) or not isinstance(idx.get("digest"), str) or not _is_int(idx.get("size")):
        raise _bad(digest, f"bad index descriptor {str(idx)[:80]!r}")
    d = Digest.parse(idx["digest"])
    if {str(x.digest): x.size for x in manifest.layers}.get(str(d)) != idx["size"]:
        raise _bad(digest, f"index blob {d} is not a layer of the manifest")
    try:
        base = json.loads(_core.zstd_decompress(store.read_blob(d), MAX_CONFIG_BYTES))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifestError(f"checkpoint {digest}: index blob does not decode: {e}") from None
    if (
        not isinstance(base, dict)
        or not isinstance(base.get("packs"), list)
        or not isinstance(base.get("entries"), list)
    ):
        raise _bad(digest, "index blob has no pack list or records")
    packs = config.get("packs")
    pos = (
        {p.get("digest"): i for i, p in enumerate(packs) if isinstance(p, dict)}
        if isinstance(packs, list)
        else {}
    )
    # The index blob's pack numbers -> this config's (-1: a pack it no longer lists; fine if the
    # config replaces the record, validation refuses it otherwise). Usually the same numbers:
    # then the records are taken as they are, not copied.
    remap = [pos.get(d, -1) if isinstance(d, str) else -1 for d in base["packs"]]
    same = all(k == i for i, k in enumerate(remap))
    npacks = len(remap)
    out: dict[str, dict[str, Any]] = {}
    for e in base["entries"]:
        if type(e) is not dict or type(e.get("p")) is not str:
            raise _bad(digest, f"index record is not an object with a path: {str(e)[:80]!r}")
        if e["p"] in out:
            raise _bad(digest, f"duplicate path in index: {e['p']!r}")
        k = e.get("k")
        if k is not None:
            if type(k) is not int or not 0 <= k < npacks:
                raise _bad(digest, f"{e['p']!r}: pack {k!r} is not in the index blob's pack list")
            if not same:
                e = {**e, "k": remap[k]}
        out[e["p"]] = e
    return out


def _merge(digest: Digest, config: dict[str, Any], base: dict[str, dict[str, Any]]) -> list[Any]:
    """The full index: the config's records, over the base's minus `removed`, in path order."""
    delta = config.get("entries")
    removed = config.get("removed", [])
    if not isinstance(delta, list) or not isinstance(removed, list):
        raise _bad(digest, "config has no index records")
    if config.get("index") is None:
        return delta
    merged = dict(base)
    for p in removed:
        if not isinstance(p, str) or merged.pop(p, None) is None:
            raise _bad(digest, f"removed path {p!r} is not in the index blob")
    seen: set[str] = set()
    for e in delta:
        if not isinstance(e, dict) or not isinstance(e.get("p"), str):
            raise _bad(digest, f"index record is not an object with a path: {str(e)[:80]!r}")
        if e["p"] in seen:
            raise _bad(digest, f"duplicate path in index: {e['p']!r}")
        seen.add(e["p"])
        merged[e["p"]] = e
    return sorted(merged.values(), key=lambda e: e["p"])


def read_checkpoint(store: ArtifactStore, ref: str | Digest) -> tuple[Digest, ImageManifest, dict[str, Any]]:
    """(digest, manifest, config) of a checkpoint (config["entries"] is its index)."""
    ck = load(store, ref)
    return ck.digest, ck.manifest, ck.config


# -- create --------------------------------------------------------------------------------------


def _timestamp(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def create(
    store: ArtifactStore,
    ref: str,
    directory: str | os.PathLike[str],
    *,
    session: dict[str, Any] | None = None,
    parent: str | None = "auto",
    volume: str | None = None,
    threshold: int = DEFAULT_THRESHOLD,
    pack_limit: int = DEFAULT_PACK_LIMIT,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    compact_below: float = DEFAULT_COMPACT_BELOW,
    level: int = 3,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CheckpointResult:
    """Checkpoint `directory` as `ref` (REPO:TAG). `parent`: "auto" (what REPO:TAG points at now,
    if anything; the tag then moves by compare-and-swap from it), a reference/digest, or None.
    `volume`: a volume snapshot reference this checkpoint goes with (its manifest is the
    checkpoint's `subject`)."""
    with store.operation():  # what it writes and reads it need not ask the store about again
        return _create(
            store,
            ref,
            directory,
            session=session,
            parent=parent,
            volume=volume,
            threshold=threshold,
            pack_limit=pack_limit,
            group_bytes=group_bytes,
            compact_below=compact_below,
            level=level,
            workers=workers,
            progress=progress,
        )


def _create(
    store: ArtifactStore,
    ref: str,
    directory: str | os.PathLike[str],
    *,
    session: dict[str, Any] | None,
    parent: str | None,
    volume: str | None,
    threshold: int,
    pack_limit: int,
    group_bytes: int,
    compact_below: float,
    level: int,
    workers: int | None,
    progress: Callable[[int], None] | None,
) -> CheckpointResult:
    target = Reference.parse(ref)
    if target.tag is None:
        raise ClawstoreError("checkpoint reference needs a tag: REPO:TAG")
    root = Path(directory)
    if root.is_symlink() or not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    if threshold < 0 or pack_limit < 1 or group_bytes < 1:
        raise ValueError("threshold, pack_limit and group_bytes must be positive")
    workers = workers or max(2, min(8, store.read_concurrency))
    expect: Any = ANY
    parent_digest: Digest | None = None
    if parent == "auto":
        try:
            parent_digest = store.resolve(target.repository, target.tag)
        except RefNotFoundError:
            parent_digest = None
        expect = parent_digest if parent_digest is not None else MISSING
    elif parent is not None:
        parent_digest = resolve_ref(store, parent)
    prev = load(store, parent_digest) if parent_digest is not None else None

    created_ns = time.time_ns()
    try:
        scanned = _core.checkpoint_scan(root)
    except ValueError as e:
        raise ClawstoreError(str(e)) from None
    result = CheckpointResult(Descriptor(Digest(mt.EMPTY_DIGEST), 0), {})

    # Records are shared, never changed in place: an unchanged file's record *is* its parent's
    # (the index delta below then skips it by identity); anything that differs is a new dict.
    prev_by_path: dict[str, dict[str, Any]] = prev.by_path if prev is not None else {}
    racy_before = prev.created_ns - RACY_NS if prev is not None else -(1 << 63)
    coarse_before = racy_before - RACY_COARSE_NS

    entries: list[dict[str, Any]] = []
    small: list[tuple[dict[str, Any], int, int]] = []  # (entry, dev, ino) to pack
    large: list[tuple[dict[str, Any], int]] = []  # (entry, ino) to store as blobs
    reused_in_pack: dict[int, int] = {}  # parent pack number -> live file bytes
    racy: list[tuple[int, dict[str, Any]]] = []  # (entry number, parent record)
    nfiles = nbytes = reused = 0
    append = entries.append
    for path, kind, size, mode, mtime, ctime, ino, dev, link in scanned:
        p = prev_by_path.get(path)
        if kind == "dir":
            if p is not None and p["t"] == "dir" and p["m"] == mode and p["mt"] == mtime:
                append(p)
            else:
                append({"p": path, "t": "dir", "m": mode, "mt": mtime})
            continue
        if kind == "symlink":
            if (
                p is not None
                and p["t"] == "symlink"
                and p["l"] == link
                and p["m"] == mode
                and p["mt"] == mtime
            ):
                append(p)
            else:
                append({"p": path, "t": "symlink", "l": link, "m": mode, "mt": mtime})
            continue
        nfiles += 1
        nbytes += size
        if (
            p is not None
            and p.get("s") == size
            and p.get("mt") == mtime
            and p.get("ct") == ctime
            and p.get("i") == ino
        ):
            if (
                mtime < racy_before
                and ctime < racy_before
                and ((mtime | ctime) % 10**9 or max(mtime, ctime) < coarse_before)
            ):
                append(p if p["m"] == mode else {**p, "m": mode})
                reused += 1
                k = p.get("k")
                if k is not None:
                    reused_in_pack[k] = reused_in_pack.get(k, 0) + size
                continue
            racy.append((len(entries), p))  # re-hashed below; repacked only if it differs
        e = {"p": path, "t": "file", "m": mode, "mt": mtime, "ct": ctime, "i": ino, "s": size}
        append(e)
        if size < threshold:
            small.append((e, dev, ino))
        else:
            large.append((e, ino))
    result.files, result.bytes, result.reused_files = nfiles, nbytes, reused

    if racy:
        # Same metadata as the parent but too close to its creation to trust: hash the content;
        # when it is the parent's, keep the parent's record (no repacking, no index churn).
        def rehash(item: tuple[int, dict[str, Any]]) -> str | None:
            try:
                return str(digest_file(root / entries[item[0]]["p"]))
            except OSError:
                return None

        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(rehash, racy))
        same: set[int] = set()
        for (i, p), d in zip(racy, digests, strict=True):
            if d is not None and d == p.get("h"):
                e = entries[i]
                mode = e["m"]
                e.clear()
                e.update(p, m=mode)
                same.add(id(e))
                result.reused_files += 1
                result.hashed_files += 1
                result.hashed_bytes += e["s"]
                if "k" in e:
                    reused_in_pack[e["k"]] = reused_in_pack.get(e["k"], 0) + e["s"]
        small = [t for t in small if id(t[0]) not in same]
        large = [t for t in large if id(t[0]) not in same]

    # Old packs: carried over (renumbered) while enough of them is live; otherwise compact.
    pack_table: list[dict[str, Any]] = []
    if prev is not None and reused_in_pack:
        total = sum(int(prev.config["packs"][k].get("bytes", 0)) for k in reused_in_pack)
        live = sum(reused_in_pack.values())
        if total > 0 and live < compact_below * total:
            result.compacted = True
            dev_of = {s[0]: (s[7], s[6]) for s in scanned if s[1] == "file"}
            for i, e in enumerate(entries):
                if e["t"] == "file" and "k" in e:
                    e = {key: v for key, v in e.items() if key not in ("k", "f", "n", "o")}
                    entries[i] = e
                    dev, ino = dev_of[e["p"]]
                    small.append((e, dev, ino))
                    result.reused_files -= 1
            small.sort(key=lambda t: t[0]["p"])
        else:
            renumber: dict[int, int] = {}
            for k in sorted(reused_in_pack):
                renumber[k] = len(pack_table)
                pack_table.append(dict(prev.config["packs"][k]))
            _renumber(entries, renumber)

    gone: set[int] = set()
    # Sizes as scanned of the files read below (reading may find another size).
    new_files = [e for e, _dev, _ino in small] + [e for e, _ino in large]
    scanned_new = sum(e["s"] for e in new_files)
    with ThreadPoolExecutor(workers) as pool:
        uploads: list[Future[Any]] = []

        # Large files: hashed in parallel (the core releases the GIL) while small files pack;
        # then leased in one go (a hub session: one transaction) and uploaded if the store lacks them.
        def hash_large(e: dict[str, Any], ino: int) -> None:
            full = root / e["p"]
            try:
                d = digest_file(full)
                st = os.lstat(full)
            except FileNotFoundError:
                gone.add(id(e))
                return
            if not stat.S_ISREG(st.st_mode) or st.st_ino != ino:
                gone.add(id(e))  # swapped for something else since the scan
                return
            e["h"] = str(d)
            e["s"] = st.st_size

        def put_large(e: dict[str, Any], ino: int) -> None:
            full = root / e["p"]
            for _attempt in range(3):
                if id(e) in gone:
                    return
                if store.has_blob(e["h"]):
                    return
                try:
                    # Just hashed here and found missing: trust_size, so that the store neither
                    # reads it again nor asks again whether it is stored.
                    store.put_blob(full, expected=e["h"], media_type=FILE_TYPE, trust_size=True)
                except DigestMismatchError:
                    hash_large(e, ino)  # changed since it was hashed: hash again
                    continue
                result.uploaded_blobs += 1
                result.uploaded_bytes += e["s"]
                if progress is not None:
                    progress(e["s"])
                return
            raise ClawstoreError(f"{full} keeps changing while it is checkpointed; try again")

        hashing = [pool.submit(hash_large, e, ino) for e, ino in large]
        for e, _ino in large:
            result.hashed_files += 1
            result.hashed_bytes += e["s"]

        # Small files: into packs of at most pack_limit file bytes, packed by the core (reads,
        # hashes and compresses in parallel) while the previous pack uploads.
        def put_pack(data: bytes, digest: str) -> None:
            store.put_blob(data, expected=digest, media_type=PACK_TYPE)
            if progress is not None:
                progress(len(data))

        start = 0
        while start < len(small):
            end, nbytes = start, 0
            while end < len(small) and (end == start or nbytes + small[end][0]["s"] <= pack_limit):
                nbytes += small[end][0]["s"]
                end += 1
            chunk = small[start:end]
            start = end
            data, records = _core.checkpoint_pack(
                root, [(e["p"], dev, ino) for e, dev, ino in chunk], group_bytes, level
            )
            digest = "sha256:" + _core.digest_bytes(data)
            k = len(pack_table)
            file_bytes = 0
            for (e, _dev, _ino), rec in zip(chunk, records, strict=True):
                if rec is None:
                    gone.add(id(e))
                    continue
                h, size, mode, mtime, ctime, ino, f, n, o = rec
                e.update({"h": h, "s": size, "m": mode, "mt": mtime, "ct": ctime, "i": ino})
                e.update({"k": k, "f": f, "n": n, "o": o})
                file_bytes += size
                result.hashed_files += 1
                result.hashed_bytes += size
            pack_table.append({"digest": digest, "size": len(data), "bytes": file_bytes})
            result.packs += 1
            result.uploaded_blobs += 1
            result.uploaded_bytes += len(data)
            uploads.append(pool.submit(put_pack, data, digest))
        for fut in hashing:
            fut.result()
        store.hold(*(e["h"] for e, _ino in large if id(e) not in gone))  # hub session: one lease tx
        uploads.extend(pool.submit(put_large, e, ino) for e, ino in large)
        for fut in uploads:
            fut.result()

    if gone:
        result.skipped = sorted(e["p"] for e in entries if id(e) in gone)
        kept = [e for e in entries if id(e) not in gone]
        result.files -= len(entries) - len(kept)
        entries = kept
        result.bytes = sum(e["s"] for e in entries if e["t"] == "file")
        # Packs every surviving file left unreferenced (all their files vanished) are dropped.
        used = sorted({e["k"] for e in entries if e["t"] == "file" and "k" in e})
        if len(used) != len(pack_table):
            pack_table = [pack_table[k] for k in used]
            _renumber(entries, {k: i for i, k in enumerate(used)})
    else:
        result.bytes += sum(e["s"] for e in new_files) - scanned_new

    subject: Descriptor | None = None
    volume_name: str | None = None
    if volume is not None:
        vref = Reference.parse(volume)
        vd = vref.digest or store.resolve(vref.repository, vref.tag or "latest")
        vdata = store.get_manifest(vd)
        vm = parse_manifest(vdata)
        subject = Descriptor(vd, len(vdata), vm.media_type, artifact_type=vm.artifact_type)
        volume_name = f"{vref.repository}@{vd}"
    created = _timestamp(created_ns)
    root_st = os.stat(root)
    config: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "created": created,
        "created_ns": created_ns,
        "parent": str(parent_digest) if parent_digest else None,
        "session": session or {},
        "volume": volume_name,
        "files": result.files,
        "bytes": result.bytes,
        "threshold": threshold,
        "root": {"m": stat.S_IMODE(root_st.st_mode), "mt": root_st.st_mtime_ns},
        "packs": pack_table,
        "index": None,
        "entries": entries,
        "removed": [],
    }
    index_layer: Descriptor | None = None
    base: dict[str, dict[str, Any]] = {}
    if len(entries) > INLINE_MAX:
        index_layer, base = _write_index(store, prev if not result.compacted else None, config, level, result)
    config_bytes = _core.zstd_compress(json.dumps(config, separators=(",", ":")).encode(), level)
    cfg_digest = "sha256:" + _core.digest_bytes(config_bytes)
    cfg = store.put_blob(config_bytes, expected=cfg_digest, media_type=CONFIG_TYPE)
    result.uploaded_blobs += 1
    result.uploaded_bytes += len(config_bytes)
    blobs = sorted({(e["h"], e["s"]) for e in entries if e["t"] == "file" and "k" not in e})
    layers = (
        *(Descriptor(Digest.parse(p["digest"]), p["size"], PACK_TYPE) for p in pack_table),
        *(Descriptor(Digest.parse(h), s, FILE_TYPE) for h, s in blobs),
        *((index_layer,) if index_layer is not None else ()),
    )
    annotations = {
        CREATED_ANNOTATION: created,
        FILES_ANNOTATION: str(result.files),
        BYTES_ANNOTATION: str(result.bytes),
    }
    if parent_digest is not None:
        annotations[PARENT_ANNOTATION] = str(parent_digest)
    session_json = json.dumps(session or {}, sort_keys=True, separators=(",", ":"))
    if len(session_json) <= 4096:
        annotations[SESSION_ANNOTATION] = session_json
    if volume_name:
        annotations[VOLUME_ANNOTATION] = volume_name
    manifest = ImageManifest(
        Descriptor(cfg.digest, cfg.size, CONFIG_TYPE),
        layers,
        artifact_type=ARTIFACT_TYPE,
        subject=subject,
        annotations=annotations,
    )
    data = manifest.to_json()
    desc = store.put_manifest(data)
    result.uploaded_bytes += len(data)
    store.tag(target.repository, target.tag, desc.digest, expect=expect)
    result.descriptor = desc
    result.config = config
    packs = tuple(Descriptor(Digest.parse(p["digest"]), p["size"], PACK_TYPE) for p in pack_table)
    _remember(Checkpoint(desc.digest, manifest, config, packs, tuple(entries), base))
    return result


def _renumber(entries: list[dict[str, Any]], renumber: dict[int, int]) -> None:
    """Point file records at new pack numbers: records are shared with the parent, so one whose
    number changes is replaced by a copy, never changed in place."""
    if all(k == v for k, v in renumber.items()):
        return
    for i, e in enumerate(entries):
        k = e.get("k")
        if k is not None and e["t"] == "file" and renumber[k] != k:
            entries[i] = {**e, "k": renumber[k]}


def _write_index(
    store: ArtifactStore,
    prev: Checkpoint | None,
    config: dict[str, Any],
    level: int,
    result: CheckpointResult,
) -> tuple[Descriptor, dict[str, dict[str, Any]]]:
    """Put a large index out of the config: keep using the parent's index blob with only what
    differs from it in the config (a few records per checkpoint instead of every digest), or, once
    the differences pass 1/8 of the index, write a new index blob. Changes `config` in place and
    returns the index blob's descriptor (a layer of the manifest) and its records, numbered as
    this config's packs (`Checkpoint.base`)."""
    entries: list[dict[str, Any]] = config["entries"]
    if prev is not None and isinstance(prev.config.get("index"), dict):
        pos = {p["digest"]: i for i, p in enumerate(config["packs"])}
        # the parent's pack numbers -> this config's (-1: a pack it no longer lists; a record
        # there is then in the delta)
        remap = [pos.get(p["digest"], -1) for p in prev.config["packs"]]
        base: dict[str, dict[str, Any]]
        if all(k == i for i, k in enumerate(remap)):
            base = prev.base  # the usual case: the same numbers, the same records
        else:
            base = {}
            for path, e in prev.base.items():
                k = e.get("k")
                base[path] = {**e, "k": remap[k] if k >= 0 else -1} if k is not None else e
        # Unchanged records are the base's own objects: compared by identity first.
        delta = [e for e in entries if (b := base.get(e["p"])) is not e and b != e]
        removed = sorted(set(base) - {e["p"] for e in entries})
        if len(delta) + len(removed) <= max(INLINE_MAX, len(entries) // 8):
            idx = prev.config["index"]
            config.update(index=idx, entries=delta, removed=removed)
            return Descriptor(Digest.parse(idx["digest"]), idx["size"], INDEX_TYPE), base
    blob = {"version": FORMAT_VERSION, "packs": [p["digest"] for p in config["packs"]], "entries": entries}
    data = _core.zstd_compress(json.dumps(blob, separators=(",", ":")).encode(), level)
    d = store.put_blob(data, expected="sha256:" + _core.digest_bytes(data), media_type=INDEX_TYPE)
    result.uploaded_blobs += 1
    result.uploaded_bytes += len(data)
    config.update(index={"digest": str(d.digest), "size": d.size}, entries=[], removed=[])
    return Descriptor(d.digest, d.size, INDEX_TYPE), {e["p"]: e for e in entries}


# -- reading files -------------------------------------------------------------------------------


def _find(ck: Checkpoint, path: str) -> dict[str, Any]:
    want = path.strip("/")
    for e in ck.entries:
        if e["p"] == want:
            return e
    raise NotFoundError(f"{want!r} is not in checkpoint {ck.digest}")


def cat(store: ArtifactStore, ref: str | Digest, path: str) -> bytes:
    """The content of one file of a checkpoint: one ranged read of its pack frame (or its blob),
    verified against the file's content digest."""
    ck = load(store, ref)
    e = _find(ck, path)
    if e["t"] != "file":
        raise ClawstoreError(f"{e['p']!r} is a {e['t']}, not a file")
    if "k" not in e:
        return store.read_blob(e["h"])
    frame = store.get_blob_range(ck.packs[e["k"]].digest, e["f"], e["n"])
    if len(frame) != e["n"]:
        raise DigestMismatchError(f"{e['p']!r}: pack {ck.packs[e['k']].digest} is shorter than indexed")
    return bytes(_core.checkpoint_extract(frame, e["o"], e["s"], e["h"], e["p"]))


def open_file(store: ArtifactStore, ref: str | Digest, path: str) -> io.BufferedIOBase:
    """A verified binary reader of one file (large files stream from their blob)."""
    ck = load(store, ref)
    e = _find(ck, path)
    if e["t"] == "file" and "k" not in e:
        return store.get_blob(e["h"])  # type: ignore[return-value]
    return io.BytesIO(cat(store, ck.digest, path))


# -- restore -------------------------------------------------------------------------------------


class _RawTarFile(io.RawIOBase):
    """One tar member streamed from a reader, framed as zstd raw blocks (a layer for the
    unpacker without compressing anything): frame header, blocks of <= 128 KiB, end of archive."""

    BLOCK = 128 * 1024

    def __init__(self, header: bytes, body: Any, size: int) -> None:
        self._parts: Iterator[bytes] = self._gen(header, body, size)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def _gen(self, header: bytes, body: Any, size: int) -> Iterator[bytes]:
        yield b"\x28\xb5\x2f\xfd\x00\x38"  # zstd magic, no checksum, 128 KiB window
        pending = bytearray(header)
        left = size
        tail_added = False
        while True:
            while len(pending) < self.BLOCK and left > 0:
                chunk = body.read(min(left, self.BLOCK - len(pending)))
                if not chunk:
                    raise DigestMismatchError("blob ended before its indexed size")
                left -= len(chunk)
                pending += chunk
            if left == 0 and not tail_added:
                pending += b"\0" * ((-size) % 512) + b"\0" * 1024  # padding, end of archive
                tail_added = True
            block = bytes(pending[: self.BLOCK])
            del pending[: self.BLOCK]
            last = left == 0 and tail_added and not pending
            # block header: last-block bit, type 0 (raw), size
            yield (int(last) | (len(block) << 3)).to_bytes(3, "little") + block
            if last:
                if body.read(1):
                    raise DigestMismatchError("blob is longer than its indexed size")
                return

    def readinto(self, buf: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._parts)
            except StopIteration:
                return 0
        n = min(len(buf), len(self._buf))
        buf[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _select(ck: Checkpoint, prefix: str | None) -> list[dict[str, Any]]:
    if prefix is None:
        return list(ck.entries)
    want = prefix.strip("/")
    if not want:
        return list(ck.entries)
    _check_path(ck.digest, want)
    ancestors = set()
    parts = want.split("/")
    for i in range(1, len(parts)):
        ancestors.add("/".join(parts[:i]))
    out = [e for e in ck.entries if e["p"] in ancestors or e["p"] == want or e["p"].startswith(want + "/")]
    if not any(e["p"] == want for e in out):
        raise NotFoundError(f"{want!r} is not in checkpoint {ck.digest}")
    return out


def _ranges(frames: list[tuple[int, int]]) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Coalesce sorted (offset, length) frames into (start, length, frames) reads."""
    out: list[tuple[int, int, list[tuple[int, int]]]] = []
    for f, n in frames:
        if out:
            start, length, members = out[-1]
            if f - (start + length) <= COALESCE_GAP and f + n - start <= MAX_RANGE and f >= start + length:
                out[-1] = (start, f + n - start, [*members, (f, n)])
                continue
        out.append((f, n, [(f, n)]))
    return out


def restore(
    store: ArtifactStore,
    ref: str | Digest,
    directory: str | os.PathLike[str],
    *,
    path: str | None = None,
    force: bool = False,
    special_bits: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Restore checkpoint `ref` (or only `path` and below, with its parent directories) into
    `directory`, which must be absent or empty unless `force` (then it is replaced). Everything is
    written into a temporary directory beside it and renamed into place once complete."""
    started = time.monotonic()
    ck = load(store, ref)
    selected = _select(ck, path)
    target = Path(directory).absolute()
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise NotADirectoryError(f"restore target is not a directory: {target}")
    if target.exists() and _non_empty(target) and not force:
        raise ClawstoreError(f"restore target {target} is not empty (use force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, store.read_concurrency)

    def mode_of(e: dict[str, Any]) -> int:
        m = int(e.get("m", 0o644))
        return m if special_bits else m & ~_SPECIAL_BITS

    dirs = [e for e in selected if e["t"] == "dir"]
    links = [e for e in selected if e["t"] == "symlink"]
    files = [e for e in selected if e["t"] == "file"]
    packed = [e for e in files if "k" in e]
    blobs = [e for e in files if "k" not in e]

    # Reads: per pack, the needed frames coalesced into ranges.
    by_pack: dict[int, set[tuple[int, int]]] = {}
    for e in packed:
        by_pack.setdefault(e["k"], set()).add((e["f"], e["n"]))
    reads: list[tuple[int, int, int, list[tuple[int, int]]]] = []  # (pack, start, length, frames)
    for k in sorted(by_pack):
        for start, length, frames in _ranges(sorted(by_pack[k])):
            reads.append((k, start, length, frames))
    where: dict[tuple[int, int], tuple[int, int]] = {}  # (pack, frame off) -> (read no, offset in it)
    for i, (k, start, _length, frames) in enumerate(reads):
        for f, _n in frames:
            where[(k, f)] = (i, f - start)
    files_of_read: dict[int, list[dict[str, Any]]] = {}
    for e in packed:
        files_of_read.setdefault(where[(e["k"], e["f"])][0], []).append(e)

    def fetch(i: int) -> bytes:
        k, start, length, _frames = reads[i]
        data = store.get_blob_range(ck.packs[k].digest, start, length)
        if len(data) != length:
            raise DigestMismatchError(f"pack {ck.packs[k].digest} is shorter than its index says")
        return data

    nfiles = nbytes = entries = 0
    # Held by descriptor from creation to the final rename (clawstore.restoredir): every write
    # goes through the directory handle, so a symlink renamed over it writes nothing elsewhere.
    with RestoreDir(target) as tmp:
        unpacker = _core.Unpacker(tmp.fd, same_owner=False)

        def apply(layer: bytes) -> None:
            nonlocal entries
            st = unpacker.apply(io.BytesIO(layer))
            entries += int(st["entries"])

        root_meta = ck.config.get("root") if path is None else None
        root_items: list[tuple[Any, ...]] = []
        if isinstance(root_meta, dict) and _is_int(root_meta.get("m")) and _is_int(root_meta.get("mt")):
            root_items.append((".", "dir", mode_of(root_meta) & 0o7777, root_meta["mt"], 0, None, None, None))
        dir_items = [(e["p"], "dir", mode_of(e), e["mt"], 0, None, None, None) for e in dirs]
        apply(_core.checkpoint_layer(root_items + dir_items, []))
        with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as builder:
            # The core builds layer N+1 (decompress, verify, frame) while the unpacker writes
            # layer N; a window of reads is in flight ahead of both (bounded memory).
            building: Future[bytes] | None = None
            batch_items: list[tuple[Any, ...]] = []
            batch_ranges: list[bytes] = []
            batch_pos: dict[int, int] = {}
            batch_bytes = 0

            def flush() -> None:
                nonlocal building, batch_items, batch_ranges, batch_pos, batch_bytes
                fut = builder.submit(_core.checkpoint_layer, batch_items, batch_ranges)
                if building is not None:
                    apply(building.result())
                building = fut
                if progress is not None:
                    progress(batch_bytes)
                batch_items, batch_ranges, batch_pos, batch_bytes = [], [], {}, 0

            pending = {i: pool.submit(fetch, i) for i in range(min(len(reads), 2 * workers))}
            nxt = len(pending)
            for i in range(len(reads)):
                data = pending.pop(i).result()
                if nxt < len(reads):
                    pending[nxt] = pool.submit(fetch, nxt)
                    nxt += 1
                for e in files_of_read.get(i, []):
                    if i not in batch_pos:
                        batch_pos[i] = len(batch_ranges)
                        batch_ranges.append(data)
                    _ri, off = where[(e["k"], e["f"])]
                    loc = (batch_pos[i], off, e["n"], e["o"])
                    batch_items.append((e["p"], "file", mode_of(e), e["mt"], e["s"], e["h"], None, loc))
                    nfiles += 1
                    nbytes += e["s"]
                    batch_bytes += e["s"]
                    if batch_bytes >= LAYER_BATCH:
                        flush()
            if batch_items:
                flush()
            if building is not None:
                apply(building.result())
        for e in blobs:
            header = _core.checkpoint_member_header(e["p"], "file", mode_of(e), e["mt"], e["s"])
            with store.get_blob(e["h"]) as body:  # verifying reader: the digest is the content's
                st = unpacker.apply(_RawTarFile(header, body, e["s"]))
            entries += int(st["entries"])
            nfiles += 1
            nbytes += e["s"]
            if progress is not None:
                progress(e["s"])
        if links:
            apply(
                _core.checkpoint_layer(
                    [(e["p"], "symlink", 0o777, e["mt"], 0, None, e["l"], None) for e in links], []
                )
            )
        unpacker.finish()
        tmp.commit(replace=force)
    return RestoreResult(
        ck.digest,
        target,
        files=nfiles,
        bytes=nbytes,
        entries=entries,
        reads=len(reads) + len(blobs),
        seconds=time.monotonic() - started,
    )


def _non_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return any(True for _ in it)


def _info(store: ArtifactStore, tag: str | None, digest: Digest) -> CheckpointInfo | None:
    m = parse_manifest(store.get_manifest(digest))
    if not isinstance(m, ImageManifest) or m.artifact_type != ARTIFACT_TYPE:
        return None
    a = m.annotations or {}
    if FILES_ANNOTATION in a and SESSION_ANNOTATION in a:
        try:
            session = json.loads(a[SESSION_ANNOTATION])
            return CheckpointInfo(
                tag,
                digest,
                a.get(CREATED_ANNOTATION, ""),
                a.get(PARENT_ANNOTATION),
                int(a[FILES_ANNOTATION]),
                int(a.get(BYTES_ANNOTATION, "0")),
                session if isinstance(session, dict) else {},
            )
        except ValueError:
            pass
    ck = load(store, digest)
    files = list(ck.files())
    return CheckpointInfo(
        tag,
        digest,
        str(ck.config.get("created", "")),
        ck.parent,
        len(files),
        sum(e["s"] for e in files),
        ck.config.get("session") or {},
    )


def ls(store: ArtifactStore, repo: str) -> list[CheckpointInfo]:
    """The checkpoints tagged in `repo` (from their manifests' annotations)."""
    out = []
    for tag in store.list_tags(repo):
        with contextlib.suppress(InvalidManifestError, RefNotFoundError, ManifestNotFoundError):
            info = _info(store, tag, store.resolve(repo, tag))
            if info is not None:
                out.append(info)
    return out


def history(store: ArtifactStore, ref: str | Digest, *, limit: int | None = None) -> list[CheckpointInfo]:
    """The checkpoint at `ref`, then its parent, and so on (as far as they are still stored)."""
    out: list[CheckpointInfo] = []
    digest: Digest | None = resolve_ref(store, ref)
    while digest is not None and (limit is None or len(out) < limit):
        try:
            info = _info(store, None, digest)
        except (ManifestNotFoundError, InvalidManifestError):
            break
        if info is None:
            break
        out.append(info)
        digest = Digest.parse(info.parent) if info.parent else None
    return out


def diff(store: ArtifactStore, a: str | Digest, b: str | Digest) -> CheckpointDiff:
    """What changed from checkpoint `a` to checkpoint `b` (paths of every entry type)."""
    fa = {e["p"]: _identity(e) for e in load(store, a).entries}
    fb = {e["p"]: _identity(e) for e in load(store, b).entries}
    d = CheckpointDiff()
    d.added = sorted(set(fb) - set(fa))
    d.removed = sorted(set(fa) - set(fb))
    d.modified = sorted(p for p in set(fa) & set(fb) if fa[p] != fb[p])
    return d


def _identity(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e.get("t"), e.get("h"), e.get("m"), e.get("l"))


def files_of(config: dict[str, Any]) -> Iterable[dict[str, Any]]:
    return (e for e in config["entries"] if e.get("t") == "file")


__all__ = [
    "ARTIFACT_TYPE",
    "Checkpoint",
    "CheckpointDiff",
    "CheckpointInfo",
    "CheckpointResult",
    "RestoreResult",
    "cat",
    "create",
    "diff",
    "history",
    "load",
    "ls",
    "open_file",
    "read_checkpoint",
    "resolve_ref",
    "restore",
]
