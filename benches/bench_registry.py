"""`clawstore serve` against Debian's docker-registry (CNCF distribution 2.8), same client, same run.

    flock /work/wt/signals/bench.lock python benches/bench_registry.py \\
        [--size 1GiB] [--layers 8] [--rounds 2] [--big 4GiB] [--blobs 256] [--blob-size 4KiB] \\
        [--connections 32] [--duration 10] [--s3] [--s3-size 1GiB] [--s3-modes proxy,redirect]
        [--only push,small,memory]

- push / pull: `skopeo copy` of an OCI layout (`--size` in `--layers` uncompressed tar layers of
  random bytes, built here with tarfile + hashlib, kept under `--data`) to a fresh server and back
  into a fresh layout; every round starts each server on empty storage (otherwise skopeo finds
  the blobs and skips them); servers alternate and the order rotates each round. Wall time,
  skopeo's CPU (rusage of the child) and the server's CPU (psutil, children included).
- small: `--blobs` blobs of `--blob-size` pushed with httpx, then `wrk` with `--connections`
  connections for `--duration` s GETting random ones (anonymous pull on both): requests/s; any
  non-2xx response is reported. Two rounds, alternating.
- memory: the server's peak RSS (VmHWM of /proc/PID/status, the max over its process tree) after
  a skopeo push of a `--big` image in 4 layers, on a fresh server.
- --s3: push / pull on moto's S3 server (tests/s3_server.py, its own process) for both registries
  (distribution's s3 driver pointed at moto; clawstore on s3:// with a SQLite catalog).
  `--s3-modes proxy` streams blob bytes through both registries (distribution `redirect:
  disable`); `redirect` has both answer blob GETs with a 307 to a presigned URL (clawstore
  `--blob-redirect`, distribution's default), so skopeo reads the layers from S3 itself.

Prints Markdown tables. Both servers write to the same disk; the client is the same binary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "registry_clients"))

from registry_servers import (  # noqa: E402
    ClawstoreServer,
    DistributionServer,
    RegistryServer,
    S3Target,
)
from s3_server import REGION, MotoProcess, make_client, new_bucket, set_fake_credentials, store_url  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[unit])


def human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# -- the image ----------------------------------------------------------------------------------


class HashingWriter:
    """A write-only file object that hashes what goes through it."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()


class RandomReader:
    """`size` random bytes as a file object (for tarfile.addfile)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def make_layout(root: Path, total: int, layers: int) -> Path:
    """An OCI layout with one image `bench` of `layers` tar layers of random bytes; reused when
    it exists (built under a .tmp name and renamed)."""
    if (root / "index.json").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = tmp / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    descs = []
    for i in range(layers):
        part = tmp / "blobs" / f"layer{i}.partial"
        w = HashingWriter(part)
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            info = tarfile.TarInfo(f"data/layer{i}.bin")
            info.size = total // layers
            info.mtime = 1_700_000_000
            tar.addfile(info, RandomReader(info.size))
        w.close()
        digest = w.h.hexdigest()
        part.rename(blobs / digest)
        descs.append({"mediaType": LAYER_TAR, "digest": f"sha256:{digest}", "size": w.size})

    def add(data: bytes) -> dict[str, Any]:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": f"sha256:{d}", "size": len(data)}

    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
    }
    cfg = dict(add(canonical(config)), mediaType="application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": descs,
    }
    m = dict(add(canonical(manifest)), mediaType=manifest["mediaType"])
    m["annotations"] = {"org.opencontainers.image.ref.name": "bench"}
    (tmp / "index.json").write_bytes(canonical({"schemaVersion": 2, "manifests": [m]}))
    (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    tmp.rename(root)
    return root


# -- measuring ----------------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """user+sys CPU seconds of `pid` and its live children."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_hwm(pid: int) -> int:
    """The largest VmHWM (peak resident set) in `pid`'s process tree, bytes."""
    best = 0
    try:
        p = psutil.Process(pid)
        pids = [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.NoSuchProcess:
        return 0
    for q in pids:
        try:
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]) * 1024)
        except OSError:
            pass
    return best


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) for a command that must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err_holder: list[bytes] = []
    reader = threading.Thread(target=lambda: err_holder.append(proc.stderr.read()))  # type: ignore[union-attr]
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {b''.join(err_holder).decode()[-2000:]}"
        )
    return wall, usage.ru_utime + usage.ru_stime


# -- servers ------------------------------------------------------------------------------------


class Contender:
    """How to start one kind of registry on fresh storage."""

    def __init__(
        self,
        kind: str,
        base: Path,
        s3_endpoint: str | None = None,
        workers: int = 1,
        redirect: bool = False,
    ) -> None:
        self.workers = workers
        self.redirect = redirect
        self.kind = kind
        self.base = base
        self.s3_endpoint = s3_endpoint
        self.bucket: str | None = None

    def start(self) -> RegistryServer:
        workdir = self.base / f"{self.kind}-{uuid.uuid4().hex[:8]}"
        s3 = None
        if self.s3_endpoint:
            self.bucket = new_bucket(make_client(self.s3_endpoint))
            s3 = S3Target(self.s3_endpoint, self.bucket, REGION, "testing", "testing")
        if self.kind == "distribution":
            server: RegistryServer = DistributionServer(workdir, None, s3, redirect=self.redirect)
        elif s3 is None:
            server = ClawstoreServer(workdir, (workdir / "store").as_uri(), extra_args=self.serve_args())
        else:
            server = ClawstoreServer(
                workdir,
                store_url(s3.endpoint, s3.bucket),
                catalog=f"sqlite:///{workdir / 'catalog.sqlite'}",
                extra_args=self.serve_args(),
            )
        return server.start()

    def serve_args(self) -> list[str]:
        args = ["--workers", str(self.workers)] if self.workers != 1 else []
        if self.redirect:
            args += ["--blob-redirect", "15m"]
        return args

    def cleanup(self, server: RegistryServer) -> None:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
        if self.bucket and self.s3_endpoint:
            client = make_client(self.s3_endpoint)
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
            for up in client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []):
                client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
            client.delete_bucket(Bucket=self.bucket)
            self.bucket = None


def push_pull(contenders: list[Contender], layout: Path, rounds: int, scratch: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {c.kind: [] for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for c in order:
            server = c.start()
            try:
                ref = f"docker://{server.host}/bench/image:v1"
                cpu0 = tree_cpu(server.pid)
                push_wall, push_client = run_timed(
                    [
                        "skopeo",
                        "copy",
                        "--preserve-digests",
                        "--dest-tls-verify=false",
                        f"oci:{layout}:bench",
                        ref,
                    ]
                )
                push_server = tree_cpu(server.pid) - cpu0
                hwm = tree_hwm(server.pid)
                dst = scratch / f"pull-{uuid.uuid4().hex[:8]}"
                cpu0 = tree_cpu(server.pid)
                pull_wall, pull_client = run_timed(
                    [
                        "skopeo",
                        "copy",
                        "--preserve-digests",
                        "--src-tls-verify=false",
                        ref,
                        f"oci:{dst}:bench",
                    ]
                )
                pull_server = tree_cpu(server.pid) - cpu0
                same = (
                    json.loads((dst / "index.json").read_text())["manifests"][0]["digest"]
                    == json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
                )
                shutil.rmtree(dst, ignore_errors=True)
            finally:
                c.cleanup(server)
            row = {
                "push": push_wall,
                "push_client_cpu": push_client,
                "push_server_cpu": push_server,
                "pull": pull_wall,
                "pull_client_cpu": pull_client,
                "pull_server_cpu": pull_server,
                "hwm": hwm,
                "same_digest": same,
            }
            results[c.kind].append(row)
            print(
                f"  round {r + 1} {c.kind}: "
                + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                file=sys.stderr,
                flush=True,
            )
    return results


def small_blobs(
    contenders: list[Contender],
    count: int,
    size: int,
    connections: int,
    duration: int,
    rounds: int,
    scratch: Path,
) -> dict[str, list[dict]]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (scripts/setup.sh installs it from Debian)")
    results: dict[str, list[dict]] = {c.kind: [] for c in contenders}
    blobs = [os.urandom(size) for _ in range(count)]
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for c in order:
            server = c.start()
            try:
                with httpx.Client(base_url=server.url, timeout=60) as client:
                    for data, digest in zip(blobs, digests, strict=True):
                        start = client.post("/v2/bench/small/blobs/uploads/")
                        assert start.status_code == 202, start.text
                        loc = start.headers["Location"]
                        sep = "&" if "?" in loc else "?"
                        put = client.put(
                            f"{loc}{sep}digest={digest}",
                            content=data,
                            headers={"Content-Type": "application/octet-stream"},
                        )
                        assert put.status_code == 201, put.text
                    check = client.get(f"/v2/bench/small/blobs/{digests[0]}")
                    assert check.status_code == 200 and check.content == blobs[0]
                script = scratch / "paths.lua"
                paths = ",\n".join(f'"/v2/bench/small/blobs/{d}"' for d in digests)
                script.write_text(
                    f"local paths = {{\n{paths}\n}}\n"
                    "math.randomseed(42)\n"
                    "request = function()\n"
                    "  return wrk.format('GET', paths[math.random(#paths)])\n"
                    "end\n"
                )
                cpu0 = tree_cpu(server.pid)
                out = subprocess.run(
                    [
                        "wrk",
                        "-t2",
                        f"-c{connections}",
                        f"-d{duration}s",
                        "--timeout",
                        "10s",
                        "-s",
                        str(script),
                        server.url,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                server_cpu = tree_cpu(server.pid) - cpu0
            finally:
                c.cleanup(server)
            rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
            non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
            errors = re.search(r"Socket errors:.*", out)
            latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
            row = {
                "rps": rps,
                "non2xx": int(non2xx.group(1)) if non2xx else 0,
                "socket_errors": errors.group(0) if errors else "",
                "latency_avg": latency.group(1) if latency else "?",
                "latency_max": latency.group(3) if latency else "?",
                "server_cpu": server_cpu,
            }
            results[c.kind].append(row)
            print(f"  round {r + 1} {c.kind}: {row}", file=sys.stderr, flush=True)
    return results


def best(rows: list[dict], key: str, high: bool = False) -> float:
    values = [r[key] for r in rows]
    return max(values) if high else min(values)


def median(rows: list[dict], key: str) -> float:
    values = sorted(r[key] for r in rows)
    return (
        values[len(values) // 2]
        if len(values) % 2
        else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    )


def report_push_pull(title: str, res: dict[str, list[dict]]) -> None:
    d, c = res["distribution"], res["clawstore"]
    print(f"\n### {title}\n")
    print(
        "| measure | clawstore | distribution 2.8 | ratio (distribution / clawstore; >1: clawstore faster) |"
    )
    print("|---|---:|---:|---:|")
    for op in ("push", "pull"):
        print(
            f"| skopeo {op}, best wall (median) | {best(c, op):.2f} s ({median(c, op):.2f}) | "
            f"{best(d, op):.2f} s ({median(d, op):.2f}) | **{best(d, op) / best(c, op):.2f}x** "
            f"({median(d, op) / median(c, op):.2f}x) |"
        )
        print(
            f"| {op}: server CPU (median) | {median(c, op + '_server_cpu'):.2f} s | "
            f"{median(d, op + '_server_cpu'):.2f} s | |"
        )
        print(
            f"| {op}: skopeo CPU (median) | {median(c, op + '_client_cpu'):.2f} s | "
            f"{median(d, op + '_client_cpu'):.2f} s | |"
        )
    print(
        f"| server peak RSS after push (max) | {human(max(r['hwm'] for r in c))} | "
        f"{human(max(r['hwm'] for r in d))} | |"
    )
    print(
        f"| pulled image digest = pushed | {all(r['same_digest'] for r in c)} | "
        f"{all(r['same_digest'] for r in d)} | |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=GiB)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--big", type=parse_size, default=4 * GiB)
    ap.add_argument("--blobs", type=int, default=256)
    ap.add_argument("--blob-size", type=parse_size, default=4096)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--s3", action="store_true", help="also push / pull on moto's S3 server")
    ap.add_argument("--s3-size", type=parse_size, default=GiB)
    ap.add_argument("--s3-rounds", type=int, default=1)
    ap.add_argument(
        "--s3-modes",
        default="proxy",
        help="comma list: proxy (both registries stream blob bytes), redirect (both answer blob "
        "GETs with a redirect to a presigned URL)",
    )
    ap.add_argument("--only", default="push,small,memory", help="comma list of push, small, memory")
    ap.add_argument("--data", type=Path, default=Path("/work/wt/data"))
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="clawstore serve --workers (default: the core count; distribution uses every core too)",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    if shutil.which("skopeo") is None:
        raise SystemExit("skopeo is not installed (scripts/setup.sh installs it)")

    scratch = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=args.data if args.data.exists() else None))
    contenders = [Contender("clawstore", scratch, workers=args.workers), Contender("distribution", scratch)]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    print(
        f"bench_registry: {started}, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    print(
        f"# bench_registry ({started}; load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})"
    )
    try:
        if "push" in only:
            layout = make_layout(
                args.data / f"registry-image-{human(args.size).replace(' ', '')}-{args.layers}l",
                args.size,
                args.layers,
            )
            res = push_pull(contenders, layout, args.rounds, scratch)
            report_push_pull(
                f"skopeo push / pull, {human(args.size)} in {args.layers} layers, local "
                f"filesystem, {args.rounds} rounds",
                res,
            )
        if "small" in only:
            res = small_blobs(
                contenders, args.blobs, args.blob_size, args.connections, args.duration, 2, scratch
            )
            c, d = res["clawstore"], res["distribution"]
            print(
                f"\n### {args.connections} concurrent GETs of {args.blobs} blobs of {args.blob_size} B "
                f"(wrk -t2 -c{args.connections} -d{args.duration}s, 2 rounds)\n"
            )
            print("| measure | clawstore | distribution 2.8 | ratio (clawstore / distribution) |")
            print("|---|---:|---:|---:|")
            print(
                f"| requests/s, best (median) | {best(c, 'rps', True):.0f} ({median(c, 'rps'):.0f}) | "
                f"{best(d, 'rps', True):.0f} ({median(d, 'rps'):.0f}) | "
                f"**{best(c, 'rps', True) / best(d, 'rps', True):.2f}x** "
                f"({median(c, 'rps') / median(d, 'rps'):.2f}x) |"
            )
            print(
                f"| latency avg / max (last round) | {c[-1]['latency_avg']} / {c[-1]['latency_max']} | "
                f"{d[-1]['latency_avg']} / {d[-1]['latency_max']} | |"
            )
            per_k = {
                k: [{"x": r["server_cpu"] / (r["rps"] * args.duration) * 1000} for r in v]
                for k, v in res.items()
            }
            print(
                f"| server CPU s per 1000 requests (median) | {median(per_k['clawstore'], 'x'):.3f} | "
                f"{median(per_k['distribution'], 'x'):.3f} | |"
            )
            print(
                f"| non-2xx responses / socket errors | {sum(r['non2xx'] for r in c)} / "
                f"{c[-1]['socket_errors'] or 'none'} | {sum(r['non2xx'] for r in d)} / "
                f"{d[-1]['socket_errors'] or 'none'} | |"
            )
        if "memory" in only:
            layout = make_layout(
                args.data / f"registry-image-{human(args.big).replace(' ', '')}-4l", args.big, 4
            )
            res = push_pull(contenders, layout, 1, scratch)
            c, d = res["clawstore"], res["distribution"]
            print(f"\n### server peak RSS (VmHWM) while skopeo pushes {human(args.big)} in 4 layers\n")
            print("| measure | clawstore | distribution 2.8 |")
            print("|---|---:|---:|")
            print(f"| peak RSS | **{human(c[0]['hwm'])}** | {human(d[0]['hwm'])} |")
            print(
                f"| push wall / server CPU | {c[0]['push']:.1f} s / {c[0]['push_server_cpu']:.1f} s | "
                f"{d[0]['push']:.1f} s / {d[0]['push_server_cpu']:.1f} s |"
            )
            print(
                f"| pull wall / server CPU | {c[0]['pull']:.1f} s / {c[0]['pull_server_cpu']:.1f} s | "
                f"{d[0]['pull']:.1f} s / {d[0]['pull_server_cpu']:.1f} s |"
            )
        if args.s3:
            set_fake_credentials()
            moto = MotoProcess()
            try:
                modes = [m for m in args.s3_modes.split(",") if m]
                for mode in modes:
                    if mode not in ("proxy", "redirect"):
                        raise SystemExit(f"--s3-modes: unknown mode {mode!r} (proxy, redirect)")
                    redirect = mode == "redirect"
                    s3_contenders = [
                        Contender(
                            "clawstore", scratch, moto.endpoint, workers=args.workers, redirect=redirect
                        ),
                        Contender("distribution", scratch, moto.endpoint, redirect=redirect),
                    ]
                    layout = make_layout(
                        args.data / f"registry-image-{human(args.s3_size).replace(' ', '')}-{args.layers}l",
                        args.s3_size,
                        args.layers,
                    )
                    res = push_pull(s3_contenders, layout, args.s3_rounds, scratch)
                    how = (
                        "blob GETs redirected to presigned S3 URLs (clawstore `--blob-redirect 15m`, "
                        "distribution `redirect` on)"
                        if redirect
                        else "blob bytes proxied by the registry (distribution `redirect: disable`)"
                    )
                    report_push_pull(
                        f"skopeo push / pull, {human(args.s3_size)} in {args.layers} layers, S3 "
                        f"(moto, its own process), {how}, {args.s3_rounds} rounds",
                        res,
                    )
            finally:
                moto.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load = os.getloadavg()
    print(f"\n(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})")


if __name__ == "__main__":
    main()
