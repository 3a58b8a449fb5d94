"""fsck: a clean store passes; each kind of damage (made by editing the local store's files
directly) is reported; --repair removes exactly abandoned temp files and corrupt content."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import clawstore
import pytest
from clawstore import mediatypes as mt
from clawstore.fsck import FsckReport, ProblemKind, Severity, fsck
from clawstore.manifest import EMPTY_CONFIG, ImageManifest, Index
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: A pid no process can have (above any pid_max), for temp files of a dead writer.
DEAD_PID = 2**31 - 2


def populate(store: clawstore.ArtifactStore) -> dict[str, clawstore.Digest]:
    """Two layers, a manifest using both, an index over it, and tags on both."""
    store.put_blob(b"{}")
    a = store.put_blob(os.urandom(200_000), media_type="text/plain")
    b = store.put_blob(b"second layer", media_type="text/plain")
    man = ImageManifest(EMPTY_CONFIG, (a, b), artifact_type="application/vnd.example.test").to_json()
    m = store.put_manifest(man)
    idx = store.put_manifest(Index((m,), artifact_type="application/vnd.example.set").to_json())
    store.tag("team/app", "v1", m.digest)
    store.tag("team/app", "all", idx.digest)
    store.tag("other", "latest", m.digest)
    return {"a": a.digest, "b": b.digest, "manifest": m.digest, "index": idx.digest}


def kinds(report: FsckReport) -> list[str]:
    return sorted(p.kind.value for p in report.problems)


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_clean_store(local_store: clawstore.ArtifactStore) -> None:
    populate(local_store)
    report = fsck(local_store)
    assert report.ok and report.problems == []
    assert (report.blobs, report.manifests, report.repos, report.tags) == (3, 2, 2, 3)
    assert report.blob_bytes == 2 + 200_000 + len(b"second layer")
    assert report.manifest_bytes == sum(local_store.stat_manifest(d) for d in local_store.iter_manifests())


def test_empty_store(local_store: clawstore.ArtifactStore) -> None:
    report = fsck(local_store)
    assert report.ok and (report.blobs, report.manifests, report.tags) == (0, 0, 0)


def test_bit_flipped_blob(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    flip(local_store.backend.layout.blob(d["a"]), 123_456, 5)
    report = fsck(local_store)
    assert not report.ok
    assert kinds(report) == ["corrupt-blob", "dangling-reference"]
    (corrupt,) = report.by_kind(ProblemKind.CORRUPT_BLOB)
    assert corrupt.digest == d["a"] and corrupt.severity is Severity.ERROR and not corrupt.repaired
    (dangling,) = report.by_kind(ProblemKind.DANGLING_REFERENCE)
    assert dangling.digest == d["manifest"] and "is corrupt" in dangling.detail
    assert local_store.has_blob(d["a"])  # without repair nothing is removed


def test_truncated_and_extended_blobs(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    pa, pb = local_store.backend.layout.blob(d["a"]), local_store.backend.layout.blob(d["b"])
    pa.write_bytes(pa.read_bytes()[:-1])
    pb.write_bytes(pb.read_bytes() + b"\0")
    report = fsck(local_store)
    assert {p.digest for p in report.by_kind(ProblemKind.CORRUPT_BLOB)} == {d["a"], d["b"]}


def test_bit_flipped_manifest_and_the_tags_on_it(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    flip(local_store.backend.layout.manifest(d["manifest"]), 10)
    report = fsck(local_store)
    assert kinds(report) == ["corrupt-manifest", "dangling-reference", "dangling-tag", "dangling-tag"]
    assert {p.ref for p in report.by_kind(ProblemKind.DANGLING_TAG)} == {"team/app:v1", "other:latest"}
    (ref,) = report.by_kind(ProblemKind.DANGLING_REFERENCE)
    assert ref.digest == d["index"] and d["manifest"] in ref.detail


def test_dangling_tag(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    local_store.untag("team/app", "all")
    local_store.delete_manifest(d["index"])
    assert fsck(local_store).ok
    local_store.delete_manifest(d["manifest"])  # two tags still point at it
    report = fsck(local_store)
    assert kinds(report) == ["dangling-tag", "dangling-tag"]
    assert all("missing" in p.detail and p.digest == d["manifest"] for p in report.problems)


def test_dangling_reference(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    local_store.delete_blob(d["b"])
    report = fsck(local_store)
    (p,) = report.problems
    assert p.kind is ProblemKind.DANGLING_REFERENCE and p.digest == d["manifest"]
    assert d["b"] in p.detail and "missing" in p.detail


def test_invalid_manifest_with_matching_digest(local_store: clawstore.ArtifactStore) -> None:
    """Bytes that hash to their name but are no manifest (written around the store's checks)."""
    junk = b'{"schemaVersion": 2, "layers": "nope"}'
    digest = clawstore.digest_bytes(junk)
    path = local_store.backend.layout.manifest(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(junk)
    report = fsck(local_store)
    (p,) = report.problems
    assert p.kind is ProblemKind.INVALID_MANIFEST and p.digest == digest


def test_invalid_tag_content(local_store: clawstore.ArtifactStore) -> None:
    populate(local_store)
    local_store.backend.layout.tag("other", "latest").write_text("sha256:not-hex\n")
    report = fsck(local_store)
    (p,) = report.problems
    assert p.kind is ProblemKind.INVALID_TAG and p.ref == "other:latest"


def test_stale_temp_files_reported_and_repaired(local_store: clawstore.ArtifactStore) -> None:
    populate(local_store)
    tmp = local_store.backend.layout.tmp
    dead = tmp / f"{DEAD_PID}-deadbeefdeadbeef"
    dead.write_bytes(b"x" * 1000)
    live = tmp / f"{os.getpid()}-0123456789abcdef"  # an in-flight write of a live process
    live.write_bytes(b"y" * 10)
    old_live = tmp / f"{os.getpid()}-fedcba9876543210"
    old_live.write_bytes(b"z" * 5)
    two_hours_ago = time.time() - 7200
    os.utime(old_live, (two_hours_ago, two_hours_ago))

    report = fsck(local_store)
    assert report.ok  # temp files are warnings, not corruption
    assert (report.temp_files, report.temp_bytes) == (3, 1015)
    temp = report.by_kind(ProblemKind.TEMP_FILE)
    assert {p.ref for p in temp} == {dead.name, live.name, old_live.name}
    assert all(p.severity is Severity.WARNING and not p.repaired for p in temp)
    assert dead.exists() and live.exists() and old_live.exists()

    report = fsck(local_store, repair=True)
    assert report.ok and (report.temp_removed, report.temp_removed_bytes) == (2, 1005)
    repaired = {p.ref: p.repaired for p in report.by_kind(ProblemKind.TEMP_FILE)}
    assert repaired == {dead.name: True, live.name: False, old_live.name: True}
    assert not dead.exists() and not old_live.exists() and live.exists()

    report = fsck(local_store, repair=True, stale_after=0)
    assert report.temp_removed == 1 and not live.exists()
    assert fsck(local_store).problems == []


def test_repair_deletes_corrupt_content_and_a_repush_heals(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    good_b = local_store.read_blob(d["b"])
    good_manifest = local_store.get_manifest(d["manifest"])
    flip(local_store.backend.layout.blob(d["b"]), 0)
    flip(local_store.backend.layout.manifest(d["manifest"]), 0)
    # A corrupt copy blocks a re-push: the store keeps the first copy of a digest.
    local_store.put_blob(good_b)
    assert not fsck(local_store).ok

    report = fsck(local_store, repair=True)
    assert sorted(report.deleted) == sorted([d["b"], d["manifest"]])
    assert {p.kind for p in report.problems if p.repaired} == {
        ProblemKind.CORRUPT_BLOB,
        ProblemKind.CORRUPT_MANIFEST,
    }
    assert not local_store.has_blob(d["b"]) and not local_store.has_manifest(d["manifest"])
    assert local_store.has_blob(d["a"])  # good content is never touched
    assert local_store.resolve("team/app", "v1") == d["manifest"]  # nor are tags

    local_store.put_blob(good_b)
    local_store.put_manifest(good_manifest)
    report = fsck(local_store)
    assert report.ok and report.problems == [], [str(p) for p in report.problems]


def test_progress_reports_every_byte(local_store: clawstore.ArtifactStore) -> None:
    populate(local_store)
    local_store.put_blob(os.urandom(9 << 20))
    calls: list[tuple[str, int, int]] = []
    report = fsck(local_store, progress=lambda phase, done, total: calls.append((phase, done, total)))
    blob_calls = [c for c in calls if c[0] == "blobs"]
    assert blob_calls[0][1] == 0 and blob_calls[-1][1:] == (report.blob_bytes, report.blob_bytes)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(blob_calls))
    assert [c[0] for c in calls].index("manifests") > [c[0] for c in calls].index("blobs")
    assert calls[-1] == ("tags", 2, 2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(min_size=1, max_size=4096), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7)
)
def test_every_single_bit_flip_in_a_blob_is_found(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, where: float, bit: int
) -> None:
    with clawstore.open(tmp_path_factory.mktemp("s")) as store:
        d = store.put_blob(data).digest
        flip(store.backend.layout.blob(d), int(where * len(data)), bit)
        report = fsck(store)
        assert [(p.kind, p.digest) for p in report.problems] == [(ProblemKind.CORRUPT_BLOB, d)]


def test_report_serialises(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    flip(local_store.backend.layout.blob(d["a"]), 1)
    out = fsck(local_store).to_dict()
    assert out["ok"] is False and out["blobs"] == 3
    assert {"kind": "corrupt-blob", "severity": "error", "digest": d["a"]}.items() <= out["problems"][
        0
    ].items()
    assert mt.EMPTY_DIGEST not in {p["digest"] for p in out["problems"]}


def test_no_false_alarms_while_writers_run(local_store: clawstore.ArtifactStore) -> None:
    """fsck during pushes (blob, then manifest, then tag, as clients do) reports no errors."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(200):
                if stop.is_set():
                    return
                layer = local_store.put_blob(os.urandom(50_000 + i), media_type="text/plain")
                local_store.put_blob(b"{}")
                m = local_store.put_manifest(
                    ImageManifest(EMPTY_CONFIG, (layer,), artifact_type="application/vnd.example.t").to_json()
                )
                local_store.tag("busy/repo", f"t{i % 7}", m.digest)
        except BaseException as e:  # pragma: no cover - reported below
            failures.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(15):
            report = fsck(local_store)
            assert report.ok, [str(p) for p in report.errors]
    finally:
        stop.set()
        t.join(timeout=60)
    assert not failures
    assert fsck(local_store).ok


def test_invalid_repository_under_refs_is_reported_not_fatal(local_store: clawstore.ArtifactStore) -> None:
    """Something planted outside the grammar (refs/Bad/_tags/x) is a finding; the rest is checked."""
    populate(local_store)
    bad = local_store.backend.layout.refs / "Bad" / "_tags" / "x"
    bad.parent.mkdir(parents=True)
    bad.write_text(f"{mt.EMPTY_DIGEST}\n")
    report = fsck(local_store)
    (p,) = report.problems
    assert p.kind is ProblemKind.INVALID_TAG and p.ref == "Bad"
    assert report.tags > 0  # the valid repositories were still checked


# -- sampling and S3 ---------------------------------------------------------------------------
def test_sample_rehashes_a_random_share(local_store: clawstore.ArtifactStore) -> None:
    """With every blob corrupt, a 25% sample finds exactly the quarter it re-hashed; the rest
    are still listed and sized. A different seed picks a different share."""
    import random

    ds = [local_store.put_blob(f"blob {i}".encode()).digest for i in range(40)]
    for d in ds:
        flip(local_store.backend.layout.blob(d), 0)
    report = fsck(local_store, sample=0.25, rng=random.Random(1))
    assert (report.blobs, report.blobs_hashed) == (40, 10)
    found = {p.digest for p in report.by_kind(ProblemKind.CORRUPT_BLOB)}
    assert len(found) == 10 and found <= set(ds)
    other = {p.digest for p in fsck(local_store, sample=0.25, rng=random.Random(2)).problems}
    assert other != found and len(other) == 10
    assert fsck(local_store, sample=0).blobs_hashed == 0
    assert len(fsck(local_store).by_kind(ProblemKind.CORRUPT_BLOB)) == 40
    assert "10 re-hashed" in report.summary() and report.to_dict()["blobs_hashed"] == 10
    with pytest.raises(clawstore.ClawstoreError, match="sample"):
        fsck(local_store, sample=1.5)


def test_sample_still_checks_references(local_store: clawstore.ArtifactStore) -> None:
    d = populate(local_store)
    local_store.delete_blob(d["b"])
    report = fsck(local_store, sample=0)
    assert [p.kind for p in report.problems] == [ProblemKind.DANGLING_REFERENCE]


def test_fsck_on_s3_finds_damage_in_parallel(s3_store: clawstore.ArtifactStore, s3_client: object) -> None:
    """On S3: blobs listed with their sizes (no HEAD per blob), read several at a time; a
    damaged object (rewritten behind the store's back) is found, and --repair removes it."""
    d = populate(s3_store)
    more = [s3_store.put_blob(os.urandom(3000 + i)).digest for i in range(20)]
    layout = s3_store.backend.layout  # type: ignore[attr-defined]
    bucket = s3_store.backend.bucket  # type: ignore[attr-defined]
    s3_client.put_object(Bucket=bucket, Key=layout.blob(more[7]), Body=b"damaged")  # type: ignore[attr-defined]
    heads: list[str] = []
    s3_store.backend.client.meta.events.register(  # type: ignore[attr-defined]
        "before-call.s3.HeadObject", lambda params, **_: heads.append(params["url"])
    )
    report = fsck(s3_store)
    assert [(p.kind, p.digest) for p in report.problems] == [(ProblemKind.CORRUPT_BLOB, more[7])]
    assert report.blobs == report.blobs_hashed == 23
    assert [h for h in heads if "/blobs/" in h] == []  # sizes came from the listing
    fsck(s3_store, repair=True)
    assert not s3_store.has_blob(more[7]) and s3_store.has_blob(d["a"])
