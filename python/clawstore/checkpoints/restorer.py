"""Restoring a checkpoint (or a subtree of it): coalesced ranged reads of the frames needed, in
parallel, sliced and verified by the Rust core, written by the layer unpacker into a temporary
directory renamed into place at the end."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

from clawstore import _core
from clawstore.checkpoints.format import (
    SPECIAL_BITS,
    Checkpoint,
    RestoreResult,
)
from clawstore.checkpoints.index import (
    check_path,
    is_int,
    load,
)
from clawstore.digest import Digest
from clawstore.errors import (
    DigestMismatchError,
    NotFoundError,
)
from clawstore.restoredir import RestoreDir, check_target
from clawstore.store import ArtifactStore

#: File bytes per layer handed to the unpacker (layers are built while the previous one unpacks).
LAYER_BATCH: Final = 4 << 20
#: Ranged reads of neighbouring frames closer than this are merged into one read ...
COALESCE_GAP: Final = 1 << 20
#: ... up to this size.
MAX_RANGE: Final = 16 << 20


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
    check_path(ck.digest, want)
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
    target = check_target(directory, force=force)
    workers = workers or max(1, store.read_concurrency)

    def mode_of(e: dict[str, Any]) -> int:
        m = int(e.get("m", 0o644))
        return m if special_bits else m & ~SPECIAL_BITS

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
        if isinstance(root_meta, dict) and is_int(root_meta.get("m")) and is_int(root_meta.get("mt")):
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
