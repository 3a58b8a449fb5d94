"""S3 backend throughput vs boto3's transfer manager, against one moto server in the same run.

    python benches/bench_s3.py [--size 1GiB] [--repeat 2]

Upload: `ArtifactStore.put_blob(path)` (hashes the file, uploads parts staged by the Rust core
with Content-MD5, verifies the whole digest before completing) vs `boto3 upload_file` with the
default TransferConfig and a tuned one (same part size/concurrency as clawstore, no CRC32
trailers). Download: `ArtifactStore.get_blob_to_path` (verifies the digest; ranged and single-GET
modes) vs `boto3 download_file` (default, tuned) and a plain single streamed `get_object`.
boto3 verifies nothing. Peak RSS growth of this process is sampled during each upload.

The moto server runs in its own process (tests/s3_server.py), so it does not share our GIL; it is
in-memory and single-process Python, so absolute figures are the server's; the ratios compare
clients. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
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


def timed(fn: Callable[[], Any], repeat: int, before: Callable[[], None] | None = None) -> tuple[float, int]:
    best, mem = float("inf"), 0
    for _ in range(repeat):
        if before:
            before()
        with PeakRSS() as rss:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
        best = min(best, dt)
        mem = max(mem, rss.growth)
    return best, mem


def rows_done(rows: list[tuple[str, float, int]], size: int, args: Any, server: Any, opts: Any) -> None:
    print(
        f"\n{size / MiB:.0f} MiB blob, moto server {server.endpoint}, "
        f"part_size {opts.part_size // MiB} MiB, part checksum {opts.part_checksum}, "
        f"concurrency {opts.concurrency}, "
        f"best of {args.repeat}, {os.cpu_count()} CPUs\n"
    )
    print("| operation | seconds | MiB/s | peak RSS growth (MiB) |")
    print("|---|---:|---:|---:|")
    for name, secs, mem in rows:
        print(f"| {name} | {secs:.2f} | {size / MiB / secs:.0f} | {mem / MiB:.0f} |")
    t = {n: s for n, s, _ in rows}
    up = [v for k, v in t.items() if "upload_file" in k]
    if up:
        ours_up = t["clawstore put_blob(path)"]
        print(f"\nupload ratio (best boto3 time / clawstore time): {min(up) / ours_up:.2f}x")
        limit = opts.concurrency * opts.part_size + 64 * MiB
        print(f"clawstore upload peak RSS growth {rows[0][2] / MiB:.0f} MiB (bound {limit / MiB:.0f} MiB)")
    down = [v for k, v in t.items() if k.startswith("boto3") and "upload" not in k]
    ours_down = [v for k, v in t.items() if k.startswith("clawstore get")]
    if down and ours_down:
        print(f"download ratio (best boto3 time / best clawstore time): {min(down) / min(ours_down):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--part-size", default=None, help="clawstore part_size (default: the backend's)")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--only", choices=("upload", "download"), default=None)
    ap.add_argument("--part-checksum", choices=("md5", "sha256"), default=None)
    args = ap.parse_args()
    size = parse_size(args.size)

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    set_fake_credentials()
    server = MotoProcess()
    try:
        client = make_client(server.endpoint)  # tuned: no CRC32 trailers (clawstore sends Content-MD5)
        default_client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )
        bucket = new_bucket(client)
        url = f"s3://{bucket}/bench?endpoint_url={server.endpoint}&region={REGION}"
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
        rows: list[tuple[str, float, int]] = []
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as td:
            src = Path(td) / "blob"
            make_file(src, size)
            digest = clawstore.digest_file(src)

            def drop_blob() -> None:
                if store.has_blob(digest):
                    store.delete_blob(digest)

            if args.only in (None, "upload"):
                # uploads
                rows.append(
                    ("clawstore put_blob(path)", *timed(lambda: store.put_blob(src), args.repeat, drop_blob))
                )
                rows.append(
                    (
                        "boto3 upload_file, default TransferConfig",
                        *timed(
                            lambda: default_client.upload_file(
                                str(src), bucket, "b3/default", Config=default
                            ),
                            args.repeat,
                        ),
                    )
                )
                rows.append(
                    (
                        "boto3 upload_file, tuned TransferConfig",
                        *timed(
                            lambda: client.upload_file(str(src), bucket, "b3/tuned", Config=tuned),
                            args.repeat,
                        ),
                    )
                )
            for key in ("b3/default", "b3/tuned"):
                client.delete_object(Bucket=bucket, Key=key)
            if args.only == "upload":
                rows_done(rows, size, args, server, opts)
                store.close()
                return
            if not store.has_blob(digest):
                store.put_blob(src)
            client.copy_object(
                Bucket=bucket,
                Key="b3/obj",
                CopySource={"Bucket": bucket, "Key": store.backend.layout.blob(digest)},
            )  # type: ignore[attr-defined]

            # downloads
            out = Path(td) / "out"

            def rm_out() -> None:
                out.unlink(missing_ok=True)

            single_store = clawstore.ArtifactStore(store.backend.with_options(download_concurrency=1))  # type: ignore[attr-defined]
            rows.append(
                (
                    "clawstore get_blob_to_path (ranged GETs, verified)",
                    *timed(lambda: store.get_blob_to_path(digest, out), args.repeat, rm_out),
                )
            )
            rows.append(
                (
                    "clawstore get_blob_to_path (single GET, verified)",
                    *timed(lambda: single_store.get_blob_to_path(digest, out), args.repeat, rm_out),
                )
            )
            rows.append(
                (
                    "boto3 download_file, default TransferConfig",
                    *timed(
                        lambda: default_client.download_file(bucket, "b3/obj", str(out), Config=default),
                        args.repeat,
                        rm_out,
                    ),
                )
            )
            rows.append(
                (
                    "boto3 download_file, tuned TransferConfig",
                    *timed(
                        lambda: client.download_file(bucket, "b3/obj", str(out), Config=tuned),
                        args.repeat,
                        rm_out,
                    ),
                )
            )

            def single_get() -> None:
                body = client.get_object(Bucket=bucket, Key="b3/obj")["Body"]
                with open(out, "wb") as f:
                    for chunk in body.iter_chunks(4 * MiB):
                        f.write(chunk)

            rows.append(("boto3 single get_object streamed to file", *timed(single_get, args.repeat, rm_out)))
            assert clawstore.digest_file(out) == digest

        rows_done(rows, size, args, server, opts)
        store.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
