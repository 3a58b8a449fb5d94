"""Workspace volume snapshots: a directory tree as an OCI artifact of tar+zstd layers.

    snap = volumes.snapshot(store, "/srv/work/alice", "volumes/workspace/alice:latest")
    volumes.restore(store, "volumes/workspace/alice:latest", "/srv/work/alice-copy")

A snapshot is an OCI image manifest (artifactType `application/vnd.elasticclaw.volume.v1+json`):

- `config` (same media type): canonical JSON with `entries`, `files`, `bytes`, `parent` (the
  previous snapshot's manifest digest or null), `index` (descriptor of the file-index blob) and
  `contentDigests` (whether the index holds content digests).
- `layers`: one or more `application/vnd.elasticclaw.volume.layer.v1.tar+zstd` layers, applied in
  order, each annotated with its diff_id (`io.elasticclaw.layer.diff_id`), uncompressed size and
  kind (`full` or `delta`); then the file index (`...volume.index.v2+zstd`; older snapshots:
  `v1+json+zstd`), listed as a layer so that garbage collection keeps it. Restore only unpacks
  the tar+zstd layers.

Incremental snapshots compare the tree with the parent's file index (type, size, mode, owner,
mtime, ctime, inode; optionally content digests) and pack only what changed plus OCI whiteouts,
so the new manifest is the parent's layers plus one small layer. Past `max_chain` layers, or when
the deltas outweigh the base (`squash_ratio`), the snapshot is packed as one fresh full layer.
The tag moves by compare-and-swap against the parent: a concurrent snapshot of the same ref
makes one of them fail with TagConflictError instead of silently losing the other.

Built only on the ArtifactStore API; the Rust core does scanning, packing and safe unpacking.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from clawstore import _core
from clawstore import mediatypes as mt
from clawstore.digest import Digest
from clawstore.errors import (
    BlobNotFoundError,
    ClawstoreError,
    DigestMismatchError,
    InvalidManifestError,
    ManifestNotFoundError,
    RefNotFoundError,
)
from clawstore.manifest import Descriptor, ImageManifest, canonical_json, parse_manifest
from clawstore.names import Reference
from clawstore.restoredir import RestoreDir, check_target
from clawstore.store import ArtifactStore
from clawstore.types import MISSING

CONFIG_VERSION: Final = 1
ANNOTATION_DIFF_ID: Final = "io.elasticclaw.layer.diff_id"
ANNOTATION_UNCOMPRESSED_SIZE: Final = "io.elasticclaw.layer.uncompressed_size"
ANNOTATION_LAYER_KIND: Final = "io.elasticclaw.layer.kind"
ANNOTATION_CREATED: Final = "org.opencontainers.image.created"

#: Squash into one full layer when a snapshot would have more layers than this.
DEFAULT_MAX_CHAIN: Final = 16
#: ... or when the deltas' uncompressed bytes exceed this fraction of the base layer's.
DEFAULT_SQUASH_RATIO: Final = 1.0
#: Scan and pack again at most this many times when files change under the packer.
PACK_ATTEMPTS: Final = 3
#: What the packer's error says when a file is not what the scan saw any more.
CHANGED_WHILE_PACKING: Final = "changed while packing"
#: Progress callbacks are called at most this often (seconds).
PROGRESS_INTERVAL: Final = 0.1


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Work done so far: `phase` is "scan", "pack" or "restore"; totals are None if unknown."""

    phase: str
    files: int
    bytes: int
    total_files: int | None = None
    total_bytes: int | None = None


ProgressCallback = Callable[[ProgressEvent], None]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A stored volume snapshot, as read back from its manifest and config."""

    digest: Digest
    manifest: ImageManifest
    config: Mapping[str, Any]
    ref: str | None = None
    #: False when `snapshot` found nothing changed and returned the existing snapshot.
    created_now: bool = False
    #: The layer this snapshot call added (None if nothing changed).
    new_layer: Descriptor | None = None
    #: The previous snapshot at the tag whose content is gone (a manifest, layer or index no
    #: longer stored): this one was taken in full instead of building on it.
    lost_parent: Digest | None = None

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        """The tar+zstd layers, in the order they are applied."""
        return tuple(d for d in self.manifest.layers if d.media_type == mt.VOLUME_LAYER)

    @property
    def index(self) -> Descriptor:
        idx = self.config.get("index")
        if not isinstance(idx, dict):
            raise InvalidManifestError(f"volume {self.digest}: config has no index descriptor")
        return Descriptor.from_dict(idx, "config.index")

    @property
    def parent(self) -> Digest | None:
        p = self.config.get("parent")
        return Digest.parse(p) if p else None

    @property
    def files(self) -> int:
        return int(self.config.get("files", 0))

    @property
    def entries(self) -> int:
        return int(self.config.get("entries", 0))

    @property
    def bytes(self) -> int:
        return int(self.config.get("bytes", 0))

    @property
    def content_digests(self) -> bool:
        return bool(self.config.get("contentDigests", False))

    @property
    def created(self) -> str | None:
        return (self.manifest.annotations or {}).get(ANNOTATION_CREATED)

    @property
    def stored_size(self) -> int:
        """Compressed bytes of all layers (shared layers counted for each snapshot)."""
        return sum(d.size for d in self.layers)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    snapshot: Snapshot
    dest: Path
    #: regular files and their bytes in the restored tree (from the snapshot's config)
    files: int
    bytes: int
    #: tar entries applied over all layers (deltas re-apply changed paths)
    entries: int
    seconds: float
    layers: tuple[Mapping[str, Any], ...] = field(default=())


class _Throttle:
    def __init__(self, cb: ProgressCallback | None) -> None:
        self.cb = cb
        self.last = 0.0

    def __call__(self, event: ProgressEvent, *, force: bool = False) -> None:
        if self.cb is None:
            return
        now = time.monotonic()
        if force or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.cb(event)


class _PackReader:
    """A raw binary reader over a PackStream that reports progress as the store consumes it."""

    def __init__(self, stream: Any, report: _Throttle, total_files: int, total_bytes: int) -> None:
        self._stream = stream
        self._report = report
        self._totals = (total_files, total_bytes)

    def readable(self) -> bool:
        return True

    def _progress(self, force: bool = False) -> None:
        _entries, files, nbytes = self._stream.progress
        self._report(ProgressEvent("pack", files, nbytes, *self._totals), force=force)

    def readinto(self, buf: bytearray | memoryview) -> int:
        n: int = self._stream.readinto(buf)
        self._progress(force=n == 0)
        return n

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._stream.read(size)
        self._progress(force=not data)
        return data

    def close(self) -> None:
        self._stream.close()


class _InBackground(Generic[T]):
    """`fn()` run on a thread now; `result()` waits for it and returns (or raises) what it did."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clawstore-volume-index", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to whoever calls result()
            self._error = e

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def _put_index(store: ArtifactStore, scan: Any) -> Descriptor:
    return store.put_blob(scan.encode(), media_type=mt.VOLUME_INDEX_V2_ZSTD)


def _is_volume(manifest: ImageManifest) -> bool:
    return manifest.artifact_type == mt.VOLUME or manifest.config.media_type == mt.VOLUME


def load(store: ArtifactStore, ref: str | Digest) -> Snapshot:
    """Read a snapshot by `repo:tag`, `repo@digest` or a manifest digest."""
    digest = store.resolve_ref(ref)
    ref_text = None if digest == ref else str(ref)
    manifest = parse_manifest(store.get_manifest(digest))
    if not isinstance(manifest, ImageManifest) or not _is_volume(manifest):
        raise InvalidManifestError(f"{ref_text or digest} is not a volume snapshot")
    try:
        config = json.loads(store.read_blob(manifest.config.digest))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifestError(f"volume {digest}: config is not JSON: {e}") from None
    if not isinstance(config, dict) or config.get("version") != CONFIG_VERSION:
        raise InvalidManifestError(f"volume {digest}: unsupported config {str(config)[:80]!r}")
    return Snapshot(digest, manifest, config, ref_text)


#: Largest uncompressed size a layer may declare (the core counts in unsigned 64 bits).
_MAX_DECLARED: Final = (1 << 63) - 1


def _layer_size(d: Descriptor) -> int | None:
    value = (d.annotations or {}).get(ANNOTATION_UNCOMPRESSED_SIZE)
    if value is None:
        return None
    if not (isinstance(value, str) and value.isascii() and value.isdigit()) or int(value) > _MAX_DECLARED:
        raise InvalidManifestError(
            f"layer {d.digest}: invalid {ANNOTATION_UNCOMPRESSED_SIZE} {str(value)[:40]!r}"
        )
    return int(value)


def snapshot(
    store: ArtifactStore,
    path: str | os.PathLike[str],
    ref: str,
    *,
    full: bool = False,
    content_digests: bool = False,
    max_chain: int = DEFAULT_MAX_CHAIN,
    squash_ratio: float = DEFAULT_SQUASH_RATIO,
    level: int = 3,
    threads: int = 0,
    progress: ProgressCallback | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Snapshot:
    """Snapshot the directory `path` to `ref` (`repo:tag`).

    When `ref` already points at a volume snapshot (and not `full`), only what changed since it
    is packed (plus whiteouts); the new snapshot lists the parent's layers and one new layer.
    With `content_digests`, the index holds a digest of every file and changes are detected by
    content too (reads every file on every snapshot). If nothing changed, the existing snapshot
    is returned (`created_now` False) and the tag is left alone.
    """
    r = Reference.parse(ref)
    if r.tag is None:
        raise ClawstoreError(f"snapshot needs a tag, not a digest: {ref}")
    repo, tag = r.repository, r.tag
    root = Path(path)
    if not root.is_dir() or root.is_symlink():
        raise NotADirectoryError(f"not a directory: {root}")
    if max_chain < 1:
        raise ValueError("max_chain must be at least 1")
    report = _Throttle(progress)

    try:
        prev_digest: Digest | None = store.resolve(repo, tag)
    except RefNotFoundError:
        prev_digest = None
    old_index: Any = None
    prev = None
    lost_parent: Digest | None = None
    if prev_digest is not None:
        # Never build on a parent whose content is gone (collected behind the tag's back, or
        # damaged): take a full snapshot instead, and say so (`lost_parent`).
        try:
            prev = load(store, prev_digest)
            if not all(store.has_blob(d.digest) for d in (*prev.layers, prev.index)):
                prev = None
        except (ManifestNotFoundError, BlobNotFoundError, InvalidManifestError):
            prev = None
        if prev is None:
            lost_parent = prev_digest

    for attempt in range(1, PACK_ATTEMPTS + 1):
        report(ProgressEvent("scan", 0, 0), force=True)
        scan = _core.scan_tree(root, content_digests=content_digests)
        report(ProgressEvent("scan", scan.files, scan.bytes, scan.files, scan.bytes), force=True)

        fingerprint = scan.fingerprint(content=content_digests)
        delta = None
        if prev is not None and not full:
            compare_content = content_digests and prev.content_digests
            if prev.config.get("fingerprint") == (
                fingerprint if compare_content == content_digests else scan.fingerprint(content=False)
            ):
                # the paths and metadata the diff compares are all the same: nothing changed
                # (no need to read and decode the parent's index)
                return Snapshot(prev.digest, prev.manifest, prev.config, str(r), created_now=False)
            if old_index is None:
                old_index = _core.decode_index(store.read_blob(prev.index.digest))
            d = scan.diff(old_index, content=content_digests and prev.content_digests)
            if d.is_empty():
                return Snapshot(prev.digest, prev.manifest, prev.config, str(r), created_now=False)
            base, *deltas = prev.layers
            base_size = _layer_size(base)
            delta_sizes = [_layer_size(x) for x in deltas]
            too_long = len(prev.layers) + 1 > max_chain
            outweighs = (
                base_size is None
                or any(s is None for s in delta_sizes)
                or sum(s or 0 for s in delta_sizes) + d.changed_bytes > squash_ratio * base_size
            )
            if not too_long and not outweighs:
                delta = d

        # The new index is stored while the layer packs (encoding it and its fsync overlap the
        # pack instead of following it).
        stream = _core.PackStream(scan, delta, level=level, threads=threads)
        index_put = _InBackground(lambda s=scan: _put_index(store, s))
        total_files = delta.changed if delta is not None else scan.files
        total_bytes = delta.changed_bytes if delta is not None else scan.bytes
        reader = _PackReader(stream, report, total_files, total_bytes)
        try:
            stored = store.put_blob(reader, media_type=mt.VOLUME_LAYER)  # type: ignore[arg-type]
            packed = stream.result()
        except OSError as e:
            # A file was replaced (or resized) between the scan and its read: the packer never
            # reads through what replaced it. Scan again (a live tree settles) a few times.
            with contextlib.suppress(Exception):
                index_put.result()  # (an unreferenced index blob is left to gc)
            if CHANGED_WHILE_PACKING not in str(e):
                raise
            if attempt == PACK_ATTEMPTS:
                raise ClawstoreError(
                    f"{root}: files kept changing while packing ({attempt} attempts): {e}"
                ) from None
            continue
        except BaseException:
            with contextlib.suppress(Exception):
                index_put.result()
            raise
        finally:
            stream.close()
        break
    else:  # pragma: no cover (the loop returns, breaks or raises)
        raise AssertionError("unreachable")
    if stored.digest != packed["digest"] or stored.size != packed["size"]:
        raise DigestMismatchError(
            f"store recorded the layer as {stored.digest} ({stored.size} bytes), "
            f"packer produced {packed['digest']} ({packed['size']} bytes)"
        )
    layer = Descriptor(
        stored.digest,
        stored.size,
        mt.VOLUME_LAYER,
        annotations={
            ANNOTATION_DIFF_ID: packed["diff_id"],
            ANNOTATION_UNCOMPRESSED_SIZE: str(packed["uncompressed_size"]),
            ANNOTATION_LAYER_KIND: "delta" if delta is not None else "full",
        },
    )
    layers = (*prev.layers, layer) if delta is not None and prev is not None else (layer,)

    index_desc = index_put.result()
    config: dict[str, Any] = {
        "version": CONFIG_VERSION,
        "entries": len(scan),
        "files": scan.files,
        "bytes": scan.bytes,
        "parent": str(prev.digest) if prev is not None else None,
        "index": index_desc.to_dict(),
        "contentDigests": content_digests,
        "fingerprint": fingerprint,
    }
    config_desc = store.put_blob(canonical_json(config), media_type=mt.VOLUME)
    notes = {ANNOTATION_CREATED: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    notes.update(annotations or {})
    manifest = ImageManifest(
        config=config_desc,
        layers=(*layers, index_desc),
        artifact_type=mt.VOLUME,
        annotations=notes,
    )
    stored_manifest = store.put_manifest(manifest.to_json(), mt.OCI_MANIFEST)
    expect = prev.digest if prev is not None else (lost_parent or MISSING)
    store.tag(repo, tag, stored_manifest.digest, expect=expect)
    return Snapshot(
        stored_manifest.digest,
        manifest,
        config,
        str(r),
        created_now=True,
        new_layer=layer,
        lost_parent=lost_parent,
    )


def restore(
    store: ArtifactStore,
    ref: str | Digest,
    dest: str | os.PathLike[str],
    *,
    force: bool = False,
    allow_devices: bool = False,
    same_owner: bool | None = None,
    max_bytes: int | None = None,
    max_entries: int | None = None,
    max_ratio: int | None = None,
    verify_diff_id: bool = False,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Restore a snapshot into `dest`.

    Layers are unpacked into a fresh temporary directory beside `dest`, which is renamed into
    place only when every layer has unpacked and verified (blob digest, uncompressed size, and
    with `verify_diff_id` the diff_id too — a second sha256 over the larger uncompressed side that
    the verified blob digest makes redundant, so it is off by default): a failed
    restore never leaves a half-restored `dest`. A non-empty `dest` is refused unless `force`,
    in which case it is replaced. The bomb limits (`max_bytes`, `max_entries`, `max_ratio`) come
    from the caller (configuration) or the core's defaults, never from the manifest being
    restored: a layer's declared uncompressed size only bounds that layer further (and must
    match exactly). The temporary directory is held by descriptor from creation to the final
    rename (`clawstore.restoredir`): nothing is written outside it even if someone renames a
    symlink over it, and such a swap fails the restore.
    """
    started = time.monotonic()
    snap = load(store, ref)
    target = check_target(dest, force=force)

    declared = [_layer_size(d) for d in snap.layers]
    all_declared = all(s is not None for s in declared)
    report = _Throttle(progress)
    # Progress counts uncompressed layer bytes (what the unpacker reads) against their declared
    # sum; files against the snapshot's count when there is one layer (deltas rewrite files).
    total_bytes = sum(s or 0 for s in declared) if all_declared else None
    total_files = snap.files if len(snap.layers) == 1 else None

    def on_progress(files: int, nbytes: int) -> None:
        report(ProgressEvent("restore", files, nbytes, total_files, total_bytes))

    with RestoreDir(target) as tmp:
        unpacker = _core.Unpacker(
            tmp.fd,
            max_bytes=max_bytes,
            max_entries=max_entries,
            max_ratio=max_ratio,
            allow_devices=allow_devices,
            same_owner=same_owner,
        )
        layer_stats = []
        for d, size in zip(snap.layers, declared, strict=True):
            diff_id = (d.annotations or {}).get(ANNOTATION_DIFF_ID) if verify_diff_id else None
            local = store.blob_local_path(d.digest)
            if local is not None:
                # zero-copy: the core hashes the blob itself and checks it against the digest
                st = unpacker.apply(
                    local, digest=str(d.digest), diff_id=diff_id, size=size, progress=on_progress
                )
            else:
                with store.get_blob(d.digest) as r:  # verifying reader
                    st = unpacker.apply(r, diff_id=diff_id, size=size, progress=on_progress)
            if st["compressed"] != d.size:
                raise DigestMismatchError(
                    f"layer {d.digest} is {st['compressed']} bytes, descriptor says {d.size}"
                )
            layer_stats.append(st)
        totals = unpacker.finish()
        report(
            ProgressEvent("restore", totals["files"], totals["bytes"], total_files, total_bytes), force=True
        )
        tmp.commit(replace=force)
    return RestoreResult(
        snap,
        target,
        files=snap.files,
        bytes=snap.bytes,
        entries=totals["entries"],
        seconds=time.monotonic() - started,
        layers=tuple(layer_stats),
    )


def history(store: ArtifactStore, ref: str | Digest, *, limit: int | None = None) -> list[Snapshot]:
    """The snapshot at `ref`, then its parent, and so on (as far as they are still stored)."""
    out: list[Snapshot] = []
    snap: Snapshot | None = load(store, ref)
    while snap is not None and (limit is None or len(out) < limit):
        out.append(snap)
        parent = snap.parent
        if parent is None:
            break
        try:
            snap = load(store, parent)
        except (ManifestNotFoundError, InvalidManifestError):
            break
    return out


def ls(store: ArtifactStore, repo: str | None = None) -> list[Snapshot]:
    """Every tagged volume snapshot (in `repo`, or in every repository), sorted by reference."""
    out: list[Snapshot] = []
    repos = [repo] if repo is not None else store.list_repos()
    for rp in repos:
        for tag in store.list_tags(rp):
            with contextlib.suppress(InvalidManifestError, ManifestNotFoundError, RefNotFoundError):
                out.append(load(store, f"{rp}:{tag}"))
    return out


def files(store: ArtifactStore, ref: str | Digest) -> Iterator[tuple[str, str, int, int, int, str | None]]:
    """(path, kind, size, mode, mtime_ns, link target) of every entry of a snapshot's index."""
    snap = load(store, ref)
    index = _core.decode_index(store.read_blob(snap.index.digest))
    for path, kind, size, mode, mtime_ns, link, _digest in index.entries():
        yield path, kind, size, mode, mtime_ns, link


__all__ = [
    "ANNOTATION_DIFF_ID",
    "ANNOTATION_LAYER_KIND",
    "ANNOTATION_UNCOMPRESSED_SIZE",
    "ProgressEvent",
    "RestoreResult",
    "Snapshot",
    "files",
    "history",
    "load",
    "ls",
    "restore",
    "snapshot",
]
