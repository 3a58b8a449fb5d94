"""Checkpoint benchmarks (issue 13), each against its peer in the same run, ratios reported.

    flock /work/wt/signals/bench.lock .venv/bin/python benches/bench_checkpoint.py [--repeat 3] [PARTS]

PARTS (default all): `small` (the 3,278-file small case, CLI end to end, `checkpoint create` vs
`volume snapshot` and `checkpoint restore` vs `volume restore`, local store and S3),
`requests` (S3 requests of a first checkpoint and of one after changing one file, store API and
hub session), `session` (the issue's 10,000-file session: files of 16-112 KiB, ~621 MiB, 100 of
them rewritten: second checkpoint vs first, time and bytes uploaded, store API on local and S3,
and through a hub session), `10k` (the same on `make_volume.py --many-files 10000`, 2 KB files,
after `make_volume.py --mutate 1`), `1g` (the 1 GiB `make_volume.py` default tree:
`checkpoints.create` vs `volumes.snapshot`, local store).

S3 parts run on a moto server this script starts, or with `--endpoint URL` on a server already
running (e.g. Ceph RGW from `scripts/s3/ceph-rgw-up`; credentials from the AWS_* variables).

Data trees are made once under --data (deterministic, read-only afterwards); the 10k tree is
copied per run because --mutate edits it. Prints `uptime` with every part.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import clawstore  # noqa: E402
from clawstore import checkpoints, volumes  # noqa: E402
from s3_server import REGION, MotoProcess, make_client, new_bucket, set_fake_credentials  # noqa: E402

MAKE_VOLUME = "/work/shared/bench/make_volume.py"
CLI = [sys.executable, "-m", "clawstore"]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def make_tree(path: Path, *args: str) -> Path:
    if not path.exists():
        tmp = path.with_name(path.name + ".making")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, MAKE_VOLUME, str(tmp), *args], check=True, stdout=subprocess.DEVNULL)
        tmp.rename(path)
    return path


#: CPU seconds (user + sys) of the last `timed` / `cli` call (this process or the child).
LAST_CPU = [0.0]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    c = time.process_time()
    t = time.perf_counter()
    r = fn()
    LAST_CPU[0] = time.process_time() - c
    return time.perf_counter() - t, r


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cli(env: dict[str, str], *args: str) -> float:
    c = _children_cpu()
    t = time.perf_counter()
    subprocess.run([*CLI, *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    LAST_CPU[0] = _children_cpu() - c
    return time.perf_counter() - t


def med(xs: list[float]) -> float:
    return statistics.median(xs)


class S3Server:
    """The S3 server the S3 parts use: moto started here, or `--endpoint` (a real server)."""

    def __init__(self, endpoint: str | None) -> None:
        self.moto = None if endpoint else MotoProcess()
        self.endpoint = endpoint or self.moto.endpoint  # type: ignore[union-attr]
        self.kind = "S3 server" if endpoint else "moto"

    def stop(self) -> None:
        if self.moto is not None:
            self.moto.stop()


@contextlib.contextmanager
def s3_url(server: S3Server) -> Iterator[str]:
    client = make_client(server.endpoint)
    bucket = new_bucket(client)
    try:
        yield f"s3://{bucket}/bench?endpoint_url={server.endpoint}&region={REGION}"
    finally:
        if server.moto is None:  # a real server keeps what it is given: empty the bucket
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            client.delete_bucket(Bucket=bucket)


class Requests:
    """Counts the HTTP requests (and request body bytes) an S3 store's client sends."""

    def __init__(self, store: clawstore.ArtifactStore) -> None:
        self.calls: list[tuple[str, str, int]] = []
        client = store.backend.client  # type: ignore[attr-defined]
        client.meta.events.register("before-send.s3", self._on_send)

    def _on_send(self, request: Any, **_kw: Any) -> None:
        body = request.body
        n = (
            len(body)
            if isinstance(body, bytes | bytearray)
            else int(request.headers.get("Content-Length", 0) or 0)
        )
        self.calls.append((request.method, request.url.split("?")[0].rsplit("/", 2)[-2], n))

    def take(self) -> list[tuple[str, str, int]]:
        out, self.calls = self.calls, []
        return out


def summary(calls: list[tuple[str, str, int]]) -> str:
    by: dict[str, int] = {}
    for method, _key, _n in calls:
        by[method] = by.get(method, 0) + 1
    return f"{len(calls)} requests ({', '.join(f'{k} {v}' for k, v in sorted(by.items()))})"


# -- parts ----------------------------------------------------------------------------------------


def part_small(args: argparse.Namespace, server: S3Server) -> None:
    tree = make_tree(args.data / "checkpoints-small", "--small-case")
    print(f"\n## small case: {tree} (3,278 files), CLI end to end, {args.repeat} runs, alternating")
    print(f"load: {uptime()}")
    outer = tempfile.TemporaryDirectory(dir=args.work)
    for backend in ("local", "s3"):
        times: dict[str, list[float]] = {
            "volume snapshot": [],
            "checkpoint create": [],
            "volume restore": [],
            "checkpoint restore": [],
        }
        cpus: dict[str, list[float]] = {k: [] for k in times}
        # Every run's output is kept until the part ends: on ext4 a file created within seconds
        # of a mass deletion makes the allocator skip the just-freed inodes one by one (0.1 s
        # of system time for this tree when the disk is quiet, up to 1.5 s right after an rm -r),
        # which would charge whichever contender follows a deletion.
        for rep in range(args.repeat):
            work = Path(tempfile.mkdtemp(dir=outer.name))
            env = dict(os.environ, CLAWSTORE_CATALOG=f"sqlite:///{work / 'catalog.sqlite'}")
            env.pop("CLAWSTORE_TOKEN", None)
            with contextlib.ExitStack() as stack:
                url = str(work / "store") if backend == "local" else stack.enter_context(s3_url(server))
                env["CLAWSTORE_URL"] = url
                pairs = [
                    ("volume snapshot", ("volume", "snapshot", str(tree), "vol/x:1")),
                    ("checkpoint create", ("checkpoint", "create", str(tree), "ck/x:1")),
                ]
                for name, cmd in pairs if rep % 2 == 0 else reversed(pairs):
                    times[name].append(cli(env, *cmd))
                    cpus[name].append(LAST_CPU[0])
                pairs = [
                    ("volume restore", ("volume", "restore", "vol/x:1", str(work / "vout"))),
                    ("checkpoint restore", ("checkpoint", "restore", "ck/x:1", str(work / "cout"))),
                ]
                for name, cmd in pairs if rep % 2 == 0 else reversed(pairs):
                    times[name].append(cli(env, *cmd))
                    cpus[name].append(LAST_CPU[0])
                same = subprocess.run(
                    ["diff", "-r", "--no-dereference", str(tree), str(work / "cout")], capture_output=True
                )
                assert same.returncode == 0, same.stdout[:500]
        c, v = med(times["checkpoint create"]), med(times["volume snapshot"])
        rc, rv = med(times["checkpoint restore"]), med(times["volume restore"])
        print(
            f"| {backend} | create {c:.2f} s vs snapshot {v:.2f} s: **{c / v:.2f}x** (target <= 1.5x) "
            f"| restore {rc:.2f} s vs volume restore {rv:.2f} s: **{rc / rv:.2f}x** (target <= 1.5x) |"
        )
        print(f"  all runs: { ({k: [round(x, 2) for x in xs] for k, xs in times.items()}) }")
        print(f"  CPU (user+sys, the CLI process): { ({k: round(med(xs), 2) for k, xs in cpus.items()}) }")
    # The CLI pays for the hub (SQLAlchemy, the catalog) on checkpoints only: the same through the API.
    api: dict[str, list[float]] = {"snapshot": [], "create": [], "vrestore": [], "crestore": []}
    for _rep in range(args.repeat):
        out = Path(tempfile.mkdtemp(dir=outer.name))
        s = clawstore.open(out / "store")
        api["snapshot"].append(timed(lambda: volumes.snapshot(s, tree, "vol/x:1"))[0])  # noqa: B023
        api["create"].append(timed(lambda: checkpoints.create(s, "ck/x:1", tree))[0])  # noqa: B023
        api["vrestore"].append(timed(lambda: volumes.restore(s, "vol/x:1", out / "v"))[0])  # noqa: B023
        api["crestore"].append(timed(lambda: checkpoints.restore(s, "ck/x:1", out / "c"))[0])  # noqa: B023
    outer.cleanup()
    c, v, rc, rv = (med(api[k]) for k in ("create", "snapshot", "crestore", "vrestore"))
    print(
        f"| local, API (no CLI, no hub) | create {c:.3f} s vs snapshot {v:.3f} s: {c / v:.2f}x "
        f"| restore {rc:.3f} s vs {rv:.3f} s: {rc / rv:.2f}x |"
    )


def part_requests(args: argparse.Namespace, server: S3Server) -> None:
    tree = make_tree(args.data / "checkpoints-small", "--small-case")
    print(f"\n## S3 requests ({server.kind}), small case: a first checkpoint, then one after changing 1 file")
    print(f"load: {uptime()}")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(tree, src, symlinks=True)
        for via in ("store", "hub session"):
            with s3_url(server) as url:
                store = clawstore.open(url)
                count = Requests(store)
                hub = None
                if via == "hub session":
                    from clawstore.hub import Hub, Principal

                    hub = Hub(store, f"sqlite:///{Path(tmp) / 'catalog.sqlite'}")

                def run(store: clawstore.ArtifactStore = store, hub: Any = hub, src: Path = src) -> Any:
                    if hub is None:
                        return checkpoints.create(store, "ck/r:latest", src)
                    with hub.session(Principal.local_admin(), "ck/r", kind="checkpoint") as s:
                        return checkpoints.create(s, "ck/r:latest", src)

                count.take()
                first = run()
                c1 = count.take()
                time.sleep(0.2)
                victims = sorted(src.rglob("*.py"))
                victims[0].write_bytes(victims[0].read_bytes() + b"# one change\n")
                getattr(
                    checkpoints, "forget_recent", lambda: None
                )()  # as a new process (the CLI): the parent comes from S3
                second = run()
                c2 = count.take()
                victims[1].write_bytes(victims[1].read_bytes() + b"# one change\n")
                run()  # the same process again (a hub): its parent is the checkpoint it just made
                c3 = count.take()
                large = sum(1 for e in checkpoints.load(store, first.digest).files() if "k" not in e)
                print(
                    f"| {via} | first: {summary(c1)}, {large} files over the threshold "
                    f"(target <= 10 + {large}) | after 1 change: {summary(c2)} (target <= 8); "
                    f"same process: {summary(c3)} "
                    f"| bytes sent {first.uploaded_bytes} -> {second.uploaded_bytes} |"
                )
                if args.verbose:
                    for c in (c1, c2, c3):
                        print("   ", c)
                if hub is not None:
                    hub.close()


def make_session(path: Path, n: int = 10_000, seed: int = 42) -> Path:
    """The issue's 10,000-file session: random (incompressible) files of 16-112 KiB, 100 per
    directory, mtimes an hour old; deterministic for a seed. Made once, read-only afterwards."""
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".making")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(seed)
    old = time.time() - 3600
    for i in range(n):
        p = tmp / f"dir{i % 100:02d}" / f"file{i:05d}.dat"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(16 * 1024, 112 * 1024)))
        os.utime(p, (old, old))
    tmp.rename(path)
    return path


def rewrite_one_percent(src: Path) -> None:
    """1% of the session's files rewritten: same size, new random content, new mtime."""
    rng = random.Random(7)
    files = sorted(src.rglob("*.dat"))
    for p in rng.sample(files, len(files) // 100):
        p.write_bytes(rng.randbytes(p.stat().st_size))


def mutate_one(src: Path) -> None:
    subprocess.run(
        [sys.executable, MAKE_VOLUME, str(src), "--mutate", "1"], check=True, stdout=subprocess.DEVNULL
    )


VIAS = ("local store", "local store, new process", "local hub session", "s3 store", "s3 hub session")


def incremental(
    args: argparse.Namespace, server: S3Server, title: str, pristine: Path, mutate: Callable[[Path], None]
) -> None:
    """Second checkpoint (after `mutate`) vs the first, time and bytes, on every path."""
    print(f"\n## {title}: second checkpoint vs first (S3: {server.kind} {server.endpoint})")
    print(f"load: {uptime()}")
    vias = args.vias.split(",") if args.vias else VIAS
    for via in vias:
        t1s, t2s, b1s, b2s, c1s, c2s = [], [], [], [], [], []
        for _rep in range(args.repeat):
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                src = Path(tmp) / "src"
                shutil.copytree(pristine, src, symlinks=True)
                # A session's files were not all written in the 100 ms before its checkpoint:
                # without this, the files copied last are racy for the first checkpoint and
                # the second re-reads them (hundreds on a loaded machine), which is the copy's
                # doing, not the session's.
                time.sleep(0.2)
                with contextlib.ExitStack() as stack:
                    url = (
                        stack.enter_context(s3_url(server))
                        if via.startswith("s3")
                        else str(Path(tmp) / "store")
                    )
                    store = clawstore.open(url)
                    hub = None
                    if "hub" in via:
                        from clawstore.hub import Hub, Principal

                        hub = Hub(store, f"sqlite:///{Path(tmp) / 'catalog.sqlite'}")

                    def run(store: clawstore.ArtifactStore = store, hub: Any = hub, src: Path = src) -> Any:
                        if hub is None:
                            return checkpoints.create(store, "ck/t:latest", src)
                        with hub.session(Principal.local_admin(), "ck/t", kind="checkpoint") as s:
                            return checkpoints.create(s, "ck/t:latest", src)

                    checkpoints.forget_recent()
                    t1, r1 = timed(run)
                    c1s.append(LAST_CPU[0])
                    time.sleep(0.2)  # past the racy window of the first checkpoint
                    mutate(src)
                    if "new process" in via:
                        checkpoints.forget_recent()  # the parent's index read from the store
                    t2, r2 = timed(run)
                    c2s.append(LAST_CPU[0])
                    assert r2.reused_files > 0.95 * r2.files, (r2.reused_files, r2.files)
                    t1s.append(t1)
                    t2s.append(t2)
                    b1s.append(r1.uploaded_bytes)
                    b2s.append(r2.uploaded_bytes)
                    if hub is not None:
                        hub.close()
        t1, t2 = med(t1s), med(t2s)
        b1, b2 = med(b1s), med(b2s)
        c1, c2 = med(c1s), med(c2s)
        print(
            f"| {via} | first {t1:.2f} s (CPU {c1:.2f} s), {b1 / 1e6:.2f} MB "
            f"| second {t2:.3f} s (CPU {c2:.3f} s), {b2 / 1e3:.1f} kB | "
            f"**{t1 / t2:.1f}x faster** (CPU {c1 / c2:.1f}x; target >= 20x), "
            f"**{b1 / b2:.0f}x fewer bytes** (target >= 50x) | runs {[round(x, 3) for x in t1s + t2s]} |"
        )


def part_session(args: argparse.Namespace, server: S3Server) -> None:
    pristine = make_session(args.data / "checkpoints-session-10k")
    incremental(
        args,
        server,
        "the issue's session: 10,000 files of 16-112 KiB, 100 rewritten",
        pristine,
        rewrite_one_percent,
    )


def part_10k(args: argparse.Namespace, server: S3Server) -> None:
    pristine = make_tree(args.data / "checkpoints-10k", "--many-files", "10000")
    incremental(args, server, "10,000 files of ~2 KB, make_volume.py --mutate 1", pristine, mutate_one)


def part_1g(args: argparse.Namespace, server: S3Server) -> None:
    tree = Path(args.big) if args.big else make_tree(args.data / "checkpoints-1g")
    print(f"\n## 1 GiB tree ({tree}): checkpoints.create vs volumes.snapshot, local store, fresh each run")
    print(f"load: {uptime()}")
    ts: dict[str, list[float]] = {"snapshot": [], "create": []}
    for rep in range(args.repeat):
        order = ["snapshot", "create"] if rep % 2 == 0 else ["create", "snapshot"]
        for what in order:
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                s = clawstore.open(Path(tmp) / "store")
                if what == "snapshot":
                    ts[what].append(timed(lambda: volumes.snapshot(s, tree, "vol/x:1"))[0])  # noqa: B023
                else:
                    ts[what].append(timed(lambda: checkpoints.create(s, "ck/x:1", tree))[0])  # noqa: B023
    c, v = med(ts["create"]), med(ts["snapshot"])
    print(
        f"| 1 GiB | create {c:.2f} s vs snapshot {v:.2f} s: **{c / v:.2f}x** (target <= 1.3x) | runs {ts} |"
    )


PARTS = {
    "small": part_small,
    "requests": part_requests,
    "session": part_session,
    "10k": part_10k,
    "1g": part_1g,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", choices=[*PARTS, []], help="default: all")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("/work/wt/data"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument(
        "--big", default="/work/wt/data/volumes-1g", help="the 1 GiB tree (make_volume.py default)"
    )
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument(
        "--endpoint", default=None, help="an S3 server already running instead of moto (AWS_* credentials)"
    )
    ap.add_argument(
        "--vias",
        default=None,
        help="comma-separated subset of the session/10k rows (e.g. 's3 store,s3 hub session')",
    )
    args = ap.parse_args()
    if args.endpoint is None:
        set_fake_credentials()
    server = S3Server(args.endpoint)
    try:
        for name in args.parts or list(PARTS):
            PARTS[name](args, server)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
