"""S3 backend throughput vs boto3's transfer manager, against one moto server in the same run.

    python benches/bench_s3.py [--size 1GiB] [--repeat 3] [--ranged] [--endpoint URL]

Upload: `ArtifactStore.put_blob(path)` (hashes the file, uploads parts staged by the Rust core
with a per-part checksum, verifies the whole digest before completing) vs `boto3 upload_file`
with the default TransferConfig (8 MiB x 10, CRC32 as botocore sends by default), a tuned one
(clawstore's part size and concurrency) and the tuned one without checksums. Download:
`ArtifactStore.get_blob_to_path` (verifies the digest; single GET, and ranged with --ranged) vs
a streamed `get_object`, `download_file` tuned to one GET, and with --ranged `download_file`
default and ranged. boto3 verifies nothing. Contenders alternate, order rotating each round;
best and median are printed. Peak RSS growth of this process is sampled during each operation.

The moto server runs in its own process (tests/s3_server.py), so it does not share our GIL; it is
in-memory and single-process Python, so absolute figures are the server's; the ratios compare
clients. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import clawstore  # noqa: E402
from clawstore.backends.s3 import parse_size  # noqa: E402
from s3_server import REGION, MotoProcess, make_client, new_bucket, set_fake_credentials  # noqa: E402

MiB = 1 << 20


class PeakRSS:
    """Samples this process's RSS every 5 ms; `growth` is the peak minus the start."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def make_file(path: Path, size: int) -> None:
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        left, i = size, 0
        while left:
            chunk = block[: min(left, len(block))]
            # a different first 8 bytes per block: no two blocks alike
            f.write(i.to_bytes(8, "little") + chunk[8:])
            left -= len(chunk)
            i += 1


#: Per contender: wall times, client CPU times (user + system of this process, all threads),
#: peak RSS growth.
Results = dict[str, tuple[list[float], list[float], int]]


def rounds(
    contenders: dict[str, Callable[[], Any]],
    repeat: int,
    before: dict[str, Callable[[], None]] | None = None,
) -> Results:
    """Run every contender once per round, rotating the order each round (the machine's state
    drifts: page cache, writeback, moto's heap); wall and CPU times and the peak RSS growth of
    each."""
    names = list(contenders)
    out: Results = {n: ([], [], 0) for n in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if before and name in before:
                before[name]()
            with PeakRSS() as rss:
                cpu = os.times()
                t = time.perf_counter()
                contenders[name]()
                dt = time.perf_counter() - t
                after = os.times()
            dcpu = (after.user + after.system) - (cpu.user + cpu.system)
            times, cpus, mem = out[name]
            times.append(dt)
            cpus.append(dcpu)
            out[name] = (times, cpus, max(mem, rss.growth))
            print(f"  {name}: {dt:.2f} s, CPU {dcpu:.2f} s", file=sys.stderr, flush=True)
    return out


def table(title: str, res: Results, size: int) -> None:
    print(f"\n{title}\n")
    print(
        "| operation | best s | median s | MiB/s (best) | client CPU s/GiB (median) | peak RSS growth (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, (times, cpus, mem) in res.items():
        best = min(times)
        print(
            f"| {name} | {best:.2f} | {statistics.median(times):.2f} "
            f"| {size / MiB / best:.0f} | {statistics.median(cpus) * (1 << 30) / size:.2f} "
            f"| {mem / MiB:.0f} |"
        )


def ratio(res: Results, ours: str, what: str) -> None:
    peers = {n: v for n, v in res.items() if n.startswith("boto3")}
    if not peers or ours not in res:
        return
    best_peer = min(peers, key=lambda n: min(peers[n][0]))
    med_peer = min(peers, key=lambda n: statistics.median(peers[n][0]))
    t = res[ours][0]
    print(
        f"\n{what}: best boto3 ({best_peer}) {min(peers[best_peer][0]):.2f} s / clawstore "
        f"{min(t):.2f} s = **{min(peers[best_peer][0]) / min(t):.2f}x** (best of each); medians: "
        f"{statistics.median(peers[med_peer][0]) / statistics.median(t):.2f}x; client CPU (medians) "
        f"{statistics.median(res[ours][1]):.2f} s vs {statistics.median(peers[best_peer][1]):.2f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part-size", default=None, help="clawstore part_size (default: the backend's)")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--only", choices=("upload", "download"), default=None)
    ap.add_argument("--part-checksum", choices=("auto", "crc32", "md5", "sha256", "signed"), default=None)
    ap.add_argument(
        "--compare-checksum",
        choices=("crc32", "md5", "sha256", "signed"),
        default=None,
        help="also time put_blob(path) with this part_checksum (e.g. md5: the previous default on RGW)",
    )
    ap.add_argument(
        "--endpoint",
        default=None,
        help="an S3 server already running (credentials from AWS_* variables) instead of moto",
    )
    ap.add_argument(
        "--ranged",
        action="store_true",
        help="also time ranged downloads once each (moto loads the whole object per range: minutes)",
    )
    args = ap.parse_args()
    size = parse_size(args.size)

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    server: MotoProcess | None = None
    if args.endpoint:
        endpoint, kind = args.endpoint, "server"
    else:
        set_fake_credentials()
        server = MotoProcess()
        endpoint, kind = server.endpoint, "moto server"
    try:
        client = make_client(endpoint)  # tuned: no CRC32 trailers (clawstore sends Content-MD5)
        default_client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )
        bucket = new_bucket(client)
        url = f"s3://{bucket}/bench?endpoint_url={endpoint}&region={REGION}"
        overrides: dict[str, Any] = {}
        if args.part_size:
            overrides["part_size"] = overrides["multipart_threshold"] = parse_size(args.part_size)
        if args.part_checksum:
            overrides["part_checksum"] = args.part_checksum
        if args.concurrency:
            overrides["concurrency"] = overrides["download_concurrency"] = args.concurrency
        store = clawstore.open(url, **overrides)
        opts = store.backend.options  # type: ignore[attr-defined]
        tuned = TransferConfig(
            multipart_threshold=opts.multipart_threshold,
            multipart_chunksize=opts.part_size,
            max_concurrency=opts.concurrency,
        )
        default = TransferConfig()
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as td:
            src = Path(td) / "blob"
            make_file(src, size)
            digest = clawstore.digest_file(src)

            def drop_blob() -> None:
                if store.has_blob(digest):
                    store.delete_blob(digest)

            print(
                f"{size / MiB:.0f} MiB blob, {kind} {endpoint}, clawstore part_size "
                f"{opts.part_size // MiB} MiB, part checksum {store.backend.part_checksum}, "  # type: ignore[attr-defined]
                f"concurrency {opts.concurrency}, {args.repeat} rounds, {os.cpu_count()} CPUs, "
                f"load {os.getloadavg()[0]:.2f}"
            )
            ours_up = "clawstore put_blob(path) (hashes, verifies)"
            ours_extra: dict[str, Callable[[], Any]] = {}
            if args.compare_checksum:
                other = clawstore.open(url, **{**overrides, "part_checksum": args.compare_checksum})
                ours_extra[f"clawstore put_blob(path), part_checksum={args.compare_checksum}"] = lambda: (
                    other.put_blob(src)
                )
            if args.only in (None, "upload"):
                up = rounds(
                    {
                        ours_up: lambda: store.put_blob(src),
                        **ours_extra,
                        "boto3 upload_file, default TransferConfig (8 MiB x 10, CRC32)": lambda: (
                            default_client.upload_file(str(src), bucket, "b3/default", Config=default)
                        ),
                        "boto3 upload_file, tuned (clawstore's part size and concurrency, CRC32)": lambda: (
                            default_client.upload_file(str(src), bucket, "b3/tuned", Config=tuned)
                        ),
                        "boto3 upload_file, tuned, no checksums": lambda: client.upload_file(
                            str(src), bucket, "b3/plain", Config=tuned
                        ),
                    },
                    args.repeat,
                    dict.fromkeys([ours_up, *ours_extra], drop_blob),
                )
                table("Upload", up, size)
                ratio(up, ours_up, "upload")
                limit = opts.concurrency * opts.part_size + 64 * MiB
                print(
                    f"clawstore upload peak RSS growth {up[ours_up][2] / MiB:.0f} MiB "
                    f"(bound {limit / MiB:.0f} MiB)"
                )
                for key in ("b3/default", "b3/tuned", "b3/plain"):
                    client.delete_object(Bucket=bucket, Key=key)
            if args.only == "upload":
                store.close()
                return
            if not store.has_blob(digest):
                store.put_blob(src)
            client.copy_object(
                Bucket=bucket,
                Key="b3/obj",
                CopySource={"Bucket": bucket, "Key": store.backend.layout.blob(digest)},  # type: ignore[attr-defined]
            )
            out = Path(td) / "out"

            def rm_out() -> None:
                out.unlink(missing_ok=True)

            single_store = clawstore.ArtifactStore(store.backend.with_options(download_concurrency=1))  # type: ignore[attr-defined]

            def single_get() -> None:
                body = client.get_object(Bucket=bucket, Key="b3/obj")["Body"]
                with open(out, "wb") as f:
                    for chunk in body.iter_chunks(4 * MiB):
                        f.write(chunk)

            one_get = TransferConfig(multipart_threshold=size + 1)
            ours_down = "clawstore get_blob_to_path, single GET (verified)"
            fast: dict[str, Callable[[], Any]] = {
                ours_down: lambda: single_store.get_blob_to_path(digest, out),
                "boto3 get_object streamed to a file": single_get,
                "boto3 download_file, tuned to one GET (threshold above the size)": lambda: (
                    client.download_file(bucket, "b3/obj", str(out), Config=one_get)
                ),
            }
            down = rounds(fast, args.repeat, dict.fromkeys(fast, rm_out))
            if args.ranged:
                ranged = TransferConfig(
                    multipart_threshold=opts.download_part_size,
                    multipart_chunksize=opts.download_part_size,
                    max_concurrency=opts.download_concurrency,
                )
                slow: dict[str, Callable[[], Any]] = {
                    "clawstore get_blob_to_path, ranged GETs (verified)": lambda: store.get_blob_to_path(
                        digest, out
                    ),
                    "boto3 download_file, default TransferConfig (8 MiB ranges x 10)": lambda: (
                        default_client.download_file(bucket, "b3/obj", str(out), Config=default)
                    ),
                    "boto3 download_file, ranged like clawstore": lambda: client.download_file(
                        bucket, "b3/obj", str(out), Config=ranged
                    ),
                }
                down.update(rounds(slow, 1, dict.fromkeys(slow, rm_out)))
            assert clawstore.digest_file(out) == digest
            table("Download to a file", down, size)
            ratio(down, ours_down, "download")
        store.close()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
