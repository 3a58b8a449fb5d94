#!/usr/bin/env python3
"""Log benchmarks, as ratios against the peer run side by side in the same run.

    flock /work/wt/signals/bench.lock python benches/bench_logs.py [--mib 256] [--repeat 3]
        [--window-gib 1] [--json OUT]

1. Append throughput: a stream of 1 KiB log lines (timestamp, level, text; as compressible as
   real logs) appended one line per `LogWriter.append` call into a local store, sealed into
   4 MiB zstd-3 segments, each segment and manifest fsynced as it is sealed, then closed;
   against `zstd -3 -q -c STREAM > FILE` with the file fsynced (the same bytes, compressed at
   the same level, made durable once). Both read the stream from the page cache.
2. Time-window reads: a 1 GiB log whose lines are spread evenly over 10,000 s of (simulated)
   time; `logs.read(since=, until=)` of a 1% window (100 s); the stored bytes it fetched
   against the stored size of the whole log (and the uncompressed size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import clawstore
from clawstore import logs

LINE = 1024


def make_stream(path: Path, mib: int, seed: int = 1) -> int:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(2, 9)).hex().encode() for _ in range(5000)]
    levels = [b"INFO", b"INFO", b"INFO", b"DEBUG", b"WARN", b"ERROR"]
    n = (mib << 20) // LINE
    with open(path, "wb") as f:
        for i in range(n):
            head = b"2026-11-26T13:%02d:%02d.%06dZ %s session=%d " % (
                (i // 60000) % 60,
                (i // 1000) % 60,
                i % 1000000,
                rng.choice(levels),
                i % 97,
            )
            body = b" ".join(rng.choice(words) for _ in range(160))
            line = (head + body)[: LINE - 1].ljust(LINE - 1, b".") + b"\n"
            f.write(line)
    return n * LINE


def bench_append(stream: Path, work: Path, repeat: int) -> dict[str, object]:
    data = stream.read_bytes()
    lines = [data[i : i + LINE] for i in range(0, len(data), LINE)]

    def ours(i: int, threads: int = 0) -> float:
        root = work / f"store-{i}"
        store = clawstore.open(root)
        t = time.perf_counter()
        with logs.LogWriter(store, "logs/bench:out", max_age=None, threads=threads) as w:
            for line in lines:
                w.append(line)
        el = time.perf_counter() - t
        store.close()
        shutil.rmtree(root)
        return el

    def peer(i: int) -> float:
        out = work / f"peer-{i}.zst"
        t = time.perf_counter()
        subprocess.run(f"zstd -3 -q -c {stream} > {out}", shell=True, check=True)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        el = time.perf_counter() - t
        out.unlink()
        return el

    fns = {"clawstore": ours, "clawstore-t2": lambda i: ours(i, 2), "zstd": peer}
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for i in range(repeat):
        for name in names[i % 3 :] + names[: i % 3]:  # rotate the order every round
            os.sync()
            times[name].append(fns[name](i))
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "bytes": len(data),
        "seconds": times,
        "mib_s": {n: len(data) / v / 2**20 for n, v in med.items()},
        "ratio": med["zstd"] / med["clawstore"],  # throughput ours / peer's
        "ratio_t2": med["zstd"] / med["clawstore-t2"],
    }


def bench_window(work: Path, gib: float) -> dict[str, object]:
    root = work / "window-store"
    store = clawstore.open(root)
    total = int(gib * (1 << 30))
    n = total // LINE
    span = 10_000.0
    t0 = 1_800_000_000.0
    clock_t = [t0]
    rng = random.Random(2)
    words = [rng.randbytes(rng.randrange(2, 9)).hex().encode() for _ in range(5000)]
    block = b" ".join(rng.choice(words) for _ in range(40000))
    started = time.perf_counter()
    with logs.LogWriter(store, "logs/big:out", max_age=None, clock=lambda: clock_t[0]) as w:
        for i in range(n):
            clock_t[0] = t0 + span * i / n
            off = (i * 7919) % (len(block) - LINE)
            w.append(b"%012d " % i + block[off : off + LINE - 14] + b"\n")
    build = time.perf_counter() - started
    log = logs.load(store, "logs/big:out")
    stats: dict[str, int] = {}
    t = time.perf_counter()
    got = sum(len(c) for c in logs.read(store, "logs/big:out", since=t0 + 5000, until=t0 + 5100, stats=stats))
    read_s = time.perf_counter() - t
    out = {
        "log_bytes": log.bytes,
        "stored_bytes": log.stored_size,
        "segments": len(log.segments),
        "build_s": build,
        "window_bytes_out": got,
        "segments_read": stats["segments_read"],
        "stored_bytes_read": stats["bytes_read"],
        "fraction_of_stored": stats["bytes_read"] / log.stored_size,
        "fraction_of_log": stats["bytes_read"] / log.bytes,
        "read_s": read_s,
    }
    store.close()
    shutil.rmtree(root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--window-gib", type=float, default=1.0)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir under /tmp)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-logs-", dir=args.work))
    try:
        load_before = os.getloadavg()
        stream = work / "stream.log"
        make_stream(stream, args.mib)
        res: dict[str, object] = {"loadavg_before": load_before}
        res["append"] = bench_append(stream, work, args.repeat)
        a = res["append"]
        assert isinstance(a, dict)
        print(
            f"append {args.mib} MiB of 1 KiB lines, MiB/s (median of {args.repeat}): {a['mib_s']}; "
            f"ratio vs zstd -3 > file: {a['ratio']:.2f}x, with zstd threads=2 {a['ratio_t2']:.2f}x "
            f"(target >= 0.5x); all runs (s): {a['seconds']}",
            flush=True,
        )
        stream.unlink()
        res["window"] = win = bench_window(work, args.window_gib)
        print(
            f"1% window of a {win['log_bytes'] / 2**30:.2f} GiB log ({win['segments']} segments, "
            f"{win['stored_bytes'] / 2**20:.0f} MiB stored): read {win['segments_read']} segments, "
            f"{win['stored_bytes_read'] / 2**20:.1f} MiB = {100 * win['fraction_of_stored']:.2f}% "
            f"of the stored log ({100 * win['fraction_of_log']:.2f}% of its bytes) "
            f"in {win['read_s']:.2f}s (target < 5%)",
            flush=True,
        )
        res["loadavg_after"] = os.getloadavg()
        print(f"load average before {load_before}, after {res['loadavg_after']}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
