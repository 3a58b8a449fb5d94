"""Processes pushing checkpoints (and volume snapshots, when `clawstore.volumes` exists) while
other processes run GC in a loop with grace 0: afterwards every tagged artifact is whole and
fsck is clean. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import time
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore import checkpoints as cp
from clawstore.hub import Hub
from hubutil import ADMIN

ITERATIONS = 6
SHARED = [f"shared content {i}".encode() * 50 for i in range(8)]


def _tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _volume_api() -> Any:
    try:
        from clawstore import volumes  # type: ignore[attr-defined]
    except ImportError:
        return None
    if not (callable(getattr(volumes, "snapshot", None)) and callable(getattr(volumes, "restore", None))):
        return None
    import inspect

    # Used as snapshot(store, directory, ref) and restore(store, ref, directory), per DESIGN.md's CLI.
    for fn in (volumes.snapshot, volumes.restore):
        try:
            positional = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            return None
        if len(positional) < 3:
            return None
    return volumes


def _pusher(store_dir: str, catalog: str, work: str, name: str, out: str, with_volumes: bool) -> None:
    rng = random.Random(name)
    hub = Hub(clawstore.open(store_dir), catalog)
    src = Path(work) / name
    src.mkdir(parents=True)
    expected: dict[str, dict[str, str]] = {}
    volumes = _volume_api() if with_volumes else None
    for it in range(ITERATIONS):
        # Files shared across pushers (dedup races), private files, some changed each round.
        for i, data in enumerate(SHARED):
            if rng.random() < 0.5:
                (src / f"shared{i}").write_bytes(data)
            elif (src / f"shared{i}").exists():
                (src / f"shared{i}").unlink()
        (src / f"own{it % 3}").write_bytes(os.urandom(2000 + it))
        repo = f"ck/{name}"
        with hub.session(ADMIN, repo, kind="checkpoint") as s:
            cp.create(s, f"{repo}:latest", src, session={"it": it})
            if it % 2 == 0:
                s.tag(repo, f"keep{it}", s.resolve(repo, "latest"))
                expected[f"{repo}:keep{it}"] = _tree_hashes(src)
            if it == 3:  # an untag lets an earlier kept checkpoint become garbage
                s.untag(repo, "keep0")
                expected.pop(f"{repo}:keep0", None)
        expected[f"{repo}:latest"] = _tree_hashes(src)
        if volumes is not None:
            vrepo = f"vol/{name}"
            with hub.session(ADMIN, vrepo, kind="snapshot") as s:
                volumes.snapshot(s, src, f"{vrepo}:latest")
            expected[f"{vrepo}:latest"] = _tree_hashes(src)
    Path(out).write_text(json.dumps(expected))
    hub.close()


def _collector(store_dir: str, catalog: str, stop: str, out: str) -> None:
    hub = Hub(clawstore.open(store_dir), catalog)
    runs = deleted = 0
    deadline = time.monotonic() + 240
    while not Path(stop).exists() and time.monotonic() < deadline:
        # Small sweep batches on every other run: many transactions, several chunks each, deletes
        # in flight while pushes rescue from the trash (the default sizes take all at once here).
        small = {"sweep_batch": 5, "sweep_chunk": 2} if runs % 2 else {}
        r = hub.gc(ADMIN, grace=0, **small)
        runs += 1
        deleted += r.manifests + r.blobs
    Path(out).write_text(json.dumps({"runs": runs, "deleted": deleted}))
    hub.close()


@pytest.mark.slow
@pytest.mark.parametrize("with_volumes", [False, True], ids=["checkpoints", "volumes"])
def test_pushes_race_gc_with_zero_grace(catalog_url: str, tmp_path: Path, with_volumes: bool) -> None:
    if with_volumes and _volume_api() is None:
        pytest.skip("clawstore.volumes with snapshot(store, dir, ref)/restore(store, ref, dir) not present")
    store_dir = str(tmp_path / "store")
    Hub(clawstore.open(store_dir), catalog_url).close()  # create + migrate once
    ctx = mp.get_context("spawn")
    stop = str(tmp_path / "stop")
    pushers = [
        ctx.Process(
            target=_pusher,
            args=(
                store_dir,
                catalog_url,
                str(tmp_path / "work"),
                f"p{i}",
                str(tmp_path / f"p{i}.json"),
                with_volumes,
            ),
        )
        for i in range(2)
    ]
    collectors = [
        ctx.Process(target=_collector, args=(store_dir, catalog_url, stop, str(tmp_path / f"gc{i}.json")))
        for i in range(2)
    ]
    for p in collectors + pushers:
        p.start()
    for p in pushers:
        p.join(300)
    Path(stop).touch()
    for p in collectors:
        p.join(300)
    assert all(p.exitcode == 0 for p in pushers + collectors), [p.exitcode for p in pushers + collectors]
    stats = [json.loads((tmp_path / f"gc{i}.json").read_text()) for i in range(2)]
    assert sum(s["runs"] for s in stats) >= 2
    hub = Hub(clawstore.open(store_dir), catalog_url)
    final = hub.gc(ADMIN, grace=0)
    assert sum(s["deleted"] for s in stats) + final.manifests + final.blobs > 0  # GC did real work
    volumes = _volume_api()
    for i in range(2):
        expected = json.loads((tmp_path / f"p{i}.json").read_text())
        for ref, files in expected.items():
            out = tmp_path / "restore" / ref.replace("/", "_").replace(":", "_")
            if ref.startswith("vol/"):
                volumes.restore(hub.store, ref, out)
            else:
                cp.restore(hub.store, ref, out)
            assert _tree_hashes(out) == files, ref
    report = hub.fsck(ADMIN, verify_blobs=True)
    assert report.ok, report.problems
    hub.close()
