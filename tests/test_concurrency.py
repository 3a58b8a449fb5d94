"""Concurrency across processes: simultaneous writers of the same blobs, and CAS tag races.

Processes (not threads): the local backend's guarantees (link-based create-if-absent, flock'd
compare-and-swap) must hold between independent writers, as they do between hub nodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore import MISSING, ImageManifest, RefNotFoundError, TagConflictError
from clawstore import mediatypes as mt
from clawstore.manifest import EMPTY_CONFIG

pytestmark = pytest.mark.slow

N = 8
CTX = mp.get_context("fork")


def run_workers(target: Callable[..., Any], *args: Any, n: int = N, timeout: float = 120) -> list[Any]:
    """Run `target(i, *args)` in n processes; return their results, re-raising any failure."""
    q = CTX.Queue()

    def wrap(i: int) -> None:
        try:
            q.put((i, "ok", target(i, *args)))
        except BaseException:
            q.put((i, "error", traceback.format_exc()))

    procs = [CTX.Process(target=wrap, args=(i,)) for i in range(n)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            i, status, value = q.get(timeout=timeout)
            if status != "ok":
                pytest.fail(f"worker {i} failed:\n{value}")
            results[i] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return [results[i] for i in range(n)]


def blob_data(k: int) -> bytes:
    size = [0, 1, 70_000, 1 << 20, 3_000_000 + k, 7_500_000][k % 6]
    return hashlib.shake_256(f"blob {k}".encode()).digest(size) if size else b""


def test_same_blobs_from_many_processes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    clawstore.open(root).close()
    blobs = [blob_data(k) for k in range(6)]
    want = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    barrier = CTX.Barrier(N)

    def worker(i: int) -> list[str]:
        store = clawstore.open(root)
        rng = random.Random(i)
        order = list(range(len(blobs)))
        rng.shuffle(order)
        src_path = tmp_path / f"src-{i}"
        got: dict[int, str] = {}
        barrier.wait()
        for k in order:
            how = (i + k) % 3
            if how == 0:
                d = store.put_blob(blobs[k])
            elif how == 1:
                src_path.write_bytes(blobs[k])
                d = store.put_blob(src_path)
            else:
                d = store.put_blob(io.BufferedReader(io.BytesIO(blobs[k])))
            got[k] = d.digest
            # a reader racing other writers sees the whole verified blob or none
            for j in range(len(blobs)):
                try:
                    data = store.read_blob(want[j])
                except clawstore.BlobNotFoundError:
                    continue
                assert data == blobs[j]
        return [got[k] for k in range(len(blobs))]

    results = run_workers(worker)
    assert all(r == want for r in results)
    store = clawstore.open(root)
    assert sorted(store.iter_blobs()) == sorted(want)
    layout = store.backend.layout  # type: ignore[attr-defined]
    for d in want:
        path = layout.blob(clawstore.Digest(d))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == d.split(":")[1]
        assert path.stat().st_nlink == 1  # no temp name left linked to it
    assert list(layout.tmp.iterdir()) == []


def _manifest(store: clawstore.ArtifactStore, prev: str | None, **notes: str) -> str:
    m = ImageManifest(
        EMPTY_CONFIG,
        (),
        artifact_type=mt.CHECKPOINT,
        annotations={"prev": prev or "", **notes},
    )
    return store.put_manifest(m.to_json()).digest


def test_cas_rounds_exactly_one_winner(tmp_path: Path) -> None:
    """Each round every process reads the tag, then all swap at once: one wins, seven conflict."""
    root = tmp_path / "store"
    with clawstore.open(root) as s:
        s.put_blob(mt.EMPTY_JSON)
        genesis = _manifest(s, None, round="genesis")
        s.tag("race/counter", "head", genesis, expect=MISSING)
    rounds = 25
    barrier = CTX.Barrier(N)

    def worker(i: int) -> list[tuple[int, str, str | None]]:
        store = clawstore.open(root)
        out: list[tuple[int, str, str | None]] = []
        for r in range(rounds):
            barrier.wait()
            cur = store.resolve("race/counter", "head")
            new = _manifest(store, cur, round=str(r), worker=str(i))
            barrier.wait()  # everyone has read the same head
            try:
                store.tag("race/counter", "head", new, expect=cur)
                out.append((r, "won", new))
            except TagConflictError:
                out.append((r, "lost", None))
        return out

    results = run_workers(worker)
    winners: dict[int, str] = {}
    for per_worker in results:
        assert len(per_worker) == rounds
        for r, outcome, new in per_worker:
            if outcome == "won":
                assert r not in winners, f"two winners in round {r}"
                assert new is not None
                winners[r] = new
    assert sorted(winners) == list(range(rounds)), "a round without a winner"
    losses = sum(o == "lost" for w in results for _, o, _ in w)
    assert losses == rounds * (N - 1)
    # the chain from head back to genesis is exactly the winners, in order: no lost update
    with clawstore.open(root) as s:
        d = s.resolve("race/counter", "head")
        chain = []
        while d != genesis:
            chain.append(d)
            d = json.loads(s.get_manifest(d))["annotations"]["prev"]
        assert chain[::-1] == [winners[r] for r in range(rounds)]


def test_cas_counter_no_lost_update(tmp_path: Path) -> None:
    """Free-running read-modify-write with retries: the counter ends at exactly N * K."""
    root = tmp_path / "store"
    with clawstore.open(root) as s:
        s.put_blob(mt.EMPTY_JSON)
        s.tag("race/free", "head", _manifest(s, None, count="0"), expect=MISSING)
    k = 10

    def worker(i: int) -> tuple[int, int]:
        store = clawstore.open(root)
        done = conflicts = 0
        while done < k:
            cur = store.resolve("race/free", "head")
            count = int(json.loads(store.get_manifest(cur))["annotations"]["count"])
            new = _manifest(store, cur, count=str(count + 1), worker=str(i))
            try:
                store.tag("race/free", "head", new, expect=cur)
                done += 1
            except TagConflictError:
                conflicts += 1
            assert conflicts < 10_000
        return done, conflicts

    results = run_workers(worker)
    assert sum(d for d, _ in results) == N * k
    with clawstore.open(root) as s:
        head = s.resolve("race/free", "head")
        assert json.loads(s.get_manifest(head))["annotations"]["count"] == str(N * k)
        # walk the chain: every increment is there, each exactly one more than its parent
        n = 0
        d = head
        while True:
            ann = json.loads(s.get_manifest(d))["annotations"]
            assert int(ann["count"]) == N * k - n
            if not ann["prev"]:
                break
            d, n = ann["prev"], n + 1
        assert n == N * k
        assert os.listdir(s.backend.layout.tmp) == []  # type: ignore[attr-defined]


def test_create_and_delete_races(tmp_path: Path) -> None:
    """expect=MISSING: one creator wins per tag; untag(expect=current): one deleter wins."""
    root = tmp_path / "store"
    with clawstore.open(root) as s:
        s.put_blob(mt.EMPTY_JSON)
        digests = [_manifest(s, None, worker=str(i)) for i in range(N)]
    tags = [f"t{j}" for j in range(10)]
    barrier = CTX.Barrier(N)

    def worker(i: int) -> tuple[list[str], list[str]]:
        store = clawstore.open(root)
        created, deleted = [], []
        for t in tags:
            barrier.wait()
            try:
                store.tag("race/create", t, digests[i], expect=MISSING)
                created.append(t)
            except TagConflictError:
                pass
        for t in tags:
            barrier.wait()
            cur = store.resolve("race/create", t)
            barrier.wait()
            try:
                store.untag("race/create", t, expect=cur)
                deleted.append(t)
            except (TagConflictError, RefNotFoundError):
                pass
        return created, deleted

    results = run_workers(worker)
    assert sorted(t for c, _ in results for t in c) == sorted(tags)
    assert sorted(t for _, d in results for t in d) == sorted(tags)
    with clawstore.open(root) as s:
        assert s.list_tags("race/create") == []
        assert s.list_repos() == []


def test_threads_share_one_store(tmp_path: Path) -> None:
    """One ArtifactStore used from many threads (as a hub server would): the same guarantees."""
    from concurrent.futures import ThreadPoolExecutor

    store = clawstore.open(tmp_path / "store")
    store.put_blob(mt.EMPTY_JSON)
    store.tag("t/free", "head", _manifest(store, None, count="0"), expect=MISSING)
    k = 8
    data = [blob_data(j) for j in range(6)]

    def worker(i: int) -> int:
        for j in range(len(data)):
            assert store.put_blob(data[(i + j) % len(data)]).size == len(data[(i + j) % len(data)])
        done = conflicts = 0
        while done < k:
            cur = store.resolve("t/free", "head")
            count = int(json.loads(store.get_manifest(cur))["annotations"]["count"])
            new = _manifest(store, cur, count=str(count + 1), worker=str(i))
            try:
                store.tag("t/free", "head", new, expect=cur)
                done += 1
            except TagConflictError:
                conflicts += 1
        return done

    with ThreadPoolExecutor(N) as pool:
        assert sum(pool.map(worker, range(N))) == N * k
    head = store.resolve("t/free", "head")
    assert json.loads(store.get_manifest(head))["annotations"]["count"] == str(N * k)
    for d in data:
        assert store.read_blob("sha256:" + hashlib.sha256(d).hexdigest()) == d
    assert os.listdir(tmp_path / "store" / "tmp") == []
