"""Agent session checkpoints: a directory of files as an OCI artifact, deduplicated per file.

A checkpoint is an OCI image manifest with artifactType
`application/vnd.elasticclaw.checkpoint.v1+json` whose config (same media type) holds the
session metadata, the parent checkpoint and the file list, and whose layers are the distinct
file contents, one blob per content (`application/vnd.elasticclaw.checkpoint.file.v1`).
It may point at a volume snapshot: `subject` is the volume manifest, and the annotation
`vnd.elasticclaw.checkpoint.volume` names it.

Config:
    {"created": "...Z", "created_ns": N, "parent": "sha256:..."|null, "session": {...},
     "volume": "repo@sha256:..."|null,
     "files": [{"path": "a/b.txt", "type": "file", "digest": "...", "size": 12, "mode": 420,
                "mtime_ns": N}, {"path": "a", "type": "dir", "mode": 493},
               {"path": "l", "type": "symlink", "target": "b.txt"}, ...]}

Unchanged files cost nothing: a file whose size and mtime equal the parent's entry reuses the
parent's digest without being read (unless its mtime is within `RACY_NS` of the parent's
creation, where a same-second rewrite could hide: then it is re-hashed, as git does). Changed
files are hashed in parallel (the Rust core releases the GIL); a blob already in the store is not
uploaded again; files stream from disk (no size cap). Built only on `ArtifactStore`: pass a
`clawstore.hub.HubSession` to have the hub record and lease it.

The manifest lists one descriptor per distinct content (~140 bytes each), so a checkpoint holds
up to ~29,000 distinct files under the 4 MiB manifest limit; larger trees belong in a volume.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from clawstore import mediatypes as mt
from clawstore.digest import Digest, digest_file
from clawstore.errors import (
    ClawstoreError,
    InvalidManifestError,
    RefNotFoundError,
    UnsafeArchiveError,
)
from clawstore.manifest import Descriptor, ImageManifest, canonical_json, parse_manifest
from clawstore.names import Reference
from clawstore.store import ArtifactStore

ARTIFACT_TYPE = mt.CHECKPOINT
FILE_TYPE = mt.CHECKPOINT_FILE
VOLUME_ANNOTATION = "vnd.elasticclaw.checkpoint.volume"
CREATED_ANNOTATION = "org.opencontainers.image.created"
RACY_NS = 2_000_000_000


@dataclass
class CheckpointResult:
    descriptor: Descriptor
    config: dict[str, Any]
    files: int = 0
    bytes: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    reused_files: int = 0

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


def _safe_rel(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not path or "\x00" in path or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts):
        raise UnsafeArchiveError(f"unsafe path in checkpoint: {path!r}")
    if str(p) != path:
        raise UnsafeArchiveError(f"non-canonical path in checkpoint: {path!r}")
    return p


def _scan(root: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries.append({"path": rel, "type": "symlink", "target": os.readlink(full)})
                if name in dirnames:
                    dirnames.remove(name)  # os.walk does not follow it; be explicit
            elif stat.S_ISDIR(st.st_mode):
                entries.append({"path": rel, "type": "dir", "mode": mode})
            elif stat.S_ISREG(st.st_mode):
                entries.append(
                    {
                        "path": rel,
                        "type": "file",
                        "size": st.st_size,
                        "mode": mode,
                        "mtime_ns": st.st_mtime_ns,
                    }
                )
            # sockets, fifos, devices: not part of a session checkpoint
    entries.sort(key=lambda e: e["path"])
    return entries


def resolve_ref(store: ArtifactStore, ref: str) -> Digest:
    """A digest, REPO@DIGEST or REPO:TAG -> the manifest digest."""
    if ref.startswith(("sha256:", "sha512:", "blake3:")):
        return Digest.parse(ref)
    r = Reference.parse(ref)
    return r.digest or store.resolve(r.repository, r.tag or "latest")


def read_checkpoint(store: ArtifactStore, ref: str | Digest) -> tuple[Digest, ImageManifest, dict[str, Any]]:
    digest = resolve_ref(store, str(ref))
    m = parse_manifest(store.get_manifest(digest))
    if not isinstance(m, ImageManifest) or m.artifact_type != ARTIFACT_TYPE:
        raise InvalidManifestError(
            f"{ref} is not a checkpoint (artifactType {getattr(m, 'artifact_type', None)})"
        )
    config = json.loads(store.read_blob(m.config.digest))
    if not isinstance(config, dict) or not isinstance(config.get("files"), list):
        raise InvalidManifestError(f"{ref}: checkpoint config has no file list")
    return digest, m, config


def create(
    store: ArtifactStore,
    ref: str,
    directory: str | os.PathLike[str],
    *,
    session: dict[str, Any] | None = None,
    parent: str | None = "auto",
    volume: str | None = None,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> CheckpointResult:
    """Checkpoint `directory` as `ref` (REPO:TAG). `parent`: "auto" (what REPO:TAG points at
    now, if anything), a reference/digest, or None. `volume`: a volume snapshot reference."""
    target = Reference.parse(ref)
    if target.tag is None:
        raise ClawstoreError("checkpoint reference needs a tag: REPO:TAG")
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    parent_digest: Digest | None = None
    if parent == "auto":
        try:
            parent_digest = store.resolve(target.repository, target.tag)
        except RefNotFoundError:
            parent_digest = None
    elif parent is not None:
        parent_digest = resolve_ref(store, parent)
    prev: dict[str, dict[str, Any]] = {}
    prev_created_ns = 0
    if parent_digest is not None:
        _d, _m, pconf = read_checkpoint(store, parent_digest)
        prev = {e["path"]: e for e in pconf["files"] if e.get("type") == "file"}
        prev_created_ns = int(pconf.get("created_ns", 0))

    created_ns = time.time_ns()
    entries = _scan(root)
    result = CheckpointResult(Descriptor(Digest(mt.EMPTY_DIGEST), 0), {})
    to_hash: list[dict[str, Any]] = []
    for e in entries:
        if e["type"] != "file":
            continue
        result.files += 1
        result.bytes += e["size"]
        p = prev.get(e["path"])
        if (
            p is not None
            and p.get("size") == e["size"]
            and p.get("mtime_ns") == e["mtime_ns"]
            and e["mtime_ns"] < prev_created_ns - RACY_NS
        ):
            e["digest"] = p["digest"]
            result.reused_files += 1
        else:
            to_hash.append(e)

    def _hash(e: dict[str, Any]) -> None:
        e["digest"] = str(digest_file(root / e["path"]))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for e in to_hash:
            pool.submit(_hash, e)
    for e in to_hash:
        if "digest" not in e:  # a worker failed (file vanished...): surface its error here
            _hash(e)
        result.hashed_files += 1
        result.hashed_bytes += e["size"]

    # Upload contents the store lacks. A hub session leases them all in one transaction first.
    new_digests = {e["digest"]: e for e in to_hash}
    hold = getattr(store, "hold", None)
    if hold is not None and new_digests:
        hold(*new_digests)
    for digest, e in sorted(new_digests.items()):
        if not store.has_blob(digest):
            store.put_blob(root / e["path"], expected=digest, media_type=FILE_TYPE)
            result.uploaded_blobs += 1
            result.uploaded_bytes += e["size"]
        if progress is not None:
            progress(e["size"])

    sizes: dict[str, int] = {}
    for e in entries:
        if e["type"] == "file":
            sizes[e["digest"]] = e["size"]
    subject: Descriptor | None = None
    volume_name: str | None = None
    if volume is not None:
        vref = Reference.parse(volume)
        vd = vref.digest or store.resolve(vref.repository, vref.tag or "latest")
        vdata = store.get_manifest(vd)
        vm = parse_manifest(vdata)
        subject = Descriptor(vd, len(vdata), vm.media_type, artifact_type=vm.artifact_type)
        volume_name = f"{vref.repository}@{vd}"
    config = {
        "created": datetime.fromtimestamp(created_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "created_ns": created_ns,
        "parent": str(parent_digest) if parent_digest else None,
        "session": session or {},
        "volume": volume_name,
        "files": entries,
    }
    config_bytes = canonical_json(config)
    cfg = store.put_blob(config_bytes, media_type=ARTIFACT_TYPE)
    result.uploaded_bytes += len(config_bytes)
    layers = tuple(Descriptor(Digest(d), s, FILE_TYPE) for d, s in sorted(sizes.items()))
    annotations = {CREATED_ANNOTATION: config["created"]}
    if volume_name:
        annotations[VOLUME_ANNOTATION] = volume_name
    manifest = ImageManifest(
        Descriptor(cfg.digest, cfg.size, ARTIFACT_TYPE),
        layers,
        artifact_type=ARTIFACT_TYPE,
        subject=subject,
        annotations=annotations,
    )
    data = manifest.to_json()
    desc = store.put_manifest(data)
    result.uploaded_bytes += len(data)
    store.tag(target.repository, target.tag, desc.digest)
    result.descriptor = desc
    result.config = config
    return result


def restore(store: ArtifactStore, ref: str | Digest, directory: str | os.PathLike[str]) -> int:
    """Write checkpoint `ref` into `directory` (absent or empty). Returns files written.
    Paths are validated; nothing is written through a symlink (links are created last)."""
    _digest, _m, config = read_checkpoint(store, ref)
    dest = Path(directory)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ClawstoreError(f"restore target {dest} exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    entries = config["files"]
    for e in entries:
        _safe_rel(e["path"])
    dirs = [e for e in entries if e["type"] == "dir"]
    files = [e for e in entries if e["type"] == "file"]
    links = [e for e in entries if e["type"] == "symlink"]
    for e in dirs:
        (dest / e["path"]).mkdir(parents=True, exist_ok=True)
    written = 0
    for e in files:
        path = dest / e["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        _no_symlink_parents(dest, path)
        tmp = path.with_name(f".{path.name}.clawstore-tmp")
        with store.get_blob(e["digest"]) as r, open(tmp, "xb") as out:
            while chunk := r.read(1 << 20):
                out.write(chunk)
        os.chmod(tmp, e.get("mode", 0o644))
        os.utime(tmp, ns=(e["mtime_ns"], e["mtime_ns"]))
        os.replace(tmp, path)
        written += 1
    for e in links:
        path = dest / e["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        _no_symlink_parents(dest, path)
        os.symlink(e["target"], path)
    for e in sorted(dirs, key=lambda e: e["path"].count("/"), reverse=True):
        os.chmod(dest / e["path"], e.get("mode", 0o755))
    return written


def _no_symlink_parents(root: Path, path: Path) -> None:
    p = path.parent
    while p != root:
        if p.is_symlink():
            raise UnsafeArchiveError(f"refusing to write {path} through symlink {p}")
        p = p.parent


def ls(store: ArtifactStore, repo: str) -> list[CheckpointInfo]:
    out = []
    for tag in store.list_tags(repo):
        try:
            digest, _m, config = read_checkpoint(store, f"{repo}:{tag}")
        except (InvalidManifestError, RefNotFoundError):
            continue
        files = [e for e in config["files"] if e.get("type") == "file"]
        out.append(
            CheckpointInfo(
                tag,
                digest,
                config.get("created", ""),
                config.get("parent"),
                len(files),
                sum(e["size"] for e in files),
                config.get("session", {}),
            )
        )
    return out


def diff(store: ArtifactStore, a: str | Digest, b: str | Digest) -> CheckpointDiff:
    """What changed from checkpoint `a` to checkpoint `b` (paths of every entry type)."""
    _da, _ma, ca = read_checkpoint(store, a)
    _db, _mb, cb = read_checkpoint(store, b)
    fa = {e["path"]: _identity(e) for e in ca["files"]}
    fb = {e["path"]: _identity(e) for e in cb["files"]}
    d = CheckpointDiff()
    d.added = sorted(set(fb) - set(fa))
    d.removed = sorted(set(fa) - set(fb))
    d.modified = sorted(p for p in set(fa) & set(fb) if fa[p] != fb[p])
    return d


def _identity(e: dict[str, Any]) -> tuple[Any, ...]:
    return (e.get("type"), e.get("digest"), e.get("mode"), e.get("target"))


def files_of(config: dict[str, Any]) -> Iterable[dict[str, Any]]:
    return (e for e in config["files"] if e.get("type") == "file")


__all__ = [
    "ARTIFACT_TYPE",
    "CheckpointDiff",
    "CheckpointInfo",
    "CheckpointResult",
    "create",
    "diff",
    "ls",
    "read_checkpoint",
    "resolve_ref",
    "restore",
]
