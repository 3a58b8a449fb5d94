"""Logs: append-only byte streams (agent session output) stored as zstd segments.

    with logs.LogWriter(store, "logs/session-42:stdout") as w:
        w.append(b"hello\\n")
        w.flush()                      # durable when it returns
    for chunk in logs.read(store, "logs/session-42:stdout", since=t0):
        ...

A log is an OCI image manifest (artifactType `application/vnd.elasticclaw.log.v1+json`, empty
config) whose layers are its segments in order (`...log.segment.v1+zstd`). Each segment blob is
a zstd skippable frame holding its time marks (uncompressed offset, epoch seconds of the append
that wrote the byte there), then one zstd frame of the bytes, so `zstd -d` of a segment gives
the raw text. Each layer descriptor is annotated with the segment's uncompressed `offset` in the
log, `length`, `lines` (newlines), `first_ts`/`last_ts` (least and greatest mark) and whether its
first byte `continues` a line of the previous segment. The manifest's annotations hold the
writer's state: `open` or `closed`, the writer's id and its lease expiry.

Appends are buffered and sealed into a segment by size (`segment_bytes`), by age (`max_age`,
a background thread) and on `flush()`/`close()`. Each seal stores the segment, then a manifest
listing every segment, then moves the tag by compare-and-swap from the manifest this writer
last wrote: a reader resolving the tag always sees a whole prefix of the log whose every byte
the manifest digest commits to. One writer holds a log: opening a log whose lease is live
raises LeaseConflictError; a writer whose log was taken over (after its lease expired) gets
TagConflictError on its next seal. The lease is renewed by every seal, and by the background
thread while idle. When more than `compact_after` small segments accumulate, runs of them are
merged into segments of up to `segment_bytes` (same offsets, so readers and followers are
unaffected); the replaced blobs become garbage for GC.

Built only on the ArtifactStore API.
"""

from __future__ import annotations

import bisect
import math
import os
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import zstandard

from clawstore import mediatypes as mt
from clawstore.digest import Digest
from clawstore.errors import (
    ClawstoreError,
    DigestMismatchError,
    InvalidManifestError,
    LeaseConflictError,
    NotFoundError,
    RefNotFoundError,
    TagConflictError,
)
from clawstore.manifest import EMPTY_CONFIG, Descriptor, ImageManifest, parse_manifest
from clawstore.names import Reference
from clawstore.store import ArtifactStore
from clawstore.types import MISSING

DEFAULT_SEGMENT_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_AGE: Final = 2.0
DEFAULT_LEASE_TTL: Final = 30.0
DEFAULT_COMPACT_AFTER: Final = 32
#: A segment longer than this is refused by readers (crafted manifests cannot make them allocate
#: more).
MAX_SEGMENT_BYTES: Final = 256 * 1024 * 1024
#: Marks closer together than this (seconds) are merged: lines keep the earlier timestamp.
MARK_RESOLUTION: Final = 0.001

A_STATE: Final = "io.elasticclaw.log.state"
A_WRITER: Final = "io.elasticclaw.log.writer"
A_LEASE: Final = "io.elasticclaw.log.lease_expires"
A_CREATED: Final = "org.opencontainers.image.created"
A_OFFSET: Final = "io.elasticclaw.log.offset"
A_LENGTH: Final = "io.elasticclaw.log.length"
A_LINES: Final = "io.elasticclaw.log.lines"
A_FIRST: Final = "io.elasticclaw.log.first_ts"
A_LAST: Final = "io.elasticclaw.log.last_ts"
A_CONTINUES: Final = "io.elasticclaw.log.continues"

_SKIPPABLE_MAGIC: Final = 0x184D2A5C
_MARKS_MAGIC: Final = b"CLOGMRK1"
_MARK = struct.Struct("<Qd")


# -- segments ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Segment:
    """One sealed segment as the manifest describes it."""

    index: int
    descriptor: Descriptor
    offset: int
    length: int
    lines: int
    first_ts: float
    last_ts: float
    continues: bool

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, since: float | None, until: float | None) -> bool:
        return (since is None or self.last_ts >= since) and (until is None or self.first_ts <= until)

    def annotations(self) -> dict[str, str]:
        return {
            A_OFFSET: str(self.offset),
            A_LENGTH: str(self.length),
            A_LINES: str(self.lines),
            A_FIRST: repr(self.first_ts),
            A_LAST: repr(self.last_ts),
            A_CONTINUES: "true" if self.continues else "false",
        }


def encode_segment(data: bytes, marks: list[tuple[int, float]], *, level: int = 3, threads: int = 0) -> bytes:
    """A segment blob: skippable frame of marks, then the zstd frame of `data`."""
    payload = _MARKS_MAGIC + struct.pack("<I", len(marks)) + b"".join(_MARK.pack(o, t) for o, t in marks)
    head = struct.pack("<II", _SKIPPABLE_MAGIC, len(payload)) + payload
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, threads=threads)
    return head + cctx.compress(data)


def decode_segment(blob: bytes, length: int, where: str = "segment") -> tuple[bytes, list[tuple[int, float]]]:
    """(data, marks) of a segment blob that must decode to exactly `length` bytes;
    InvalidManifestError for anything else (a blob whose digest matches but was crafted)."""
    if length < 0 or length > MAX_SEGMENT_BYTES:
        raise InvalidManifestError(f"{where}: length {length} out of range")
    if len(blob) < 8:
        raise InvalidManifestError(f"{where}: too short to be a log segment")
    magic, size = struct.unpack_from("<II", blob, 0)
    if magic != _SKIPPABLE_MAGIC or size > len(blob) - 8 or size < len(_MARKS_MAGIC) + 4:
        raise InvalidManifestError(f"{where}: no marks frame")
    payload = memoryview(blob)[8 : 8 + size]
    if bytes(payload[: len(_MARKS_MAGIC)]) != _MARKS_MAGIC:
        raise InvalidManifestError(f"{where}: bad marks frame")
    (count,) = struct.unpack_from("<I", payload, len(_MARKS_MAGIC))
    base = len(_MARKS_MAGIC) + 4
    if base + count * _MARK.size != size:
        raise InvalidManifestError(f"{where}: marks frame holds {size} bytes, not {count} marks")
    marks = [_MARK.unpack_from(payload, base + i * _MARK.size) for i in range(count)]
    prev = -1
    for off, ts in marks:
        if off <= prev or off >= max(length, 1) or not math.isfinite(ts):
            raise InvalidManifestError(f"{where}: marks out of order or out of range")
        prev = off
    if length and (not marks or marks[0][0] != 0):
        raise InvalidManifestError(f"{where}: first mark must be at offset 0")
    frame = bytes(memoryview(blob)[8 + size :])
    try:
        declared = zstandard.frame_content_size(frame)
        if declared != length:
            raise InvalidManifestError(f"{where}: frame holds {declared} bytes, manifest says {length}")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        data = dobj.decompress(frame)
        if not dobj.eof or dobj.unused_data or len(data) != length:
            raise InvalidManifestError(f"{where}: zstd frame is truncated or followed by extra data")
    except zstandard.ZstdError as e:
        raise InvalidManifestError(f"{where}: not a zstd frame: {e}") from None
    return data, [(int(o), float(t)) for o, t in marks]


def _int(notes: Mapping[str, str], key: str, where: str) -> int:
    v = notes.get(key)
    if v is None or not v.isdigit():
        raise InvalidManifestError(f"{where}: annotation {key} must be a non-negative integer")
    return int(v)


def _float(notes: Mapping[str, str], key: str, where: str) -> float:
    try:
        x = float(notes[key])
    except (KeyError, ValueError):
        raise InvalidManifestError(f"{where}: annotation {key} must be a number") from None
    if not math.isfinite(x):
        raise InvalidManifestError(f"{where}: annotation {key} must be finite")
    return x


def _segment(i: int, d: Descriptor) -> Segment:
    where = f"segment {i}"
    if d.media_type != mt.LOG_SEGMENT:
        raise InvalidManifestError(f"{where}: media type {d.media_type!r} is not a log segment")
    notes = d.annotations or {}
    cont = notes.get(A_CONTINUES)
    if cont not in ("true", "false"):
        raise InvalidManifestError(f"{where}: annotation {A_CONTINUES} must be true or false")
    first, last = _float(notes, A_FIRST, where), _float(notes, A_LAST, where)
    if last < first:
        raise InvalidManifestError(f"{where}: last_ts before first_ts")
    length = _int(notes, A_LENGTH, where)
    if length == 0 or length > MAX_SEGMENT_BYTES:
        raise InvalidManifestError(f"{where}: length {length} out of range")
    return Segment(
        i, d, _int(notes, A_OFFSET, where), length, _int(notes, A_LINES, where), first, last, cont == "true"
    )


# -- manifests -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Log:
    """A log as one manifest describes it: a whole, consistent prefix of the stream."""

    digest: Digest
    manifest: ImageManifest
    segments: tuple[Segment, ...]
    state: str
    writer: str
    lease_expires: float
    ref: str | None = None

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def bytes(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @property
    def lines(self) -> int:
        return sum(s.lines for s in self.segments)

    @property
    def stored_size(self) -> int:
        return sum(s.descriptor.size for s in self.segments)

    @property
    def created(self) -> str | None:
        return (self.manifest.annotations or {}).get(A_CREATED)


def _parse_ref(ref: str) -> Reference:
    r = Reference.parse(ref)
    if r.tag is None:
        raise ClawstoreError(f"a log is written through a tag, not a digest: {ref}")
    return r


def load(store: ArtifactStore, ref: str | Digest) -> Log:
    """The log at `repo:tag`, `repo@digest` or a manifest digest; InvalidManifestError if it is
    not a log or its segment list is inconsistent."""
    ref_text: str | None = None
    if isinstance(ref, Digest) or (
        isinstance(ref, str) and ref.startswith(("sha256:", "sha512:", "blake3:"))
    ):
        digest = Digest.parse(ref)
    else:
        r = Reference.parse(str(ref))
        digest = r.digest if r.digest is not None else store.resolve(r.repository, r.tag or "")
        ref_text = str(r)
    return _load_digest(store, digest, ref_text)


def _load_digest(store: ArtifactStore, digest: Digest, ref_text: str | None) -> Log:
    m = parse_manifest(store.get_manifest(digest))
    if not isinstance(m, ImageManifest) or m.artifact_type != mt.LOG:
        raise InvalidManifestError(f"{ref_text or digest} is not a log")
    notes = m.annotations or {}
    state = notes.get(A_STATE)
    if state not in ("open", "closed"):
        raise InvalidManifestError(f"log {digest}: state {state!r} is neither open nor closed")
    lease = _float(notes, A_LEASE, f"log {digest}")
    segments = tuple(_segment(i, d) for i, d in enumerate(m.layers))
    pos = 0
    for s in segments:
        if s.offset != pos:
            raise InvalidManifestError(f"segment {s.index}: offset {s.offset}, expected {pos}")
        pos = s.end
    return Log(digest, m, segments, state, notes.get(A_WRITER, ""), lease, ref_text)


def _read_segment(store: ArtifactStore, s: Segment) -> tuple[bytes, list[tuple[int, float]]]:
    where = f"segment {s.index} ({s.descriptor.digest})"
    try:
        blob = store.read_blob(s.descriptor.digest)
    except DigestMismatchError as e:
        raise DigestMismatchError(f"{where}: {e}") from None
    except NotFoundError as e:
        raise type(e)(f"{where}: {e}") from None
    if len(blob) != s.descriptor.size:
        raise DigestMismatchError(f"{where}: {len(blob)} bytes, descriptor says {s.descriptor.size}")
    data, marks = decode_segment(blob, s.length, where)
    lines = data.count(b"\n")
    if lines != s.lines:
        raise InvalidManifestError(f"{where}: holds {lines} lines, manifest says {s.lines}")
    if marks and (min(t for _o, t in marks) < s.first_ts or max(t for _o, t in marks) > s.last_ts):
        raise InvalidManifestError(f"{where}: marks fall outside first_ts..last_ts")
    return data, marks


# -- writer --------------------------------------------------------------------------------------
def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Pending:
    buf: bytearray = field(default_factory=bytearray)
    marks: list[tuple[int, float]] = field(default_factory=list)
    started: float = 0.0  # monotonic time of the first unsealed byte
    #: the sealed bytes and their encoded segment, compressed ahead of the sealer
    data: bytes = b""
    blob: Future[bytes] | None = None


class LogWriter:
    """The one writer of a log (see the module docstring). Thread-safe.

    Segments are compressed and stored by a sealer thread while appends go on (at most
    `MAX_QUEUED` full segments wait; appenders block beyond that), so the caller's thread only
    copies bytes; `flush()` and `close()` wait until everything appended before them is stored
    and the tag moved."""

    MAX_QUEUED: Final = 3

    def __init__(
        self,
        store: ArtifactStore,
        ref: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_age: float | None = DEFAULT_MAX_AGE,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        compact_after: int = DEFAULT_COMPACT_AFTER,
        level: int = 3,
        threads: int = 0,
        writer_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if segment_bytes < 1 or segment_bytes > MAX_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be in 1..{MAX_SEGMENT_BYTES}")
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive (or None)")
        self.store = store
        r = _parse_ref(ref)
        self.repo, self.tag = r.repository, r.tag or ""
        self.ref = str(r)
        self.segment_bytes = segment_bytes
        self.max_age = max_age
        self.lease_ttl = lease_ttl
        self.compact_after = max(2, compact_after)
        self.level = level
        self.threads = threads
        self.writer_id = writer_id or f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"
        self.clock = clock
        # _lock/_cond guard the buffer and the seal queue; _state guards what the manifest says.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._state = threading.RLock()
        self._pending = _Pending()
        self._queue: deque[_Pending] = deque()
        self._in_flight = 0
        self._segments: list[Segment] = []
        self._digest: Digest | None = None
        self._lease_expires = 0.0
        self._ends_line = True
        self._closed = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.compactions = 0
        self._acquire()
        # Two encoders: with segments queued, two compress at once (zstd releases the GIL).
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"log-zstd {self.ref}")
        self._sealer = threading.Thread(target=self._seal_loop, name=f"log-seal {self.ref}", daemon=True)
        self._sealer.start()
        self._ticker: threading.Thread | None = None
        if max_age is not None:
            self._ticker = threading.Thread(target=self._tick_loop, name=f"log-age {self.ref}", daemon=True)
            self._ticker.start()

    # -- lease -----------------------------------------------------------------------------------
    def _acquire(self) -> None:
        self.store.put_blob(mt.EMPTY_JSON, media_type=mt.OCI_EMPTY)
        try:
            cur: Digest | None = self.store.resolve(self.repo, self.tag)
        except RefNotFoundError:
            cur = None
        if cur is not None:
            log = _load_digest(self.store, cur, self.ref)
            now = self.clock()
            if log.state == "open" and log.writer != self.writer_id and log.lease_expires > now:
                raise LeaseConflictError(
                    f"log {self.ref} is held by writer {log.writer} "
                    f"(lease expires in {log.lease_expires - now:.1f}s)"
                )
            self._segments = list(log.segments)
            if log.segments:
                data, _ = _read_segment(self.store, log.segments[-1])
                self._ends_line = data.endswith(b"\n")
        self._digest = cur
        self._commit(self._segments, "open")

    def _commit(self, segments: list[Segment], state: str) -> None:
        """Store a manifest of `segments` and move the tag from the one this writer last wrote."""
        expires = self.clock() + self.lease_ttl
        notes = {A_STATE: state, A_WRITER: self.writer_id, A_LEASE: repr(expires), A_CREATED: _now_iso()}
        layers = tuple(
            Descriptor(s.descriptor.digest, s.descriptor.size, mt.LOG_SEGMENT, annotations=s.annotations())
            for s in segments
        )
        m = ImageManifest(config=EMPTY_CONFIG, layers=layers, artifact_type=mt.LOG, annotations=notes)
        stored = self.store.put_manifest(m.to_json(), mt.OCI_MANIFEST)
        try:
            self.store.tag(
                self.repo,
                self.tag,
                stored.digest,
                expect=self._digest if self._digest is not None else MISSING,
            )
        except TagConflictError:
            raise TagConflictError(
                f"log {self.ref} was taken over by another writer; "
                f"this writer ({self.writer_id}) is fenced off"
            ) from None
        self._digest = stored.digest
        self._segments = list(segments)
        self._lease_expires = expires

    # -- writing ---------------------------------------------------------------------------------
    def _check(self) -> None:
        """(With _lock held.) Raise a sealer error once, or refuse a closed writer."""
        if self._error is not None:
            err, self._error = self._error, None
            self._closed = True
            raise err
        if self._closed:
            raise ClawstoreError(f"log writer for {self.ref} is closed")

    def _enqueue(self) -> None:
        """(With _lock held.) Hand the buffer to the sealer, waiting while the queue is full."""
        p = self._pending
        if not p.buf:
            return
        while len(self._queue) >= self.MAX_QUEUED and self._error is None:
            self._cond.wait()
        self._check()
        # Compression starts now on its own thread (zstd releases the GIL), so segment N+1 is
        # compressed while the sealer stores segment N and its manifest.
        p.data = bytes(p.buf)
        p.buf = bytearray()
        p.blob = self._encoder.submit(encode_segment, p.data, p.marks, level=self.level, threads=self.threads)
        self._queue.append(p)
        self._pending = _Pending()
        self._cond.notify_all()

    def append(self, data: bytes | bytearray | memoryview | str) -> None:
        """Buffer `data` (str is UTF-8 encoded); a full `segment_bytes` buffer goes to the sealer."""
        raw = data.encode() if isinstance(data, str) else data
        with self._lock:
            if self._error is not None or self._closed:
                self._check()
            p = self._pending
            if p.buf and len(raw) < self.segment_bytes - len(p.buf):  # the common case
                ts = self.clock()
                last = p.marks[-1][1]
                if ts - last >= MARK_RESOLUTION or ts < last:
                    p.marks.append((len(p.buf), ts))
                p.buf += raw
                return
            view = memoryview(raw).cast("B")
            while len(view):
                p = self._pending
                ts = self.clock()
                if not p.buf:
                    p.started = time.monotonic()
                    p.marks.append((0, ts))
                elif ts - p.marks[-1][1] >= MARK_RESOLUTION or ts < p.marks[-1][1]:
                    p.marks.append((len(p.buf), ts))
                room = self.segment_bytes - len(p.buf)
                if len(view) < room:
                    p.buf += view
                    return
                p.buf += view[:room]
                view = view[room:]
                self._enqueue()

    def write(self, data: bytes | bytearray | memoryview | str) -> int:
        """File-like alias of `append`."""
        self.append(data)
        return len(data)

    def flush(self) -> None:
        """Seal what is buffered; when this returns, every byte appended so far is durable."""
        with self._lock:
            self._check()
            self._enqueue()
            while (self._queue or self._in_flight) and self._error is None:
                self._cond.wait()
            self._check()

    def close(self) -> None:
        """Seal the rest and mark the log closed (followers stop); the writer lets go of it."""
        with self._lock:
            if self._closed and self._error is None:
                return
        self.flush()
        self._shutdown()
        with self._state:
            self._commit(self._segments, "closed")
        with self._lock:
            self._closed = True

    def abandon(self) -> None:
        """Stop without sealing or closing (what a crash leaves: the lease lapses on its own).
        Segments already handed to the sealer may or may not be stored."""
        with self._lock:
            self._closed = True
            self._queue.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            self._cond.notify_all()
        for t in (self._sealer, self._ticker):
            if t is not None and t is not threading.current_thread():
                t.join()
        self._encoder.shutdown(wait=True)

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    @property
    def digest(self) -> Digest | None:
        """The manifest this writer last committed."""
        return self._digest

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    # -- sealer ----------------------------------------------------------------------------------
    def _seal_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if not self._queue:
                    return
                p = self._queue.popleft()
                self._in_flight += 1
                self._cond.notify_all()
            try:
                with self._state:
                    self._seal(p)
            except BaseException as e:  # surfaced by the next append/flush/close
                with self._lock:
                    self._error = e
                    self._queue.clear()
                    self._in_flight -= 1
                    self._cond.notify_all()
                return
            with self._lock:
                self._in_flight -= 1
                self._cond.notify_all()

    def _seal(self, p: _Pending) -> None:
        data = p.data
        offset = self._segments[-1].end if self._segments else 0
        assert p.blob is not None
        blob = p.blob.result()
        d = self.store.put_blob(blob, media_type=mt.LOG_SEGMENT)
        ts = [t for _o, t in p.marks]
        seg = Segment(
            len(self._segments),
            Descriptor(d.digest, d.size, mt.LOG_SEGMENT),
            offset,
            len(data),
            data.count(b"\n"),
            min(ts),
            max(ts),
            not self._ends_line,
        )
        segments = self._compacted([*self._segments, seg])
        self._commit(segments, "open")
        self._ends_line = data.endswith(b"\n")

    def _tick_loop(self) -> None:
        """Seal by age, and renew the lease while idle."""
        assert self.max_age is not None
        tick = min(self.max_age / 4, 0.25)
        while not self._stop.wait(tick):
            with self._lock:
                if self._closed or self._error is not None:
                    return
                p = self._pending
                if p.buf and time.monotonic() - p.started >= self.max_age:
                    self._enqueue()
                    continue
                idle = not self._queue and not self._in_flight
            if idle and self._lease_expires - self.clock() < self.lease_ttl / 2:
                try:
                    with self._state:
                        self._commit(self._segments, "open")  # heartbeat
                except BaseException as e:
                    with self._lock:
                        self._error = e
                        self._cond.notify_all()
                    return

    def _compacted(self, segments: list[Segment]) -> list[Segment]:
        """Merge runs of small segments once more than `compact_after` of them accumulate."""
        small = self.segment_bytes // 2
        if sum(1 for s in segments if s.length < small) <= self.compact_after:
            return segments
        out: list[Segment] = []
        run: list[Segment] = []

        def close_run() -> None:
            if len(run) > 1:
                out.append(self._merge(run, len(out)))
            elif run:
                out.append(_reindexed(run[0], len(out)))
            run.clear()

        for s in segments:
            if s.length < small and sum(r.length for r in run) + s.length <= self.segment_bytes:
                run.append(s)
                continue
            close_run()
            if s.length < small:
                run.append(s)
            else:
                out.append(_reindexed(s, len(out)))
        close_run()
        self.compactions += 1
        return out

    def _merge(self, run: list[Segment], index: int) -> Segment:
        parts: list[bytes] = []
        marks: list[tuple[int, float]] = []
        pos = 0
        for s in run:
            data, ms = _read_segment(self.store, s)
            marks += [(pos + o, t) for o, t in ms]
            parts.append(data)
            pos += len(data)
        data = b"".join(parts)
        d = self.store.put_blob(encode_segment(data, marks, level=self.level), media_type=mt.LOG_SEGMENT)
        return Segment(
            index,
            Descriptor(d.digest, d.size, mt.LOG_SEGMENT),
            run[0].offset,
            len(data),
            sum(s.lines for s in run),
            min(s.first_ts for s in run),
            max(s.last_ts for s in run),
            run[0].continues,
        )


def _reindexed(s: Segment, index: int) -> Segment:
    if s.index == index:
        return s
    return Segment(index, s.descriptor, s.offset, s.length, s.lines, s.first_ts, s.last_ts, s.continues)


# -- readers -------------------------------------------------------------------------------------
def read(
    store: ArtifactStore,
    ref: str | Digest,
    *,
    since: float | None = None,
    until: float | None = None,
    tail: int | None = None,
    stats: dict[str, int] | None = None,
) -> Iterator[bytes]:
    """The log's bytes in order, as chunks. With `since`/`until` (epoch seconds), only lines
    whose first byte was appended in that window, reading only the segments that overlap it.
    With `tail`, only the last `tail` lines (of the window). `stats` (if given) counts
    `segments_read` and `bytes_read` (stored bytes fetched)."""
    if tail is not None and tail < 0:
        raise ValueError("tail must be >= 0")
    log = load(store, ref)
    counters = stats if stats is not None else {}
    counters.setdefault("segments_read", 0)
    counters.setdefault("bytes_read", 0)

    def fetch(s: Segment) -> tuple[bytes, list[tuple[int, float]]]:
        counters["segments_read"] += 1
        counters["bytes_read"] += s.descriptor.size
        return _read_segment(store, s)

    if since is None and until is None:
        if tail is None:
            for s in log.segments:
                yield fetch(s)[0]
            return
        if tail == 0:
            return
        # Read back from the end until the segments hold `tail` whole lines: at least `tail`
        # newlines, starting at a line start (or one more newline than that).
        need: list[Segment] = []
        count = 0
        for s in reversed(log.segments):
            need.append(s)
            count += s.lines
            if count > tail or (count >= tail and not s.continues):
                break
        data = b"".join(fetch(s)[0] for s in reversed(need))
        yield b"".join(data.splitlines(keepends=True)[-tail:])
        return
    chunks = _filtered(log, since, until, fetch)
    if tail is None:
        yield from chunks
        return
    if tail == 0:
        return
    last: deque[bytes] = deque(maxlen=tail + 1)
    pending = b""
    for chunk in chunks:
        pieces = (pending + chunk).splitlines(keepends=True)
        pending = pieces.pop() if pieces and not pieces[-1].endswith(b"\n") else b""
        last.extend(pieces)
    if pending:
        last.append(pending)
    yield b"".join(list(last)[-tail:])


def _filtered(
    log: Log,
    since: float | None,
    until: float | None,
    fetch: Callable[[Segment], tuple[bytes, list[tuple[int, float]]]],
) -> Iterator[bytes]:
    lo = -math.inf if since is None else since
    hi = math.inf if until is None else until
    included = False  # whether the line still open at the end of the last segment read is in
    prev_end = -1
    for s in log.segments:
        if not s.overlaps(since, until):
            continue
        if s.offset != prev_end:
            # The segment before was skipped: a line it began lies outside the window.
            included = False
        data, marks = fetch(s)
        prev_end = s.end
        offs = [o for o, _t in marks]
        out: list[bytes] = []
        pos = 0
        if s.continues:
            nl = data.find(b"\n")
            end = len(data) if nl < 0 else nl + 1
            if included:
                out.append(data[:end])
            pos = end
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            ts = marks[bisect.bisect_right(offs, pos) - 1][1]
            included = lo <= ts <= hi
            if included:
                out.append(data[pos:end])
            pos = end
        if data.endswith(b"\n"):
            included = False
        if out:
            yield b"".join(out)


def follow(
    store: ArtifactStore,
    ref: str,
    *,
    poll: float = 0.2,
    offset: int = 0,
    stop: threading.Event | None = None,
) -> Iterator[bytes]:
    """New bytes of the log as segments are sealed, from byte `offset`; ends when the log is
    closed and everything has been yielded (or when `stop` is set)."""
    r = _parse_ref(ref)
    pos = offset
    seen: Digest | None = None
    while True:
        digest = store.resolve(r.repository, r.tag or "")
        if digest != seen:
            seen = digest
            log = _load_digest(store, digest, str(r))
            for s in log.segments:
                if s.end <= pos:
                    continue
                data, _ = _read_segment(store, s)
                yield data[max(0, pos - s.offset) :]
                pos = s.end
            if log.closed and pos >= log.bytes:
                return
        if stop is not None and stop.is_set():
            return
        if stop is not None:
            stop.wait(poll)
        else:
            time.sleep(poll)


@dataclass
class VerifyReport:
    digest: Digest
    segments: int
    bytes: int
    lines: int
    #: (segment position, message) for each segment that failed
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: ArtifactStore, ref: str | Digest) -> VerifyReport:
    """Re-read every segment of the log and check it against the manifest (digest, size, length,
    lines, marks); a bad segment is reported by position, the others are still checked."""
    log = load(store, ref)
    report = VerifyReport(log.digest, len(log.segments), log.bytes, log.lines)
    for s in log.segments:
        try:
            _read_segment(store, s)
        except ClawstoreError as e:
            report.problems.append((s.index, str(e)))
    return report


def ls(store: ArtifactStore, repo: str | None = None) -> list[Log]:
    """Every tagged log (in `repo`, or everywhere), by reference."""
    out: list[Log] = []
    for rp in [repo] if repo is not None else store.list_repos():
        for tag in store.list_tags(rp):
            try:
                out.append(load(store, f"{rp}:{tag}"))
            except (InvalidManifestError, NotFoundError):
                continue
    return out


__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_SEGMENT_BYTES",
    "Log",
    "LogWriter",
    "Segment",
    "VerifyReport",
    "decode_segment",
    "encode_segment",
    "follow",
    "load",
    "ls",
    "read",
    "verify",
]
