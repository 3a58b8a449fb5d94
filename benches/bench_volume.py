#!/usr/bin/env python3
"""Volume snapshot/restore benchmarks, as ratios against the peer tools run side by side.

    python benches/bench_volume.py [--data DIR] [--size 1GiB] [--repeat 3] [--json OUT]

Data comes from /work/shared/bench/make_volume.py (generated once under --data): a ~1 GiB
mixed volume, the 3,278-file small case, and a copy mutated by `--mutate 1`. Everything runs
from the page cache (caches are not dropped: the machine is shared). Each figure is the median
of --repeat runs. Compared:

- full snapshot: `_core.pack_to_file` (scan + pack + both digests) and `volumes.snapshot` into a
  local store (adds the store's copy-in with fsync, the index and the manifest) vs
  `tar -cf - DIR | zstd -3 -T2 | tee FILE | openssl dgst -sha256` (and `sha256sum`), and vs
  Python tarfile + zstandard + hashlib (zstandard's default one thread, and threads=2; and one
  thread hashing the tar stream as well, for the diff_id a layer needs);
- incremental snapshot after a 1% mutation vs the full snapshot;
- restore (`volumes.restore` from the local store) vs `zstd -dc FILE | tar -xf -`;
- the small case restore time;
- peak RSS of a process packing the 1 GiB volume and a 4 GiB sparse-file tree.

    python benches/bench_volume.py --many-files TREE [--repeat 5]

The many-small-files case (issue 17), whole CLI processes into a local store, paired runs in
rotating order: `clawstore volume snapshot --full TREE` vs the openssl pipeline; a no-change
snapshot; a snapshot after `make_volume.py --mutate 1` (on a copy of TREE, mutated afresh before
each run); `clawstore volume restore` vs `zstd -dc | tar -x`; peak RSS (VmHWM) of each CLI run.
TREE is made with `make_volume.py TREE --many-files 100000` and is only read.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import clawstore
import zstandard
from clawstore import _core, volumes

MAKE_VOLUME = "/work/shared/bench/make_volume.py"


def sh(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, stdout=subprocess.DEVNULL)


def timed(fn: Callable[[], object], repeat: int, setup: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


#: CPU seconds of every alternate() run, by contender name.
CPU: dict[str, list[float]] = {}


def alternate(fns: dict[str, Callable[[int], object]], repeat: int) -> dict[str, list[float]]:
    """Run each contender `repeat` times, rotating the order every round (so that none always
    runs right after another's I/O), and return all wall times (CPU times go to CPU)."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeat):
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            os.sync()  # the previous contender's dirty pages are written back outside its time
            c = cpu_seconds()
            t = time.perf_counter()
            fns[n](i)
            out[n].append(time.perf_counter() - t)
            CPU.setdefault(n, []).append(cpu_seconds() - c)
    return out


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f}s, best {min(times):.2f}s"


def ensure_data(data: Path, size: str, tree: Path | None = None) -> tuple[Path, Path]:
    vol, small = tree or data / "vol", data / "small"
    if not vol.exists():
        subprocess.run([sys.executable, MAKE_VOLUME, str(vol), "--size", size], check=True)
    if not small.exists():
        subprocess.run([sys.executable, MAKE_VOLUME, str(small), "--small-case"], check=True)
    return vol, small


def tree_bytes(root: Path) -> tuple[int, int]:
    n = total = 0
    for r, _d, fs in os.walk(root):
        for f in fs:
            n += 1
            total += os.lstat(os.path.join(r, f)).st_size
    return n, total


class HashingFile:
    def __init__(self, f: object) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.h.update(b)
        return self.f.write(b)  # type: ignore[attr-defined,no-any-return]

    def flush(self) -> None:
        self.f.flush()  # type: ignore[attr-defined]


def python_tarfile_zstd(src: Path, out: Path, threads: int, diff_id: bool = False) -> str:
    """The peer: tarfile into zstandard, hashlib over the compressed bytes (the blob digest) and,
    with `diff_id`, over the tar stream too (the same two digests a layer needs)."""
    with open(out, "wb") as raw:
        hf = HashingFile(raw)
        cctx = zstandard.ZstdCompressor(level=3, threads=threads)
        with cctx.stream_writer(hf, closefd=False) as w:  # type: ignore[arg-type]
            tar_sink = HashingFile(w) if diff_id else w
            with tarfile.open(fileobj=tar_sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                tf.add(str(src), arcname=".")
        return hf.h.hexdigest()


def peak_rss_of(code: str) -> int:
    """Peak RSS (VmHWM, bytes) of a fresh Python process running `code`. (ru_maxrss would
    include the forking parent's RSS: Linux carries it over fork and exec.)"""
    tail = "\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    p = subprocess.run([sys.executable, "-c", code + tail], check=True, capture_output=True, text=True)
    return int(p.stdout.strip().splitlines()[-1]) * 1024


def timed_cli(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user+sys) and peak RSS (bytes) of one command."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


def many_files(tree: Path, data: Path, repeat: int) -> dict[str, object]:
    """Issue 17's figures for a many-small-files tree: whole CLI processes, paired runs."""
    cli = str(Path(sys.executable).with_name("clawstore"))
    # Bytecode as an installed wheel has it: with PYTHONDONTWRITEBYTECODE set (this machine) an
    # editable install would otherwise compile every module on every CLI start (~50 ms).
    compileall.compile_dir(Path(clawstore.__file__).parent, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="many-", dir=data))
    env = dict(os.environ, CLAWSTORE_URL=f"file://{work / 'store'}")
    nfiles, nbytes = tree_bytes(tree)
    res: dict[str, object] = {"tree": str(tree), "files": nfiles, "bytes": nbytes, "load": os.getloadavg()}
    print(f"tree {tree}: {nfiles} files, {nbytes / 1e6:.0f} MB; load {os.getloadavg()}", flush=True)
    pipe = work / "pipe.tar.zst"
    runs: dict[str, list[tuple[float, float, int]]] = {}

    def record(name: str, r: tuple[float, float, int]) -> None:
        runs.setdefault(name, []).append(r)

    def med(name: str, k: int = 0) -> float:
        return statistics.median(x[k] for x in runs[name])

    try:
        for i in range(repeat):
            order = ["snapshot", "pipeline"] if i % 2 == 0 else ["pipeline", "snapshot"]
            for n in order:
                os.sync()
                if n == "snapshot":
                    cmd = [cli, "volume", "snapshot", "--full", str(tree), f"bench/many:f{i}"]
                    record(n, timed_cli(cmd, env))
                else:
                    c = cpu_seconds()
                    t = time.perf_counter()
                    sh(f"tar -cf - -C '{tree}' . | zstd -q -3 -T2 | tee '{pipe}' | openssl dgst -sha256")
                    record(n, (time.perf_counter() - t, cpu_seconds() - c, 0))
        ratio = med("pipeline") / med("snapshot")
        pairs = [p[0] / s[0] for s, p in zip(runs["snapshot"], runs["pipeline"], strict=True)]
        res.update(
            full_snapshot_s=med("snapshot"),
            full_snapshot_cpu_s=med("snapshot", 1),
            full_snapshot_rss=max(x[2] for x in runs["snapshot"]),
            pipeline_s=med("pipeline"),
            pipeline_cpu_s=med("pipeline", 1),
            ratio_full_vs_pipeline=ratio,
            ratio_full_vs_pipeline_pairs=pairs,
        )
        print(
            f"full CLI snapshot {med('snapshot'):.2f}s (CPU {med('snapshot', 1):.2f}s) vs pipeline "
            f"{med('pipeline'):.2f}s (CPU {med('pipeline', 1):.2f}s): {ratio:.2f}x (median of pairs "
            f"{statistics.median(pairs):.2f}x)",
            flush=True,
        )
        # no change: the tag already points at a snapshot of this tree
        timed_cli([cli, "volume", "snapshot", str(tree), "bench/many:latest"], env)
        for _ in range(repeat):
            record("nochange", timed_cli([cli, "volume", "snapshot", str(tree), "bench/many:latest"], env))
        res.update(nochange_s=med("nochange"), nochange_cpu_s=med("nochange", 1))
        print(f"no-change CLI snapshot {summary([x[0] for x in runs['nochange']])}", flush=True)
        # small change: a copy, mutated 1% before each run
        mut = work / "mut"
        sh(f"cp -a '{tree}' '{mut}'")
        timed_cli([cli, "volume", "snapshot", str(mut), "bench/mut:latest"], env)
        for i in range(repeat):
            subprocess.run(
                [sys.executable, MAKE_VOLUME, str(mut), "--mutate", "1", "--seed", str(100 + i)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            os.sync()
            record("mutate", timed_cli([cli, "volume", "snapshot", str(mut), "bench/mut:latest"], env))
        res.update(mutate1_s=med("mutate"), mutate1_cpu_s=med("mutate", 1))
        print(f"CLI snapshot after --mutate 1: {summary([x[0] for x in runs['mutate']])}", flush=True)
        # restore vs zstd -dc | tar -x, fresh targets, nothing deleted until the end
        trash = work / "restores"
        trash.mkdir()
        for i in range(repeat):
            order = ["restore", "tar"] if i % 2 == 0 else ["tar", "restore"]
            for n in order:
                os.sync()
                if n == "restore":
                    dest = trash / f"ours{i}"
                    record(n, timed_cli([cli, "volume", "restore", "bench/many:f0", str(dest)], env))
                else:
                    d = trash / f"tar{i}"
                    d.mkdir()
                    c = cpu_seconds()
                    t = time.perf_counter()
                    sh(f"zstd -dc '{pipe}' | tar -xf - -C '{d}'")
                    record(n, (time.perf_counter() - t, cpu_seconds() - c, 0))
        assert tree_bytes(trash / "ours0") == (nfiles, nbytes)
        rr = med("tar") / med("restore")
        res.update(restore_s=med("restore"), zstd_tar_x_s=med("tar"), ratio_restore_vs_tar=rr)
        print(
            f"CLI restore {med('restore'):.2f}s vs zstd -dc | tar -x {med('tar'):.2f}s: {rr:.2f}x", flush=True
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["runs"] = runs
    res["load_after"] = os.getloadavg()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "volbench-volumes")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-python", action="store_true", help="skip the (slow) tarfile+zstandard peer")
    ap.add_argument("--skip-4g", action="store_true", help="skip the 4 GiB sparse-tree memory run")
    ap.add_argument("--only", choices=("restore",), help="run only the restore comparison")
    ap.add_argument(
        "--restore-dir",
        type=Path,
        help="restore the 1 GiB volume under this directory (e.g. /dev/shm: takes the disk out of it)",
    )
    ap.add_argument("--volume-tree", type=Path, help="an existing mixed volume (make_volume.py DIR) to use")
    ap.add_argument(
        "--many-files", type=Path, metavar="TREE", help="run only the many-small-files case on TREE"
    )
    a = ap.parse_args()
    if a.many_files is not None:
        a.data.mkdir(parents=True, exist_ok=True)
        out_many = many_files(a.many_files, a.data, a.repeat)
        print(json.dumps(out_many, indent=1))
        if a.json:
            a.json.write_text(json.dumps(out_many, indent=1))
        return
    vol, small = ensure_data(a.data, a.size, a.volume_tree)
    nfiles, nbytes = tree_bytes(vol)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=a.data))
    cleanup: list[Path] = []
    res: dict[str, object] = {
        "files": nfiles,
        "bytes": nbytes,
        "load": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(f"volume: {nfiles} files, {nbytes / 2**20:.0f} MiB; load {os.getloadavg()}", flush=True)
    try:
        out = work / "layer.tar.zst"

        def rm(p: Path) -> Callable[[], None]:
            return lambda: p.unlink(missing_ok=True)

        # -- small case (3,278 files), first: before any large deletion slows ext4 down ------
        counter = iter(range(1000))
        sfiles, sbytes = tree_bytes(small)
        small_store = clawstore.open(work / "small-store")
        t_small_snap = timed(lambda: volumes.snapshot(small_store, small, f"bench/small:s{next(counter)}"), 1)
        volumes.snapshot(small_store, small, "bench/small:latest")
        sdests = iter(range(1000))
        t_small = timed(
            lambda: volumes.restore(small_store, "bench/small:latest", work / f"small{next(sdests)}"),
            a.repeat,
        )
        res.update(
            small_files=sfiles, small_bytes=sbytes, small_snapshot_s=t_small_snap, small_restore_s=t_small
        )
        print(
            f"small case ({sfiles} files, {sbytes / 1e6:.0f} MB): snapshot {t_small_snap:.3f}s, "
            f"restore {t_small:.3f}s",
            flush=True,
        )
        small_store.close()

        pipe = work / "pipe.tar.zst"
        store_dir = work / "store"
        store = clawstore.open(store_dir)
        t_snap = 0.0
        if a.only == "restore":
            sh(f"tar -cf - -C '{vol}' . | zstd -q -3 -T2 > '{pipe}'")
        else:
            # -- full snapshot -------------------------------------------------------------------

            def ours_pack(i: int) -> None:
                out.unlink(missing_ok=True)
                _core.pack_to_file(_core.scan_tree(vol), out)

            def ours_snapshot(i: int) -> None:
                volumes.snapshot(store, vol, f"bench/vol:full{i}", full=True)

            def openssl(i: int) -> None:
                sh(f"tar -cf - -C '{vol}' . | zstd -q -3 -T2 | tee '{pipe}' | openssl dgst -sha256")

            def sha256sum(i: int) -> None:
                sh(f"tar -cf - -C '{vol}' . | zstd -q -3 -T2 | tee '{pipe}' | sha256sum")

            ft = alternate(
                {"pack": ours_pack, "snapshot": ours_snapshot, "openssl": openssl, "sha256sum": sha256sum},
                a.repeat,
            )
            med = {k: statistics.median(v) for k, v in ft.items()}
            best = {k: min(v) for k, v in ft.items()}
            t_pack, t_snap, t_openssl, t_sha256sum = (
                med["pack"],
                med["snapshot"],
                med["openssl"],
                med["sha256sum"],
            )
            layer_size = out.stat().st_size
            res.update(
                full_times=ft,
                pack_to_file_s=t_pack,
                snapshot_s=t_snap,
                layer_bytes=layer_size,
                pipe_bytes=pipe.stat().st_size,
                tar_zstd_openssl_s=t_openssl,
                tar_zstd_sha256sum_s=t_sha256sum,
                ratio_pack_vs_openssl=t_openssl / t_pack,
                ratio_snapshot_vs_openssl=t_openssl / t_snap,
                ratio_pack_vs_sha256sum=t_sha256sum / t_pack,
                ratio_snapshot_vs_sha256sum=t_sha256sum / t_snap,
                ratio_best_pack_vs_openssl=best["openssl"] / best["pack"],
                ratio_best_pack_vs_sha256sum=best["sha256sum"] / best["pack"],
            )
            for k, v in ft.items():
                print(f"full {k}: {summary(v)}; CPU median {statistics.median(CPU[k]):.2f}s", flush=True)
            res["full_cpu"] = {k: CPU[k] for k in ft}
            print(
                f"ratios (median): vs openssl pipeline pack {t_openssl / t_pack:.2f}x, snapshot "
                f"{t_openssl / t_snap:.2f}x; vs sha256sum pipeline pack {t_sha256sum / t_pack:.2f}x, "
                f"snapshot {t_sha256sum / t_snap:.2f}x",
                flush=True,
            )
            store.close()
            shutil.rmtree(store_dir, ignore_errors=True)
            store = clawstore.open(store_dir)
            if not a.skip_python:
                # Two configurations of the Python peer, once each (it is slow): zstandard as it comes
                # (ZstdCompressor(level=3): one thread, what upstream-style code writes) and tuned
                # with a worker per core (threads=2).
                py_out = work / "py.tar.zst"
                # A third run computes the diff_id too (hashlib over the tar stream), as a layer
                # needs: the same job as ours.
                for label, threads, diff_id in (
                    ("default", 0, False),
                    ("threads2", 2, False),
                    ("default_diff_id", 0, True),
                ):
                    t_py = timed(
                        lambda t=threads, d=diff_id: python_tarfile_zstd(vol, py_out, t, d), 1, rm(py_out)
                    )
                    py_out.unlink(missing_ok=True)
                    res[f"python_tarfile_zstandard_{label}_s"] = t_py
                    res[f"ratio_pack_vs_python_{label}"] = t_py / t_pack
                    print(
                        f"python tarfile+zstandard ({label}, threads={threads}, diff_id={diff_id}) "
                        f"{t_py:.2f}s ({t_py / t_pack:.2f}x)",
                        flush=True,
                    )

            # -- incremental after a 1% mutation ----------------------------------------------------
            mut = work / "vol-mut"
            sh(f"cp -a '{vol}' '{mut}'")
            base = volumes.snapshot(store, mut, "bench/mut:latest")
            subprocess.run(
                [sys.executable, MAKE_VOLUME, str(mut), "--mutate", "1"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            t0 = time.perf_counter()
            inc = volumes.snapshot(store, mut, "bench/mut:latest")
            t_inc = time.perf_counter() - t0
            assert inc.created_now and len(inc.layers) == 2 and inc.parent == base.digest
            res.update(
                incremental_s=t_inc,
                incremental_layer_bytes=inc.layers[-1].size,
                ratio_full_vs_incremental=t_snap / t_inc,
            )
            print(
                f"incremental after 1% mutate: {t_inc:.3f}s, layer {inc.layers[-1].size / 2**20:.1f} MiB "
                f"({t_snap / t_inc:.1f}x faster than the full snapshot)",
                flush=True,
            )
            inc_dest = work / "inc-restore"
            volumes.restore(store, "bench/mut:latest", inc_dest)
            assert tree_bytes(inc_dest) == tree_bytes(mut), "incremental restore differs from the source"
            # (inc_dest and mut go with `work` at the end)

        # -- restore ---------------------------------------------------------------------------
        # Fresh target directories every round and no deletions until the end: deleting 20k+
        # inodes right before a contender makes ext4's inode allocator (recently_deleted) slow
        # for whoever creates files next.
        volumes.snapshot(store, vol, "bench/vol:latest", full=True)
        if a.restore_dir:
            trash = Path(tempfile.mkdtemp(prefix="clawstore-restores-", dir=a.restore_dir))
            cleanup.append(trash)
        else:
            trash = work / "restores"
            trash.mkdir()
        res["restore_dir_fs"] = subprocess.run(
            ["stat", "-f", "-c", "%T", str(trash)], capture_output=True, text=True
        ).stdout.strip()

        def ours_restore(i: int) -> None:
            volumes.restore(store, "bench/vol:latest", trash / f"ours{i}")

        def tar_x(i: int) -> None:
            d = trash / f"tar{i}"
            d.mkdir()
            sh(f"zstd -dc '{pipe}' | tar -xf - -C '{d}'")

        rt = alternate({"restore": ours_restore, "tar -x": tar_x}, a.repeat)
        rt["ours"], rt["tar"] = rt.pop("restore"), rt.pop("tar -x")
        res["restore_cpu"] = {"ours": CPU["restore"], "tar": CPU["tar -x"]}
        print(
            f"restore CPU median: ours {statistics.median(CPU['restore']):.2f}s, "
            f"zstd|tar {statistics.median(CPU['tar -x']):.2f}s",
            flush=True,
        )
        assert tree_bytes(trash / "ours0") == (nfiles, nbytes)
        t_restore, t_tar = statistics.median(rt["ours"]), statistics.median(rt["tar"])
        res.update(
            restore_times=rt["ours"],
            zstd_tar_x_times=rt["tar"],
            restore_s=t_restore,
            zstd_tar_x_s=t_tar,
            ratio_restore_vs_tar=t_tar / t_restore,
            ratio_restore_vs_tar_best=min(rt["tar"]) / min(rt["ours"]),
        )
        print(
            f"restore: volumes.restore {summary(rt['ours'])} vs zstd -dc | tar -x {summary(rt['tar'])} "
            f"(median ratio {t_tar / t_restore:.2f}x, best {min(rt['tar']) / min(rt['ours']):.2f}x)",
            flush=True,
        )
        # (trees are removed with `work` at the end: deleting them now would slow what follows)

        store.close()

        # -- peak memory -----------------------------------------------------------------------
        out.unlink(missing_ok=True)
        pack_code = "from clawstore import _core; _core.pack_to_file(_core.scan_tree({!r}), {!r})"
        rss = peak_rss_of(pack_code.format(str(vol), str(out)))
        baseline = peak_rss_of("import clawstore")
        res.update(pack_peak_rss=rss, python_baseline_rss=baseline)
        print(f"peak RSS packing the volume: {rss / 2**20:.0f} MiB (python alone {baseline / 2**20:.0f} MiB)")
        out.unlink(missing_ok=True)
        if not a.skip_4g:
            big = work / "big4g"
            big.mkdir()
            for i in range(4):
                with open(big / f"sparse{i}", "wb") as f:
                    f.truncate(1 << 30)
            for i in range(2000):
                (big / f"s{i:04d}").write_bytes(os.urandom(2048))
            rss4 = peak_rss_of(pack_code.format(str(big), str(out)))
            res.update(pack_4g_peak_rss=rss4)
            print(
                f"peak RSS packing a 4 GiB tree (4 sparse 1 GiB files + 2,000 small): {rss4 / 2**20:.0f} MiB"
            )
            shutil.rmtree(big)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    _ = resource


if __name__ == "__main__":
    main()
