"""Logs: segments sealed by size/age/flush, one writer, verified prefixes, time ranges, follow,
verify, compaction, crafted segments, crashes (hypothesis and kill -9).

Oracles: the `zstandard` package decodes each stored segment blob independently (the marks sit
in a zstd skippable frame, so a plain zstd decoder yields the raw bytes), hashlib for digests.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import clawstore
import pytest
import zstandard
from clawstore import logs
from clawstore import mediatypes as mt
from clawstore.errors import (
    ClawstoreError,
    DigestMismatchError,
    InvalidManifestError,
    InvalidNameError,
    LeaseConflictError,
    RefNotFoundError,
    TagConflictError,
)
from clawstore.manifest import EMPTY_CONFIG, Descriptor, ImageManifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REF = "logs/session-42:stdout"


class Clock:
    """A settable clock for writers (lease expiry, timestamps) that tests move by hand."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def read_all(store: clawstore.ArtifactStore, ref: str = REF, **kw: object) -> bytes:
    return b"".join(logs.read(store, ref, **kw))  # type: ignore[arg-type]


def oracle_bytes(store: clawstore.ArtifactStore, ref: str = REF) -> bytes:
    """The log's bytes decoded without clawstore's reader: every layer blob through zstandard."""
    m = clawstore.parse_manifest(store.get_manifest(store.resolve(*ref.split(":"))))
    assert isinstance(m, ImageManifest)
    out = []
    for d in m.layers:
        blob = store.read_blob(d.digest)
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == str(d.digest)
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
        out.append(reader.read())
    return b"".join(out)


def test_roundtrip_and_layout(store: clawstore.ArtifactStore) -> None:
    lines = [f"line {i} {'x' * (i % 50)}\n".encode() for i in range(2000)]
    with logs.LogWriter(store, REF, segment_bytes=8192, max_age=None) as w:
        for i, line in enumerate(lines):
            w.append(line)
            if i % 333 == 0:
                w.flush()
    data = b"".join(lines)
    assert read_all(store) == data
    assert oracle_bytes(store) == data
    log = logs.load(store, REF)
    assert log.closed and log.bytes == len(data) and log.lines == 2000
    assert len(log.segments) > 2
    assert all(s.length <= 8192 for s in log.segments)
    assert log.manifest.artifact_type == mt.LOG
    assert all(d.media_type == mt.LOG_SEGMENT for d in log.manifest.layers)
    pos = 0
    for s in log.segments:  # offsets are contiguous; annotations match the bytes
        assert s.offset == pos
        assert data[pos : pos + s.length].count(b"\n") == s.lines
        assert s.continues == (pos > 0 and data[pos - 1 : pos] != b"\n")
        pos += s.length
    r = logs.verify(store, REF)
    assert r.ok and r.segments == len(log.segments)


def test_str_and_partial_lines(local_store: clawstore.ArtifactStore) -> None:
    with logs.LogWriter(local_store, REF, segment_bytes=5, max_age=None) as w:
        w.append("héllo wor")
        w.flush()
        w.append(b"ld\nno newline at the end")
    assert read_all(local_store) == "héllo world\nno newline at the end".encode()
    assert read_all(local_store, tail=1) == b"no newline at the end"
    assert read_all(local_store, tail=2) == "héllo world\nno newline at the end".encode()


def test_age_seals_in_the_background(local_store: clawstore.ArtifactStore) -> None:
    w = logs.LogWriter(local_store, REF, max_age=0.05)
    first = w.digest
    w.append(b"sealed by age\n")
    deadline = time.monotonic() + 30
    while local_store.resolve("logs/session-42", "stdout") == first:
        assert time.monotonic() < deadline, "no age seal within 30 s"
        time.sleep(0.02)
    assert read_all(local_store) == b"sealed by age\n"
    w.close()


def test_second_writer_refused_until_lease_expires_then_first_is_fenced(
    local_store: clawstore.ArtifactStore,
) -> None:
    clock = Clock()
    a = logs.LogWriter(local_store, REF, max_age=None, lease_ttl=30, clock=clock)
    a.append(b"from a\n")
    a.flush()
    with pytest.raises(LeaseConflictError, match="held by writer"):
        logs.LogWriter(local_store, REF, max_age=None, lease_ttl=30, clock=clock)
    clock.t += 31  # a's lease lapsed (it stopped heartbeating)
    b = logs.LogWriter(local_store, REF, max_age=None, lease_ttl=30, clock=clock)
    a.append(b"late a\n")
    with pytest.raises(TagConflictError, match="taken over"):
        a.flush()
    b.append(b"from b\n")
    b.close()
    assert read_all(local_store) == b"from a\nfrom b\n"


def test_concurrent_openers_one_wins(local_store: clawstore.ArtifactStore) -> None:
    results: list[str] = []
    barrier = threading.Barrier(4)

    def open_one() -> None:
        barrier.wait()
        try:
            w = logs.LogWriter(local_store, "logs/race:out", max_age=None)
            results.append("won")
            w.abandon()
        except (LeaseConflictError, TagConflictError):
            results.append("refused")

    ts = [threading.Thread(target=open_one) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(results) == ["refused"] * 3 + ["won"]


def test_closed_log_reopens_for_append(local_store: clawstore.ArtifactStore) -> None:
    with logs.LogWriter(local_store, REF, max_age=None) as w:
        w.append(b"one\n")
    with logs.LogWriter(local_store, REF, max_age=None) as w:
        w.append(b"two\n")
    assert read_all(local_store) == b"one\ntwo\n"
    assert logs.load(local_store, REF).closed


def _timed_log(store: clawstore.ArtifactStore, clock: Clock, n: int = 100) -> list[bytes]:
    """Line i written at clock t0 + i; a segment sealed every 10 lines."""
    t0 = clock.t
    lines = []
    with logs.LogWriter(store, REF, max_age=None, clock=clock) as w:
        for i in range(n):
            clock.t = t0 + i
            line = f"t={i}\n".encode()
            lines.append(line)
            w.append(line)
            if i % 10 == 9:
                w.flush()
    return lines


def test_time_range_reads_only_overlapping_segments(store: clawstore.ArtifactStore) -> None:
    clock = Clock()
    t0 = clock.t
    lines = _timed_log(store, clock)
    stats: dict[str, int] = {}
    got = read_all(store, since=t0 + 42, until=t0 + 47, stats=stats)
    assert got == b"".join(lines[42:48])
    assert stats["segments_read"] == 1
    assert read_all(store, since=t0 + 95) == b"".join(lines[95:])
    assert read_all(store, until=t0 + 3) == b"".join(lines[:4])
    assert read_all(store, since=t0 + 1000) == b""
    assert read_all(store, since=t0 + 30, until=t0 + 59, tail=2) == b"".join(lines[58:60])
    stats = {}
    assert read_all(store, tail=3, stats=stats) == b"".join(lines[97:])
    assert stats["segments_read"] == 1


def test_time_range_with_lines_spanning_segments(local_store: clawstore.ArtifactStore) -> None:
    clock = Clock()
    t0 = clock.t
    with logs.LogWriter(local_store, REF, max_age=None, clock=clock, segment_bytes=4) as w:
        for i in range(10):
            clock.t = t0 + i
            w.append(f"line-{i}\n".encode())  # 7 bytes: every line spans two segments
    for a in range(10):
        for b in range(a, 10):
            want = b"".join(f"line-{i}\n".encode() for i in range(a, b + 1))
            assert read_all(local_store, since=t0 + a, until=t0 + b) == want, (a, b)


def test_follow_sees_every_segment(local_store: clawstore.ArtifactStore) -> None:
    w = logs.LogWriter(local_store, REF, max_age=None)
    got: list[bytes] = []
    ready = threading.Event()

    def reader() -> None:
        ready.set()
        got.extend(logs.follow(local_store, REF, poll=0.01))

    t = threading.Thread(target=reader)
    t.start()
    ready.wait()
    sent = []
    for i in range(60):
        chunk = f"chunk {i}\n".encode() * (i % 5 + 1)
        sent.append(chunk)
        w.append(chunk)
        w.flush()
        if i % 7 == 0:
            time.sleep(0.01)
    w.close()
    t.join(60)
    assert not t.is_alive()
    assert b"".join(got) == b"".join(sent)


def test_follow_survives_compaction(local_store: clawstore.ArtifactStore) -> None:
    w = logs.LogWriter(local_store, REF, max_age=None, segment_bytes=1 << 16, compact_after=3)
    stop = threading.Event()
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.extend(logs.follow(local_store, REF, poll=0.005, stop=stop)))
    t.start()
    sent = b""
    for i in range(40):
        chunk = f"{i}\n".encode()
        sent += chunk
        w.append(chunk)
        w.flush()
    w.close()
    t.join(60)
    assert w.compactions > 0
    assert b"".join(got) == sent


def test_compaction_bounds_segments_and_keeps_bytes(store: clawstore.ArtifactStore) -> None:
    with logs.LogWriter(store, REF, max_age=None, segment_bytes=1 << 12, compact_after=8) as w:
        sent = b""
        for i in range(100):
            chunk = f"entry {i}\n".encode()
            sent += chunk
            w.append(chunk)
            w.flush()  # 300 tiny seals
    log = logs.load(store, REF)
    small = [s for s in log.segments if s.length < (1 << 11)]
    assert len(small) <= 8
    assert len(log.segments) < 20
    assert read_all(store) == sent == oracle_bytes(store)
    assert logs.verify(store, REF).ok


def _tamper(store: clawstore.ArtifactStore, digest: clawstore.Digest) -> None:
    path = store.blob_local_path(digest)
    assert path is not None
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_verify_reports_tampered_segment_by_position(local_store: clawstore.ArtifactStore) -> None:
    with logs.LogWriter(local_store, REF, max_age=None) as w:
        for i in range(5):
            w.append(f"segment {i}\n".encode())
            w.flush()
    log = logs.load(local_store, REF)
    _tamper(local_store, log.segments[3].descriptor.digest)
    r = logs.verify(local_store, REF)
    assert [pos for pos, _ in r.problems] == [3]
    assert "segment 3" in r.problems[0][1]
    with pytest.raises(DigestMismatchError, match="segment 3"):
        read_all(local_store)
    # a time window that avoids the bad segment still reads
    assert read_all(local_store, tail=1) == b"segment 4\n"


def _crafted(
    store: clawstore.ArtifactStore, blob: bytes, notes: dict[str, str], ref: str = "logs/bad:x"
) -> None:
    store.put_blob(mt.EMPTY_JSON)
    d = store.put_blob(blob, media_type=mt.LOG_SEGMENT)
    layer = Descriptor(d.digest, d.size, mt.LOG_SEGMENT, annotations=notes)
    m = ImageManifest(
        EMPTY_CONFIG,
        (layer,),
        artifact_type=mt.LOG,
        annotations={logs.A_STATE: "closed", logs.A_WRITER: "w", logs.A_LEASE: "0"},
    )
    md = store.put_manifest(m.to_json())
    repo, tag = ref.split(":")
    store.tag(repo, tag, md.digest)


GOOD = {
    logs.A_OFFSET: "0",
    logs.A_LENGTH: "6",
    logs.A_LINES: "1",
    logs.A_FIRST: "1.0",
    logs.A_LAST: "1.0",
    logs.A_CONTINUES: "false",
}


@pytest.mark.parametrize(
    ("blob", "notes", "error"),
    [
        (b"not zstd at all", GOOD, "marks frame"),
        (logs.encode_segment(b"hello\n", [(0, 1.0)])[:-3], GOOD, "zstd"),
        (logs.encode_segment(b"hello\n", [(0, 1.0)]) + b"junk", GOOD, "extra data|zstd"),
        (logs.encode_segment(b"hello!", [(0, 1.0)]), GOOD, "lines"),
        (logs.encode_segment(b"hello\n", [(0, 1.0)]), {**GOOD, logs.A_LENGTH: "7"}, "holds 6 bytes"),
        (logs.encode_segment(b"hello\n", [(0, 1.0), (0, 2.0)]), GOOD, "marks out of order"),
        (logs.encode_segment(b"hello\n", [(0, 5.0)]), GOOD, "outside first_ts"),
        (logs.encode_segment(b"hello\n", [(3, 1.0)]), GOOD, "first mark"),
    ],
)
def test_crafted_segments_are_typed_errors(
    local_store: clawstore.ArtifactStore, blob: bytes, notes: dict[str, str], error: str
) -> None:
    _crafted(local_store, blob, notes)
    with pytest.raises(InvalidManifestError, match=error):
        read_all(local_store, "logs/bad:x")
    r = logs.verify(local_store, "logs/bad:x")
    assert [p for p, _ in r.problems] == [0]


@pytest.mark.parametrize(
    "notes",
    [
        {**GOOD, logs.A_OFFSET: "5"},
        {**GOOD, logs.A_LENGTH: "-1"},
        {**GOOD, logs.A_LENGTH: "0"},
        {**GOOD, logs.A_FIRST: "nan"},
        {**GOOD, logs.A_LAST: "0.5"},
        {**GOOD, logs.A_CONTINUES: "maybe"},
        {k: v for k, v in GOOD.items() if k != logs.A_LINES},
    ],
)
def test_crafted_manifests_are_typed_errors(
    local_store: clawstore.ArtifactStore, notes: dict[str, str]
) -> None:
    _crafted(local_store, logs.encode_segment(b"hello\n", [(0, 1.0)]), notes)
    with pytest.raises(InvalidManifestError):
        logs.load(local_store, "logs/bad:x")


def test_bad_refs(local_store: clawstore.ArtifactStore) -> None:
    with pytest.raises(InvalidNameError):
        logs.LogWriter(local_store, "Logs/UPPER:x")
    with pytest.raises(InvalidNameError):
        logs.LogWriter(local_store, "logs/no-tag")
    with pytest.raises(ClawstoreError, match="through a tag"):
        logs.LogWriter(local_store, "logs/x@sha256:" + "0" * 64)
    with pytest.raises(RefNotFoundError):
        logs.load(local_store, "logs/missing:x")
    local_store.put_blob(mt.EMPTY_JSON)
    m = ImageManifest(EMPTY_CONFIG, (), artifact_type="application/vnd.example+json")
    local_store.tag("logs/other", "x", local_store.put_manifest(m.to_json()).digest)
    with pytest.raises(InvalidManifestError, match="not a log"):
        logs.load(local_store, "logs/other:x")
    with pytest.raises(InvalidManifestError, match="not a log"):
        logs.LogWriter(local_store, "logs/other:x")
    with pytest.raises(ValueError):
        logs.LogWriter(local_store, REF, segment_bytes=0)


# -- crashes -------------------------------------------------------------------------------------
ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("flush"), st.just(b"")),
        st.tuples(st.just("crash"), st.just(b"")),
        st.tuples(st.just("close"), st.just(b"")),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, segment_bytes=st.integers(1, 64), compact_after=st.integers(2, 6))
def test_property_flushed_bytes_survive_crashes(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, bytes]],
    segment_bytes: int,
    compact_after: int,
) -> None:
    """Random appends, flushes, closes and crashes (the writer vanishes, its lease lapses): what
    is read back is always a prefix of what was appended (in order, nothing duplicated) that
    holds every flushed byte; after a crash at most the unflushed tail is gone."""
    store = clawstore.open(tmp_path_factory.mktemp("logprop") / "store")
    clock = Clock()

    def open_writer() -> logs.LogWriter:
        return logs.LogWriter(
            store, REF, max_age=None, clock=clock, segment_bytes=segment_bytes, compact_after=compact_after
        )

    def check(got: bytes, base: bytes, appended: bytes, flushed: int) -> None:
        assert got.startswith(base + appended[:flushed])
        assert (base + appended).startswith(got)

    w = open_writer()
    base = b""  # the log before this writer
    appended = b""  # appended by this writer
    flushed = 0  # of which known durable
    for op, data in ops:
        if op == "append":
            w.append(data)
            appended += data
            check(read_all(store), base, appended, flushed)
        elif op == "flush":
            w.flush()
            flushed = len(appended)
            assert read_all(store) == base + appended
        elif op == "close":
            w.close()
            assert read_all(store) == base + appended
            base, appended, flushed = base + appended, b"", 0
            w = open_writer()
        else:
            w.abandon()
            got = read_all(store)
            check(got, base, appended, flushed)
            base, appended, flushed = got, b"", 0
            clock.t += logs.DEFAULT_LEASE_TTL + 1
            w = open_writer()
    w.close()
    assert read_all(store) == base + appended == oracle_bytes(store)
    assert logs.verify(store, REF).ok


CHILD = r"""
import sys, time, clawstore
from clawstore import logs
store = clawstore.open(sys.argv[1])
while True:  # the previous writer was killed: wait for its lease to lapse
    try:
        w = logs.LogWriter(store, "logs/crash:out", max_age=None, lease_ttl=0.5, segment_bytes=4096)
        break
    except clawstore.LeaseConflictError:
        time.sleep(0.05)
n = logs.load(store, "logs/crash:out").lines  # continue the numbering where the log stops
while True:
    for _ in range(7):
        w.append(b"record %08d\n" % n)
        n += 1
    w.flush()
    print(n, flush=True)
"""


def _expected(n: int) -> bytes:
    return b"".join(b"record %08d\n" % i for i in range(n))


@pytest.mark.slow
def test_kill9_flushed_bytes_survive_and_log_reopens(tmp_path: Path) -> None:
    """A writer SIGKILLed right after flush() returned: every flushed byte is in the log, in
    order, nothing duplicated; the next writer reopens the log once the dead one's lease lapses
    and continues it. Three kills in a row."""
    root = tmp_path / "store"
    clawstore.open(root).close()
    for k in range(3):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        flushed = 0
        for line in p.stdout:
            flushed = int(line)
            if flushed >= 50 + 97 * (k + 1):
                break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        with clawstore.open(root) as store:
            got = read_all(store, "logs/crash:out")
            n = got.count(b"\n")
            assert n >= flushed
            assert got == _expected(n)
            assert logs.verify(store, "logs/crash:out").ok
            assert not logs.load(store, "logs/crash:out").closed
