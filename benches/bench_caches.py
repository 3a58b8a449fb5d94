#!/usr/bin/env python3
"""Cache benchmarks on a node_modules-like tree, as ratios against volume snapshots run side
by side in the same run.

    flock /work/wt/signals/bench.lock python benches/bench_caches.py [--data DIR] [--repeat 3]

The tree is `make_volume.py DIR --many-files 20000` (~40 MB of small text files, 100 per
directory), generated once. Each round, in rotating order, into fresh local stores:

- `caches.save` (scan with content digests, pack, index) vs `volumes.snapshot` (full);
- `caches.restore` into a new directory vs `volumes.restore`;

then a second key over a copy of the tree changed by `make_volume.py --mutate 1` (1% of the
files edited, added or deleted): the new bytes it stores against the first entry's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import clawstore
from clawstore import caches, volumes

MAKE_VOLUME = "/work/shared/bench/make_volume.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/wt/data/logs-nm-20k")
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tree = Path(args.data)
    if not tree.exists():
        subprocess.run([sys.executable, MAKE_VOLUME, str(tree), "--many-files", str(args.files)], check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-caches-"))
    load_before = os.getloadavg()
    try:
        times: dict[str, list[float]] = {
            n: [] for n in ("cache save", "volume snapshot", "cache restore", "volume restore")
        }

        def timed(name: str, fn: Callable[[], object]) -> None:
            os.sync()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

        for i in range(args.repeat):
            cs, vs = clawstore.open(work / f"cs{i}"), clawstore.open(work / f"vs{i}")
            saves = [
                ("cache save", lambda: caches.save(cs, "npm-linux-1", tree)),  # noqa: B023
                ("volume snapshot", lambda: volumes.snapshot(vs, tree, "vol/nm:1")),  # noqa: B023
            ]
            restores = [
                ("cache restore", lambda: caches.restore(cs, "npm-linux-1", work / f"cr{i}")),  # noqa: B023
                ("volume restore", lambda: volumes.restore(vs, "vol/nm:1", work / f"vr{i}")),  # noqa: B023
            ]
            for pair in (saves, restores):
                if pair is restores:
                    # Untimed warm-up: whichever restore ran first after the saves was 2-5x
                    # slower than the second, for either tool (writeback of the saves' files).
                    volumes.restore(vs, "vol/nm:1", work / "warm")
                    shutil.rmtree(work / "warm")
                for name, fn in pair if i % 2 == 0 else reversed(pair):
                    timed(name, fn)
            shutil.rmtree(work / f"cr{i}")
            shutil.rmtree(work / f"vr{i}")
            if i < args.repeat - 1:
                cs.close()
                vs.close()
                shutil.rmtree(work / f"cs{i}")
                shutil.rmtree(work / f"vs{i}")
        med = {n: statistics.median(v) for n, v in times.items()}
        print(
            f"tree {tree}: medians of {args.repeat} (s): " + ", ".join(f"{n} {v:.2f}" for n, v in med.items())
        )
        print(f"  all runs: {times}")
        save_ratio = med["cache save"] / med["volume snapshot"]
        restore_ratio = med["cache restore"] / med["volume restore"]
        print(f"  cache save / volume snapshot = {save_ratio:.2f}x (target <= 1.2x)")
        print(f"  cache restore / volume restore = {restore_ratio:.2f}x (target <= 1.2x)")

        first = caches.get(cs, "npm-linux-1")
        assert first is not None
        copy = work / "mutated"
        subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
        subprocess.run(
            [sys.executable, MAKE_VOLUME, str(copy), "--mutate", "1"], check=True, capture_output=True
        )
        second = caches.save(cs, "npm-linux-2", copy)
        first_bytes = first.layers[0].size
        frac = second.new_bytes / first_bytes
        print(
            f"  second key over a 1% mutation: {second.new_bytes} new bytes vs {first_bytes} for the first "
            f"= {100 * frac:.2f}% (target < 5%), base {second.base!r}"
        )
        load_after = os.getloadavg()
        print(f"load average before {load_before}, after {load_after}")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "times": times,
                        "save_ratio": save_ratio,
                        "restore_ratio": restore_ratio,
                        "second_fraction": frac,
                    }
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
