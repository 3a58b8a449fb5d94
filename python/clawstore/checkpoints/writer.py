"""Creating a checkpoint: scan the directory, reuse the parent's records of unchanged files,
pack the small files that changed (Rust packer), store large files as blobs of their own,
compact when the parent's packs are mostly dead, and write index, config, manifest and tag in
one `store.operation()`."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from clawstore import _core
from clawstore import mediatypes as mt
from clawstore.checkpoints.format import (
    ARTIFACT_TYPE,
    BYTES_ANNOTATION,
    CONFIG_TYPE,
    CREATED_ANNOTATION,
    DEFAULT_COMPACT_BELOW,
    DEFAULT_GROUP_BYTES,
    DEFAULT_PACK_LIMIT,
    DEFAULT_THRESHOLD,
    FILE_TYPE,
    FILES_ANNOTATION,
    FORMAT_VERSION,
    INDEX_TYPE,
    PACK_TYPE,
    PARENT_ANNOTATION,
    SESSION_ANNOTATION,
    VOLUME_ANNOTATION,
    Checkpoint,
    CheckpointResult,
)
from clawstore.checkpoints.index import (
    load,
    remember,
    resolve_ref,
)
from clawstore.digest import Digest, digest_file
from clawstore.errors import (
    ClawstoreError,
    DigestMismatchError,
    RefNotFoundError,
)
from clawstore.manifest import Descriptor, ImageManifest, parse_manifest
from clawstore.names import Reference
from clawstore.store import ArtifactStore
from clawstore.types import ANY, MISSING

#: Indexes up to this many records live in the config; larger ones in an index blob shared by
#: the checkpoints after it, whose configs hold only the records that differ from it.
INLINE_MAX: Final = 256
#: Files modified this close to the parent's creation are re-read: the kernel stamps files from
#: a coarse clock (a tick behind the wall clock we record), so a rewrite just after the parent's
#: scan can carry a timestamp from before it.
RACY_NS: Final = 100_000_000
#: ... and this close on filesystems with whole-second timestamps (ext3, FAT: 2 s, some NFS).
RACY_COARSE_NS: Final = 2_000_000_000


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
    remember(Checkpoint(desc.digest, manifest, config, packs, tuple(entries), base))
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
