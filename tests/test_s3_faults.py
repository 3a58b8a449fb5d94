"""Fault injection and races on the S3 backend: a loopback proxy between the store and moto
answers 500 / 503 SlowDown, resets connections, loses responses, truncates bodies and corrupts
request bodies for a seeded, bounded fraction of requests.

Invariants checked after every scenario, with a plain boto3 client as the oracle:
* every object at a digest key hashes to that digest (nothing unverified ever appears there);
* an operation either ends with the right digest/content or raises a clear clawstore error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore.backends.s3 import S3ConfigurationError, S3Error
from clawstore.errors import ClawstoreError, TagConflictError
from fault_proxy import FaultProxy
from s3_server import TEST_OPTIONS, set_fake_credentials, store_url
from test_s3 import _manifest, oracle

pytestmark = pytest.mark.s3

MiB = 1 << 20


def assert_digest_keys_verify(client: Any, bucket: str) -> int:
    """Every object under blobs/ and manifests/ hashes to the digest its key names."""
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            parts = key.split("/")
            if len(parts) >= 4 and parts[-4] in ("blobs", "manifests"):
                alg, hexd = parts[-3], parts[-1]
                data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                assert hashlib.new(alg, data).hexdigest() == hexd, f"{key} holds other bytes"
                n += 1
    return n


def staging_keys(client: Any, bucket: str) -> list[str]:
    return [
        o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="store/uploads/").get("Contents", [])
    ]


def skip_without_s3_checksums(store: clawstore.ArtifactStore, mode: str) -> None:
    """Forced crc32 needs a server that verifies S3 checksums or reports the stored object's;
    one that does neither (RGW 16) refuses every such upload (test_s3.py::test_part_checksums)."""
    caps = store.backend.caps  # type: ignore[attr-defined]
    if mode == "signed" and caps.verifies_signed_payloads:
        return
    if mode != "md5" and not caps.verifies_checksums and not caps.reports_checksums:
        pytest.skip(f"the server neither verifies nor reports S3 checksums: part_checksum={mode} refused")


@pytest.fixture
def faulty(s3_endpoint: str, s3_bucket: str) -> Iterator[Any]:
    """Factory: (store through a fault proxy, proxy). The store is opened before faults start."""
    made: list[tuple[clawstore.ArtifactStore, FaultProxy]] = []
    port = int(s3_endpoint.rsplit(":", 1)[1])

    def make(**proxy_kw: Any) -> tuple[clawstore.ArtifactStore, FaultProxy]:
        rate = proxy_kw.pop("rate", 0.0)
        store_kw = proxy_kw.pop("store", {})
        proxy = FaultProxy(port, **proxy_kw)
        store = clawstore.open(store_url(proxy.endpoint, s3_bucket), **{**TEST_OPTIONS, **store_kw})
        # Faults start now, from the seed's first draw (open-time probes do not shift them).
        proxy.rng.seed(proxy_kw.get("seed", 0))
        proxy.rate = rate
        made.append((store, proxy))
        return store, proxy

    yield make
    for store, proxy in made:
        store.close()
        proxy.close()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("kind", ["bytes", "path", "stream"])
def test_uploads_survive_faults(
    faulty: Any,
    s3_store: clawstore.ArtifactStore,
    s3_client: Any,
    s3_bucket: str,
    tmp_path: Path,
    kind: str,
    seed: int,
) -> None:
    store, proxy = faulty(rate=0.25, seed=seed, max_faults=40)
    data = random.Random(seed).randbytes(17 * MiB + seed)
    src: Any = data
    if kind == "path":
        src = tmp_path / "f"
        src.write_bytes(data)
    elif kind == "stream":
        src = io.BytesIO(data)
    d = store.put_blob(src)
    small = store.put_blob(b"small blob %d" % seed)
    assert d.digest == oracle(data) and small.digest == oracle(b"small blob %d" % seed)
    assert proxy.injected() > 0, proxy.counts
    assert s3_store.read_blob(d.digest) == data  # read through a clean path
    assert assert_digest_keys_verify(s3_client, s3_bucket) == 2
    assert staging_keys(s3_client, s3_bucket) == []


@pytest.mark.parametrize("seed", [3, 4])
def test_downloads_survive_faults(
    faulty: Any, s3_store: clawstore.ArtifactStore, tmp_path: Path, seed: int
) -> None:
    data = random.Random(seed).randbytes(14 * MiB + 5)
    d = s3_store.put_blob(data)
    store, proxy = faulty(rate=0.3, seed=seed, faults=("500", "503", "reset", "lost", "truncate"))
    with store.get_blob(d.digest) as r:
        assert r.read() == data
    single = clawstore.ArtifactStore(store.backend.with_options(download_concurrency=1))  # type: ignore[attr-defined]
    for s, name in ((store, "ranged"), (single, "single")):
        out = tmp_path / name
        assert s.get_blob_to_path(d.digest, out) == len(data)
        assert out.read_bytes() == data
    assert proxy.counts["truncate"] + proxy.counts["reset"] + proxy.counts["lost"] > 0, proxy.counts


@pytest.mark.parametrize("mode", ["md5", "crc32", "signed"])
def test_corrupted_request_bodies_are_detected_and_resent(
    faulty: Any, s3_client: Any, s3_bucket: str, mode: str
) -> None:
    # moto checks neither Content-MD5 nor x-amz-checksum-crc32 (S3 would answer BadDigest), which
    # is why the probe gives it md5: the part ETag check catches a corrupted part and re-sends
    # it before Complete. Forced crc32 on such a server, the composite checksum of the stored
    # object catches it after Complete: the object is removed and the upload made again.
    # A server that checks signed payloads (RGW) refuses a damaged signed part, which is sent
    # again; one that does not (moto) refuses part_checksum=signed at open.
    # Only bodies of 4 MiB or more are corrupted: the parts, not the 3 MiB single PUT.
    try:
        store, proxy = faulty(
            rate=0.4,
            seed=7,
            faults=("corrupt",),
            max_faults=6,
            min_body_for_corrupt=4 * MiB,
            store={"part_checksum": mode},
        )
    except S3ConfigurationError as e:
        assert mode == "signed", e
        pytest.skip("the server does not check signed payloads")
    assert store.backend.part_checksum == mode  # type: ignore[attr-defined]
    skip_without_s3_checksums(store, mode)
    calls: Counter[str] = Counter()
    for op in ("CreateMultipartUpload", "UploadPart"):
        store.backend.client.meta.events.register(  # type: ignore[attr-defined]
            f"before-call.s3.{op}", lambda op=op, **_: calls.update([op])
        )
    data = random.Random(5).randbytes(16 * MiB)
    d = store.put_blob(data)
    small = random.Random(6).randbytes(3 * MiB)
    d2 = store.put_blob(small)
    assert d.digest == oracle(data) and d2.digest == oracle(small)
    assert proxy.counts["corrupt"] > 0, proxy.counts
    if mode in ("md5", "signed"):  # the damaged parts were sent again: more UploadParts than 4
        assert calls["UploadPart"] > 4 and calls["CreateMultipartUpload"] == 1, calls
    else:  # the whole upload was made again
        assert calls["CreateMultipartUpload"] > 1, calls
    assert assert_digest_keys_verify(s3_client, s3_bucket) == 2


def test_corrupted_stream_upload_is_a_clear_error_and_leaves_nothing(
    faulty: Any, s3_client: Any, s3_bucket: str
) -> None:
    """A stream cannot be sent again: with crc32 forced on a server that does not check part
    checksums (moto), a part stored corrupted (found by the composite checksum)
    fails the put with a clear error, and neither a digest key nor a staging object remains."""
    store, proxy = faulty(
        rate=1.0, seed=9, faults=("corrupt",), max_faults=1, store={"part_checksum": "crc32"}
    )
    skip_without_s3_checksums(store, "crc32")
    data = random.Random(9).randbytes(12 * MiB)
    with pytest.raises(S3Error, match="other bytes than were sent"):
        store.put_blob(io.BytesIO(data))
    assert proxy.counts["corrupt"] == 1, proxy.counts
    assert assert_digest_keys_verify(s3_client, s3_bucket) == 0
    assert staging_keys(s3_client, s3_bucket) == []


@pytest.mark.parametrize("fault", ["500", "503", "reset"])
@pytest.mark.parametrize("kind", ["small", "multipart", "stream"])
def test_persistent_failure_is_a_clear_error_and_leaves_nothing(
    faulty: Any, s3_client: Any, s3_bucket: str, fault: str, kind: str
) -> None:
    store, proxy = faulty(rate=1.0, faults=(fault,), store={"max_attempts": 3})
    data = random.Random(7).randbytes(100 if kind == "small" else 11 * MiB)
    src: Any = io.BytesIO(data) if kind == "stream" else data
    with pytest.raises(S3Error, match="after 3 attempts"):
        store.put_blob(src)
    proxy.rate = 0.0
    assert assert_digest_keys_verify(s3_client, s3_bucket) == 0


@pytest.mark.parametrize("seed", range(6))
def test_flaky_server_either_succeeds_or_fails_cleanly(
    faulty: Any, s3_client: Any, s3_bucket: str, seed: int
) -> None:
    """Many faults and few attempts: whatever happens, no digest key holds unverified bytes and
    a failure is a ClawstoreError; cleanup removes the leftovers."""
    store, proxy = faulty(rate=0.35, seed=seed, store={"max_attempts": 2})
    data = random.Random(seed).randbytes(12 * MiB)
    try:
        d = store.put_blob(io.BytesIO(data) if seed % 2 else data)
        assert d.digest == oracle(data)
    except ClawstoreError:
        pass
    proxy.rate = 0.0
    assert assert_digest_keys_verify(s3_client, s3_bucket) <= 1
    store.cleanup(older_than=0)
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert staging_keys(s3_client, s3_bucket) == []


def test_tag_cas_under_lost_responses(faulty: Any, s3_store: clawstore.ArtifactStore) -> None:
    """A conditional write whose response is lost and is retried must not report a conflict it
    caused itself, nor succeed where it should conflict."""
    m = [_manifest(s3_store, i) for i in range(4)]
    store, proxy = faulty(rate=0.4, seed=9, faults=("lost", "reset", "500", "503"))
    for round_ in range(6):
        tag = f"t{round_}"
        assert store.tag("repo", tag, m[0], expect=clawstore.MISSING) is None
        with pytest.raises(TagConflictError):
            store.tag("repo", tag, m[1], expect=clawstore.MISSING)
        assert store.tag("repo", tag, m[1], expect=m[0]) == m[0]
        with pytest.raises(TagConflictError):
            store.tag("repo", tag, m[2], expect=m[0])
        assert store.tag("repo", tag, m[2]) == m[1]
        assert store.untag("repo", tag, expect=m[2]) == m[2]
        assert s3_store.backend.read_tag("repo", tag) is None
    assert proxy.counts["lost"] > 0, proxy.counts


ROUNDS = 6


def test_cas_race_threads(s3_store: clawstore.ArtifactStore) -> None:
    base = _manifest(s3_store, 100)
    mine = [_manifest(s3_store, i) for i in range(8)]
    barrier = threading.Barrier(8)
    wins: list[list[int]] = [[] for _ in range(ROUNDS)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def racer(i: int) -> None:
        try:
            for r in range(ROUNDS):
                barrier.wait(timeout=60)
                try:
                    s3_store.tag("race", f"r{r}", mine[i], expect=base if r % 2 else clawstore.MISSING)
                except TagConflictError:
                    continue
                with lock:
                    wins[r].append(i)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    for r in range(ROUNDS):
        if r % 2:
            s3_store.tag("race", f"r{r}", base, expect=clawstore.MISSING)
    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in range(ROUNDS):
        assert len(wins[r]) == 1, (r, wins[r])
        assert s3_store.resolve("race", f"r{r}") == mine[wins[r][0]]


def _race_process(url: str, options: dict[str, Any], base: str, mine: str, barrier: Any, out: Any) -> None:
    set_fake_credentials()
    results = []
    with clawstore.open(url, **options) as store:
        for r in range(ROUNDS):
            barrier.wait(timeout=120)
            try:
                store.tag("race", f"p{r}", mine, expect=base if r % 2 else clawstore.MISSING)
                results.append(True)
            except TagConflictError:
                results.append(False)
    out.put((mine, results))


def test_cas_race_processes(s3_store: clawstore.ArtifactStore, s3_endpoint: str, s3_bucket: str) -> None:
    base = _manifest(s3_store, 200)
    mine = [_manifest(s3_store, 300 + i) for i in range(4)]
    for r in range(ROUNDS):
        if r % 2:
            s3_store.tag("race", f"p{r}", base, expect=clawstore.MISSING)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    out = ctx.Queue()
    opts = dict(TEST_OPTIONS)  # probed: how the server takes If-Match (RGW: bare ETags)
    procs = [
        ctx.Process(
            target=_race_process, args=(store_url(s3_endpoint, s3_bucket), opts, base, m, barrier, out)
        )
        for m in mine
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for r in range(ROUNDS):
        winners = [m for m, res in results if res[r]]
        assert len(winners) == 1, (r, winners)
        assert s3_store.resolve("race", f"p{r}") == winners[0]


_KILL_CHILD = """
import sys
import clawstore
url, expected = sys.argv[1], sys.argv[2]
opts = dict(part_size=5 << 20, stream_part_size=5 << 20, multipart_threshold=5 << 20, concurrency=1)
with clawstore.open(url, **opts) as store:
    store.put_blob(sys.stdin.buffer, expected=expected)
"""


def test_kill9_mid_multipart_leaves_nothing_and_cleanup_reclaims(
    s3_store: clawstore.ArtifactStore, s3_endpoint: str, s3_bucket: str, s3_client: Any
) -> None:
    """A writer SIGKILLed in the middle of a multipart upload straight to a digest key (a stream
    with `expected`): no object appears at the key, and `cleanup` aborts the orphaned upload
    (its parts are reclaimed). The writer reads from a pipe this test feeds, so it is killed
    with parts uploaded and the source not yet at its end, whatever the server's speed."""
    import subprocess
    import sys
    import time

    data = random.Random(11).randbytes(24 * MiB)
    digest = oracle(data)
    key = s3_store.backend.layout.blob(clawstore.Digest.parse(digest))  # type: ignore[attr-defined]
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, store_url(s3_endpoint, s3_bucket), digest],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None
    try:
        child.stdin.write(data[: 16 * MiB])  # three parts' worth, not the end of the stream
        child.stdin.flush()
        deadline = time.monotonic() + 120
        parts: list[Any] = []
        while not parts:
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "no part was uploaded"
            ups = [
                u
                for u in s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
                if u["Key"] == key
            ]
            if ups:
                parts = s3_client.list_parts(Bucket=s3_bucket, Key=key, UploadId=ups[0]["UploadId"]).get(
                    "Parts", []
                )
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
        if child.stdin:
            with contextlib.suppress(BrokenPipeError):
                child.stdin.close()
    assert child.returncode == -9
    assert not s3_store.has_blob(digest)
    assert assert_digest_keys_verify(s3_client, s3_bucket) == 0
    report = s3_store.cleanup(older_than=0)
    assert report.removed >= 1
    assert [u for u in s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])] == []
    assert s3_store.put_blob(data, expected=digest).digest == digest  # and the blob can be stored


class Throttled(io.RawIOBase):
    """`data` at about `rate` bytes per second: a writer that is surely mid-upload for a while."""

    def __init__(self, data: bytes, rate: float) -> None:
        super().__init__()
        self.src = io.BytesIO(data)
        self.rate = rate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        import time

        n = self.src.readinto(memoryview(buffer)[: 1 << 20])
        time.sleep(n / self.rate)
        return n


@pytest.mark.skipif(
    not os.environ.get("CLAWSTORE_TEST_S3_RESTART"),
    reason="needs CLAWSTORE_TEST_S3_RESTART, a command restarting the S3 server (test.sh: RGW)",
)
@pytest.mark.parametrize("kind", ["expected", "stream"])
def test_put_during_server_restart_completes_verified_or_fails_clearly(
    s3_store: clawstore.ArtifactStore, s3_endpoint: str, s3_bucket: str, s3_client: Any, kind: str
) -> None:
    """The server restarts (connections refused for a while) in the middle of a multipart
    upload (to the digest key with `expected`, or to a staging key for a stream): the put either
    completes, with the bytes at the digest key verified, or fails with a clear ClawstoreError;
    never anything unverified at a digest key. The source is throttled so that the writer is
    still uploading when the server goes down."""
    import shlex
    import subprocess
    import time

    data = random.Random(12).randbytes(48 * MiB)
    opts = {**TEST_OPTIONS, "concurrency": 2, "max_attempts": 12, "retry_base": 0.2, "retry_cap": 2.0}
    outcome: list[Any] = []
    with clawstore.open(store_url(s3_endpoint, s3_bucket), **opts) as store:

        def put() -> None:
            try:
                src = Throttled(data, 16 * MiB)
                outcome.append(store.put_blob(src, expected=oracle(data) if kind == "expected" else None))
            except BaseException as e:
                outcome.append(e)

        writer = threading.Thread(target=put)
        writer.start()
        deadline = time.monotonic() + 60
        while not s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):
            assert writer.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.02)
        assert writer.is_alive()  # (about 3 s of source left)
        subprocess.run(shlex.split(os.environ["CLAWSTORE_TEST_S3_RESTART"]), check=True, timeout=180)
        writer.join(300)
        assert not writer.is_alive()
    (result,) = outcome
    print(f"outcome: {result!r}")
    if isinstance(result, BaseException):
        assert isinstance(result, ClawstoreError), repr(result)
        assert "\n" not in str(result).strip()
    else:
        assert result.digest == oracle(data)
        assert s3_store.read_blob(result.digest) == data
    assert assert_digest_keys_verify(s3_client, s3_bucket) == (0 if isinstance(result, BaseException) else 1)


@pytest.mark.parametrize("seed", [5, 6])
def test_batched_deletes_survive_faults(
    faulty: Any, s3_store: clawstore.ArtifactStore, s3_client: Any, s3_bucket: str, seed: int
) -> None:
    """GC's batched deletes through 500s, SlowDowns, resets and lost responses (a DeleteObjects
    that ran but whose answer never came is sent again: deleting absent keys is no error):
    every chosen blob goes, every other stays."""
    store, proxy = faulty(
        rate=0.3, seed=seed, max_faults=30, faults=("500", "503", "reset", "lost"), store={"delete_batch": 40}
    )
    made = [s3_store.put_blob(b"doomed %d %d" % (seed, i)).digest for i in range(300)]
    keep = [s3_store.put_blob(b"kept %d %d" % (seed, i)).digest for i in range(20)]
    proxy.counts.clear()
    store.delete_blobs(made)
    assert proxy.injected() > 0, proxy.counts
    assert set(s3_store.iter_blobs()) == set(keep)
