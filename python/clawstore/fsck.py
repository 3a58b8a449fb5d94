"""Store consistency check: every digest re-hashed, every manifest parsed, every reference and tag
followed.

`fsck` sits above `clawstore.store` and works only through the `ArtifactStore` API (plus, where a
backend offers it, the optional `iter_temp_files()` listing), so it checks the local and the S3
data planes alike. It never trusts a file name: blobs are streamed through the store's verifying
reader, manifests through `get_manifest`, which both re-hash the stored bytes.

What it checks, in order:

1. blobs: every stored blob hashes to its digest (and has the size it was stored with), or with
   `sample` < 1 a random share of them (routine scrubbing of a large store, as zot's scrub);
   blobs are listed with their sizes (S3: the fanout's prefixes in parallel) and read
   `store.read_concurrency` at a time, manifests likewise;
2. manifests: every stored manifest hashes to its digest, parses as an OCI manifest/index, and
   every blob/manifest it references exists with the size its descriptor states (a `subject`
   may dangle, as in the OCI distribution spec);
3. tags: every tag holds a valid digest of an existing manifest that passed step 2;
4. temp files: leftovers of writers (reported as warnings, never as corruption).

What `repair=True` does, and nothing more:

* removes abandoned temp files through `store.cleanup(older_than=stale_after)`: those whose
  writing process is gone (at any age) and those older than `stale_after` seconds; temp files of
  live writers younger than that are in-flight uploads and are left alone;
* deletes blobs and manifests whose bytes do not hash to their digest. A content-addressed store
  keeps the first copy it has of a digest, so a corrupt copy would otherwise block a re-push of
  the good content forever; after repair, re-pushing the same content heals the store. Manifests
  that referenced a deleted blob then show up as `dangling-reference` in the same report.

It never removes tags, valid manifests or blobs that hash correctly (that is `gc`'s job).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from clawstore import mediatypes as mt
from clawstore.backends.base import TempFiles
from clawstore.digest import Digest
from clawstore.errors import (
    ClawstoreError,
    DigestMismatchError,
    NotFoundError,
)
from clawstore.manifest import Manifest, parse_manifest, references
from clawstore.store import ArtifactStore

#: artifactTypes whose `subject` they need (a checkpoint's volume): a missing one is an error,
#: whereas OCI lets a subject dangle.
NEEDS_SUBJECT: frozenset[str] = frozenset({mt.CHECKPOINT})

#: Temp files older than this (or of dead writers) are abandoned; `repair` removes them.
DEFAULT_STALE_AFTER = 3600.0
_READ_CHUNK = 4 << 20

#: progress(phase, done, total): phase is "blobs" (done/total in bytes), "manifests" or "tags"
#: (done/total in items). Called after each unit of work; `total` may be 0 for empty phases.
ProgressFn = Callable[[str, int, int], None]


class Severity(StrEnum):
    ERROR = "error"  # the store's content or references are wrong
    WARNING = "warning"  # leftovers that do not affect correctness


class ProblemKind(StrEnum):
    CORRUPT_BLOB = "corrupt-blob"
    CORRUPT_MANIFEST = "corrupt-manifest"
    INVALID_MANIFEST = "invalid-manifest"
    DANGLING_REFERENCE = "dangling-reference"
    DANGLING_TAG = "dangling-tag"
    INVALID_TAG = "invalid-tag"
    TEMP_FILE = "temp-file"

    @property
    def severity(self) -> Severity:
        return Severity.WARNING if self is ProblemKind.TEMP_FILE else Severity.ERROR


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding. `digest` is the blob/manifest concerned (None for tags and temp files);
    `ref` is `repo:tag` for tag problems or the temp file name."""

    kind: ProblemKind
    digest: Digest | None
    detail: str
    ref: str | None = None
    repaired: bool = False

    @property
    def severity(self) -> Severity:
        return self.kind.severity

    def __str__(self) -> str:
        subject = self.digest or self.ref or ""
        fixed = " [repaired]" if self.repaired else ""
        return f"{self.kind.value}: {subject}: {self.detail}{fixed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "severity": self.severity.value,
            "digest": self.digest,
            "ref": self.ref,
            "detail": self.detail,
            "repaired": self.repaired,
        }


@dataclass(slots=True)
class FsckReport:
    """What fsck saw and found. `ok` is False when any error-severity problem remains."""

    blobs: int = 0  # listed
    blob_bytes: int = 0
    #: Blobs (and bytes) re-hashed: all of them unless `sample` < 1.
    blobs_hashed: int = 0
    blob_bytes_hashed: int = 0
    sample: float = 1.0
    manifests: int = 0
    manifest_bytes: int = 0
    repos: int = 0
    tags: int = 0
    temp_files: int = 0
    temp_bytes: int = 0
    #: Temp files and bytes removed by repair.
    temp_removed: int = 0
    temp_removed_bytes: int = 0
    #: Corrupt blobs/manifests deleted by repair.
    deleted: list[Digest] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity is Severity.WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def by_kind(self, kind: ProblemKind) -> list[Problem]:
        return [p for p in self.problems if p.kind is kind]

    def summary(self) -> str:
        state = "ok" if self.ok else f"{len(self.errors)} error(s)"
        hashed = "" if self.blobs_hashed == self.blobs else f", {self.blobs_hashed} re-hashed"
        parts = [
            f"{self.blobs} blobs ({self.blob_bytes} bytes{hashed})",
            f"{self.manifests} manifests",
            f"{self.tags} tags in {self.repos} repositories",
            f"{self.temp_files} temp files",
        ]
        if self.temp_removed or self.deleted:
            parts.append(
                f"repaired: {self.temp_removed} temp files removed, {len(self.deleted)} corrupt deleted"
            )
        return f"fsck {state}: " + ", ".join(parts) + f" in {self.seconds:.1f}s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "blobs": self.blobs,
            "blob_bytes": self.blob_bytes,
            "blobs_hashed": self.blobs_hashed,
            "blob_bytes_hashed": self.blob_bytes_hashed,
            "sample": self.sample,
            "manifests": self.manifests,
            "manifest_bytes": self.manifest_bytes,
            "repos": self.repos,
            "tags": self.tags,
            "temp_files": self.temp_files,
            "temp_bytes": self.temp_bytes,
            "temp_removed": self.temp_removed,
            "temp_removed_bytes": self.temp_removed_bytes,
            "deleted": list(self.deleted),
            "problems": [p.to_dict() for p in self.problems],
            "seconds": round(self.seconds, 3),
        }


def _noop(_phase: str, _done: int, _total: int) -> None:
    pass


class _Progress:
    """Progress from worker threads: counted and reported under one lock, so `done` only grows."""

    def __init__(self, progress: ProgressFn, phase: str, total: int) -> None:
        self.progress, self.phase, self.total = progress, phase, total
        self.done = 0
        self.lock = threading.Lock()
        progress(phase, 0, total)

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
            self.progress(self.phase, self.done, self.total)


def _choose(blobs: list[tuple[Digest, int]], sample: float, rng: random.Random) -> list[tuple[Digest, int]]:
    """The blobs to re-hash: all (sample >= 1), or a random share of them (at least one when
    there are any and sample > 0)."""
    if sample >= 1 or not blobs:
        return blobs
    k = min(len(blobs), max(1 if sample > 0 else 0, round(len(blobs) * sample)))
    return sorted(rng.sample(blobs, k))


def _check_blobs(
    store: ArtifactStore,
    report: FsckReport,
    repair: bool,
    progress: ProgressFn,
    sample: float,
    rng: random.Random,
) -> tuple[set[Digest], dict[Digest, int]]:
    """Re-hash every blob (or a random `sample` share), `store.read_concurrency` at a time.
    Returns the digests of the corrupt ones and every listed blob's size (from the listing: no
    HEAD/stat per blob on S3)."""
    blobs = list(store.iter_blob_sizes())
    sizes = dict(blobs)
    chosen = _choose(blobs, sample, rng)
    report.blobs, report.blob_bytes = len(blobs), sum(sizes.values())
    bar = _Progress(progress, "blobs", sum(size for _, size in chosen))
    corrupt: set[Digest] = set()

    def rehash(digest: Digest) -> tuple[int, DigestMismatchError | None]:
        buf = bytearray(_READ_CHUNK)
        read = 0
        try:
            with store.get_blob(digest) as reader:
                while n := reader.readinto(buf):
                    read += n
                    bar.advance(n)
        except NotFoundError:
            return -1, None  # removed since listed (gc running): skip it
        except DigestMismatchError as e:
            return read, e
        return read, None

    workers = max(1, min(store.read_concurrency, len(chosen)))
    with ThreadPoolExecutor(workers, thread_name_prefix="fsck") as pool:
        for (digest, _size), (read, err) in zip(
            chosen, pool.map(lambda b: rehash(b[0]), chosen), strict=True
        ):
            if read < 0:
                continue
            report.blobs_hashed += 1
            report.blob_bytes_hashed += read
            if err is not None:
                corrupt.add(digest)
                repaired = repair and _delete_corrupt(store.delete_blob, digest, report)
                report.problems.append(Problem(ProblemKind.CORRUPT_BLOB, digest, str(err), repaired=repaired))
    return corrupt, sizes


def _delete_corrupt(delete: Callable[[Digest], None], digest: Digest, report: FsckReport) -> bool:
    """Repair: remove an object whose bytes do not match its digest, so a re-push can heal it."""
    with contextlib.suppress(NotFoundError):
        delete(digest)
    report.deleted.append(digest)
    return True


def _check_manifests(
    store: ArtifactStore,
    report: FsckReport,
    corrupt_blobs: set[Digest],
    blob_sizes: dict[Digest, int],
    repair: bool,
    progress: ProgressFn,
) -> dict[Digest, str]:
    """Verify, parse and follow every manifest (read `store.read_concurrency` at a time);
    returns {digest: problem} for the bad ones."""
    digests = list(store.iter_manifests())
    bad: dict[Digest, str] = {}
    sizes: dict[Digest, int] = {}
    parsed: dict[Digest, Manifest] = {}
    progress("manifests", 0, len(digests))

    def read(digest: Digest) -> bytes | Exception:
        try:
            return store.get_manifest(digest)
        except (NotFoundError, DigestMismatchError) as e:
            return e

    workers = max(1, min(store.read_concurrency, len(digests)))
    with ThreadPoolExecutor(workers, thread_name_prefix="fsck") as pool:
        fetched = list(zip(digests, pool.map(read, digests), strict=True))
    for i, (digest, got) in enumerate(fetched, 1):
        progress("manifests", i, len(digests))
        if isinstance(got, NotFoundError):
            continue
        if isinstance(got, DigestMismatchError):
            repaired = repair and _delete_corrupt(store.delete_manifest, digest, report)
            bad[digest] = "corrupt"
            report.problems.append(Problem(ProblemKind.CORRUPT_MANIFEST, digest, str(got), repaired=repaired))
            continue
        assert isinstance(got, bytes)
        data = got
        report.manifests += 1
        report.manifest_bytes += len(data)
        sizes[digest] = len(data)
        try:
            parsed[digest] = parse_manifest(data)
        except ClawstoreError as e:  # InvalidManifestError, or a bad digest inside
            bad[digest] = "invalid"
            report.problems.append(Problem(ProblemKind.INVALID_MANIFEST, digest, str(e)))
    # References, once every manifest is known (an index may list a manifest stored after it).
    for digest, manifest in parsed.items():
        subject = getattr(manifest, "subject", None)
        if (
            subject is not None
            and manifest.artifact_type in NEEDS_SUBJECT
            and subject.digest not in sizes
            and not store.has_manifest(subject.digest)
        ):
            report.problems.append(
                Problem(
                    ProblemKind.DANGLING_REFERENCE,
                    digest,
                    f"needs manifest {subject.digest} (its volume), which is missing",
                )
            )
        refs = references(manifest)
        for desc in refs.blobs:
            size = blob_sizes.get(desc.digest)
            if size is None:  # not listed: maybe written since (a HEAD/stat says)
                with contextlib.suppress(NotFoundError):
                    size = store.stat_blob(desc.digest)
            if desc.digest in corrupt_blobs or size is None:
                if desc.digest in report.deleted:
                    why = "was corrupt and has been deleted"
                else:
                    why = "is corrupt" if desc.digest in corrupt_blobs else "is missing"
                report.problems.append(
                    Problem(
                        ProblemKind.DANGLING_REFERENCE, digest, f"references blob {desc.digest}, which {why}"
                    )
                )
            elif size != desc.size:
                report.problems.append(
                    Problem(
                        ProblemKind.DANGLING_REFERENCE,
                        digest,
                        f"references blob {desc.digest} as {desc.size} bytes, it has {size}",
                    )
                )
        for desc in refs.manifests:
            if desc.digest in bad or (desc.digest not in sizes and not store.has_manifest(desc.digest)):
                why = f"is {bad[desc.digest]}" if desc.digest in bad else "is missing"
                report.problems.append(
                    Problem(
                        ProblemKind.DANGLING_REFERENCE,
                        digest,
                        f"references manifest {desc.digest}, which {why}",
                    )
                )
            elif desc.digest in sizes and sizes[desc.digest] != desc.size:
                report.problems.append(
                    Problem(
                        ProblemKind.DANGLING_REFERENCE,
                        digest,
                        f"references manifest {desc.digest} as {desc.size} bytes, "
                        f"it has {sizes[desc.digest]}",
                    )
                )
    return bad


def _check_tags(
    store: ArtifactStore, report: FsckReport, bad_manifests: dict[Digest, str], progress: ProgressFn
) -> None:
    repos = store.list_repos()
    report.repos = len(repos)
    progress("tags", 0, len(repos))
    for i, repo in enumerate(repos, 1):
        try:
            tags = store.list_tags(repo)
        except ClawstoreError as e:  # a directory/prefix that is no valid repository name
            report.problems.append(Problem(ProblemKind.INVALID_TAG, None, str(e), ref=repo))
            progress("tags", i, len(repos))
            continue
        for tag in tags:
            ref = f"{repo}:{tag}"
            report.tags += 1
            try:
                target = store.resolve(repo, tag)
            except NotFoundError:
                continue  # untagged since listed
            except ClawstoreError as e:  # the tag's content is not a valid digest
                report.problems.append(Problem(ProblemKind.INVALID_TAG, None, str(e), ref=ref))
                continue
            if target in bad_manifests:
                report.problems.append(
                    Problem(
                        ProblemKind.DANGLING_TAG,
                        target,
                        f"points at a {bad_manifests[target]} manifest",
                        ref=ref,
                    )
                )
            elif not store.has_manifest(target):
                report.problems.append(
                    Problem(ProblemKind.DANGLING_TAG, target, "points at a missing manifest", ref=ref)
                )
        progress("tags", i, len(repos))


def _check_temp_files(store: ArtifactStore, report: FsckReport, repair: bool, stale_after: float) -> None:
    now = time.time()
    found: list[tuple[str, int, float]] = []
    if isinstance(store.backend, TempFiles):
        for p in store.backend.iter_temp_files():
            with contextlib.suppress(FileNotFoundError):
                st = Path(p).stat()
                found.append((Path(p).name, st.st_size, now - st.st_mtime))
    removed_bytes = removed = 0
    if repair:
        cleaned = store.cleanup(older_than=stale_after)
        removed, removed_bytes = cleaned.removed, cleaned.bytes
    still = set()
    if repair and isinstance(store.backend, TempFiles):
        still = {Path(p).name for p in store.backend.iter_temp_files()}
    for name, size, age in found:
        report.problems.append(
            Problem(
                ProblemKind.TEMP_FILE,
                None,
                f"{size} bytes, {age:.0f}s old",
                ref=name,
                repaired=repair and name not in still,
            )
        )
    report.temp_files = len(found)
    report.temp_bytes = sum(size for _, size, _ in found)
    report.temp_removed = removed
    report.temp_removed_bytes = removed_bytes


def fsck(
    store: ArtifactStore,
    repair: bool = False,
    progress: ProgressFn | None = None,
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
    sample: float = 1.0,
    rng: random.Random | None = None,
) -> FsckReport:
    """Check every blob, manifest and tag of `store`; with `repair`, remove abandoned temp files
    and corrupt content (see the module docstring for exactly what is removed).

    `sample`: the share of blobs re-hashed (1: every one, the default; 0.05: a random 5%, for
    routine scrubbing of a large store; 0: none). Every blob is still listed with its size and
    every reference checked against the listing; manifests are always re-hashed (small)."""
    if not 0 <= sample <= 1:
        raise ClawstoreError(f"sample must be a fraction between 0 and 1, not {sample}")
    started = time.monotonic()
    report = FsckReport(sample=sample)
    prog = progress or _noop
    corrupt_blobs, blob_sizes = _check_blobs(store, report, repair, prog, sample, rng or random.Random())
    bad_manifests = _check_manifests(store, report, corrupt_blobs, blob_sizes, repair, prog)
    _check_tags(store, report, bad_manifests, prog)
    _check_temp_files(store, report, repair, stale_after)
    report.seconds = time.monotonic() - started
    return report


__all__ = ["DEFAULT_STALE_AFTER", "FsckReport", "Problem", "ProblemKind", "Severity", "fsck"]
