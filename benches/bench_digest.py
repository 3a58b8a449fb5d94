"""Digest and local put_blob throughput, as ratios against the peer tools run side by side.

    python benches/bench_digest.py [--size 1GiB] [--rounds 5] [--dir DIR]

Per round, interleaved (so background load hits every contender alike), on one file in the page
cache:

* sha256: `clawstore._core.digest_file` vs `openssl dgst -sha256`, `sha256sum`, and hashlib
* blake3: `digest_file(..., "blake3")` (all cores) vs the `blake3` package (max_threads=AUTO, mmap)
* put: `store.put_blob(path)` (hash + copy + fsync + rename) vs `openssl dgst -sha256 f && cp f dst`
  and vs the same followed by `sync -f dst` (the same durability as put_blob)

The figure per contender is the best of the rounds; ratios are throughput ratios (>1: clawstore
is faster). CPU time (user+sys, incl. helper threads and child processes) is reported too: on a
loaded machine it is the steadier measure for the single-threaded sha256 contenders.
In-process timings exclude interpreter start-up; the command timings include their fork+exec
(a few milliseconds, reported as `exec overhead`). The peak RSS growth of put_blob is measured
in a fresh subprocess: the kernel's peak-RSS mark (VmHWM, reset through /proc/self/clear_refs
just before the put) minus the RSS just before it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import clawstore
from clawstore import _core

UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text.strip())
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1GiB, 256MiB)")
    return int(m.group(1)) * UNITS[m.group(2).lower()]


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


#: CPU seconds (user + sys) of every contender, in the same order as the wall times.
CPU: dict[str, list[float]] = {}


def _cpu(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time of fn(); its CPU time (this process's threads + waited-for children) goes to
    `timed.last_cpu`. On a loaded machine CPU time is the steadier figure for serial hashing."""
    c0 = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    timed.last_cpu = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - c0  # type: ignore[attr-defined]
    return wall, out


def run(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


def hashlib_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def blake3_pkg(path: Path) -> str:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


RSS_PROBE = """
import re, sys, clawstore
def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024
store = clawstore.open(sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
before = status("VmRSS")
store.put_blob(sys.argv[1])
print(max(0, status("VmHWM") - before))
"""


def rss_growth(path: Path, store_dir: Path) -> int:
    """Peak RSS growth (bytes) of one put_blob of `path` in a fresh process and a fresh store."""
    shutil.rmtree(store_dir, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(path), store_dir.as_uri()],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    shutil.rmtree(store_dir, ignore_errors=True)
    return int(out.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--no-sha256sum", action="store_true", help="skip coreutils sha256sum (slow)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="clawstore-bench-", dir=args.dir))
    try:
        bench(work, args.size, args.rounds, not args.no_sha256sum)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, size: int, rounds: int, with_sha256sum: bool) -> None:
    src = work / "data.bin"
    print(f"# {size / (1 << 30):.2f} GiB random file in {work}; {rounds} interleaved rounds", file=sys.stderr)
    make_file(src, size)
    warm(src)
    expect = hashlib_file(src)
    expect_b3 = blake3_pkg(src)
    store_dir = work / "store"
    store = clawstore.open(store_dir.as_uri())
    dst = work / "copy.bin"

    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)
        CPU.setdefault(name, []).append(timed.last_cpu)  # type: ignore[attr-defined]

    # put_blob vs openssl + cp (and + sync -f for equal durability): fresh destination each,
    # no dirty pages left from the previous contender (os.sync), order rotated per round.
    digest = clawstore.Digest.from_hex("sha256", expect)

    def put_blob() -> None:
        if store.has_blob(digest):
            store.delete_blob(digest)
        os.sync()
        t, desc = timed(lambda: store.put_blob(src))
        assert desc.digest == digest  # type: ignore[attr-defined]
        record("store.put_blob(path)", t)
        store.delete_blob(digest)

    def shell(name: str, cmd: str) -> Callable[[], None]:
        def go() -> None:
            dst.unlink(missing_ok=True)
            os.sync()
            record(name, timed(lambda: run(cmd))[0])
            dst.unlink(missing_ok=True)

        return go

    puts = [
        put_blob,
        shell("openssl dgst && cp", f"openssl dgst -sha256 {src} >/dev/null && cp {src} {dst}"),
        shell(
            "openssl dgst && cp && sync -f",
            f"openssl dgst -sha256 {src} >/dev/null && cp {src} {dst} && sync -f {dst}",
        ),
    ]

    for r in range(rounds):
        warm(src)
        t, out = timed(lambda: run(f"openssl dgst -sha256 {src}"))
        assert expect in str(out)
        record("openssl dgst -sha256", t)
        t, out = timed(lambda: _core.digest_file(str(src), "sha256"))
        assert out == (expect, size), out
        record("digest_file sha256", t)
        if with_sha256sum:
            t, out = timed(lambda: run(f"sha256sum {src}"))
            assert expect in str(out)
            record("sha256sum", t)
        t, out = timed(lambda: hashlib_file(src))
        assert out == expect
        record("hashlib sha256", t)
        t, out = timed(lambda: _core.digest_file(str(src), "blake3"))
        assert out == (expect_b3, size)
        record("digest_file blake3", t)
        t, out = timed(lambda: blake3_pkg(src))
        assert out == expect_b3
        record("blake3 package (AUTO threads)", t)
        record("exec overhead (true)", timed(lambda: run("true"))[0])

        for i in range(len(puts)):
            puts[(r + i) % len(puts)]()
        print(f"# round {r + 1}/{rounds} done", file=sys.stderr)

    growth = rss_growth(src, work / "rss-store")
    best = {k: min(v) for k, v in times.items()}
    gib = size / (1 << 30)

    def rate(name: str) -> str:
        return f"{gib / best[name]:.2f} GiB/s"

    def ratio(ours: str, theirs: str) -> str:
        return f"{best[theirs] / best[ours]:.2f}x"

    features = _core.hash_features()
    load = os.getloadavg()
    print(
        f"\nmachine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; ", end=""
    )
    print(f"hash features {features}")
    print(f"file {gib:.2f} GiB in page cache; best of {rounds} interleaved rounds\n")
    best_cpu = {k: min(v) for k, v in CPU.items()}
    print("| contender | best wall | throughput | median wall | best CPU (user+sys) |")
    print("|---|---:|---:|---:|---:|")
    for k, v in times.items():
        med = sorted(v)[len(v) // 2]
        thr = "-" if k.startswith("exec overhead") else rate(k)
        print(f"| {k} | {best[k]:.3f} s | {thr} | {med:.3f} s | {best_cpu[k]:.3f} s |")
    print()
    print("| ratio (throughput, >1 = clawstore faster) | value | target |")
    print("|---|---:|---|")
    print(
        f"| digest_file sha256 / openssl dgst -sha256 | "
        f"{ratio('digest_file sha256', 'openssl dgst -sha256')} | >= 0.95x |"
    )
    print(
        f"| same, by CPU time (single-threaded both) | "
        f"{best_cpu['openssl dgst -sha256'] / best_cpu['digest_file sha256']:.2f}x | >= 0.95x |"
    )
    if with_sha256sum:
        print(f"| digest_file sha256 / sha256sum | {ratio('digest_file sha256', 'sha256sum')} | |")
    print(f"| digest_file sha256 / hashlib | {ratio('digest_file sha256', 'hashlib sha256')} | |")
    print(
        f"| digest_file blake3 / blake3 package AUTO | "
        f"{ratio('digest_file blake3', 'blake3 package (AUTO threads)')} | |"
    )
    print(
        f"| put_blob / (openssl dgst && cp) | {ratio('store.put_blob(path)', 'openssl dgst && cp')} | >= 1x |"
    )
    print(
        f"| same, by CPU time | {best_cpu['openssl dgst && cp'] / best_cpu['store.put_blob(path)']:.2f}x | |"
    )
    print(
        f"| put_blob / (openssl dgst && cp && sync -f) | "
        f"{ratio('store.put_blob(path)', 'openssl dgst && cp && sync -f')} | |"
    )
    print(f"\nput_blob peak RSS growth: {growth / (1 << 20):.1f} MiB (limit 64 MiB)")


if __name__ == "__main__":
    main()
