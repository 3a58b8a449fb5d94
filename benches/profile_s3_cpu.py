"""Where the CPU goes when client and S3 server share the machine: one 1 GiB `put_blob(path)`,
one boto3 `upload_file`, one verified `get_blob_to_path` and one boto3 `get_object` against a
running server, each with the wall time and the CPU seconds (user + system, from /proc) of this
process and of every server process named on the command line.

    python benches/profile_s3_cpu.py --endpoint http://127.0.0.1:PORT --pids RGW_PID,OSD_PID,...

A figure is bound by the machine when the CPU seconds of all processes approach
wall time x CPUs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import clawstore  # noqa: E402
from bench_s3 import make_file  # noqa: E402
from clawstore.backends.s3 import parse_size  # noqa: E402
from s3_server import REGION, make_client, new_bucket  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def measure(pids: list[int], fn: Callable[[], object]) -> tuple[float, list[float]]:
    before = [cpu_seconds(p) for p in pids]
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    return wall, [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--pids", default="", help="server process ids, comma-separated")
    ap.add_argument("--size", default="1GiB")
    args = ap.parse_args()
    size = parse_size(args.size)
    pids = [os.getpid()] + [int(p) for p in args.pids.split(",") if p]
    names = ["client"] + [comm(p) for p in pids[1:]]
    client = make_client(args.endpoint)
    bucket = new_bucket(client)
    store = clawstore.open(f"s3://{bucket}/prof?endpoint_url={args.endpoint}&region={REGION}")
    print(
        f"{size >> 20} MiB, {args.endpoint}, part checksum {store.backend.part_checksum}, "  # type: ignore[attr-defined]
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n"
    )
    print("| operation | wall s | " + " | ".join(f"{n} CPU s" for n in names) + " | all CPU s / wall |")
    print("|---|---:|" + "---:|" * len(names) + "---:|")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as td:
        src = Path(td) / "blob"
        make_file(src, size)
        out = Path(td) / "out"
        digest = clawstore.digest_file(src)
        single = clawstore.ArtifactStore(store.backend.with_options(download_concurrency=1))  # type: ignore[attr-defined]

        def get_object() -> None:
            body = client.get_object(Bucket=bucket, Key="b3")["Body"]
            with open(out, "wb") as f:
                for chunk in body.iter_chunks(4 << 20):
                    f.write(chunk)

        ops: list[tuple[str, Callable[[], object]]] = [
            ("clawstore put_blob(path) (hashes, verifies)", lambda: store.put_blob(src)),
            (
                "boto3 upload_file (8 MiB x 10, no checksums)",
                lambda: client.upload_file(str(src), bucket, "b3"),
            ),
            ("clawstore get_blob_to_path, one GET (verified)", lambda: single.get_blob_to_path(digest, out)),
            ("boto3 get_object streamed to a file", get_object),
        ]
        for name, fn in ops:
            out.unlink(missing_ok=True)
            wall, cpu = measure(pids, fn)
            cells = " | ".join(f"{c:.2f}" for c in cpu)
            print(f"| {name} | {wall:.2f} | {cells} | {sum(cpu) / wall:.2f} |", flush=True)
    store.close()


if __name__ == "__main__":
    main()
