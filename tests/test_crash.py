"""Crash tests: writers SIGKILLed at random moments leave the old state or the new one, plus temp
files that cleanup removes; cleanup never removes the temp file of a live writer.

The checks after the crashes use independent oracles (hashlib, the `blake3` package) and read the
local layout directly: every file at a digest path hashes to its name.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import clawstore
import pytest
from clawstore import ArtifactStore, ImageManifest, Index
from clawstore.backends.local import LocalBackend

pytestmark = pytest.mark.slow

#: A writer that never stops on its own: large blobs (bytes, path and stream sources, all three
#: algorithms), manifests and indexes over them, and CAS tag moves -- until it is killed.
WRITER = r"""
import io, os, random, sys
import clawstore
from clawstore import ANY, MISSING, Descriptor, ImageManifest, Index, TagConflictError
from clawstore import mediatypes as mt
from clawstore.manifest import EMPTY_CONFIG

root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
store = clawstore.open(root)
store.put_blob(mt.EMPTY_JSON)
src = os.path.join(os.path.dirname(root), f"src-{seed}")
print("ready", flush=True)
n = 0
while True:
    n += 1
    size = rng.randrange(1 << 20, 20 << 20)
    data = rng.randbytes(64) * (size // 64) + rng.randbytes(size % 64)
    alg = rng.choice(["sha256", "sha256", "sha512", "blake3"])
    how = rng.choice(["bytes", "path", "stream"])
    if how == "path":
        with open(src, "wb") as f:
            f.write(data)
        d = store.put_blob(src, algorithm=alg, media_type=mt.VOLUME_LAYER)
    elif how == "stream":
        stream = io.BufferedReader(io.BytesIO(data), 65536)
        d = store.put_blob(stream, algorithm=alg, media_type=mt.VOLUME_LAYER)
    else:
        d = store.put_blob(data, algorithm=alg, media_type=mt.VOLUME_LAYER)
    small = store.put_blob(rng.randbytes(rng.randrange(0, 5000)), media_type=mt.CHECKPOINT_FILE)
    note = {"n": f"{seed}-{n}"}
    m = ImageManifest(EMPTY_CONFIG, (d, small), artifact_type=mt.VOLUME, annotations=note)
    m = store.put_manifest(m.to_json())
    if rng.random() < 0.3:
        m = store.put_manifest(Index((m,), artifact_type=mt.CHECKPOINT).to_json())
    repo = rng.choice(["vol/a", "vol/b", "ckpt"])
    tag = rng.choice(["latest", "prev", "x"])
    try:
        cur = store.resolve(repo, tag)
    except clawstore.RefNotFoundError:
        cur = None
    try:
        store.tag(repo, tag, m.digest, expect=MISSING if cur is None else cur)
    except TagConflictError:
        pass
    if rng.random() < 0.1:
        try:
            store.untag(repo, tag)
        except clawstore.RefNotFoundError:
            pass
    print("round", n, flush=True)
"""


def oracle(algorithm: str, data: bytes) -> str:
    if algorithm == "blake3":
        return blake3.blake3(data).hexdigest()
    return hashlib.new(algorithm, data).hexdigest()


def check_store(root: Path) -> dict[str, int]:
    """Independent check of a local store after crashes. Returns counts of what it found."""
    counts = {"blobs": 0, "manifests": 0, "tags": 0, "temps": 0}
    allowed: set[Path] = set()
    for kind in ("blobs", "manifests"):
        for alg_dir in (root / kind).iterdir():
            for fan in alg_dir.iterdir():
                for f in fan.iterdir():
                    assert f.is_file(), f
                    assert f.name.startswith(fan.name), f
                    data = f.read_bytes()
                    assert oracle(alg_dir.name, data) == f.name, f"{f} does not hash to its name"
                    counts[kind] += 1
                    allowed.add(f)
    for f in (root / "tmp").iterdir():
        counts["temps"] += 1
        allowed.add(f)
    with clawstore.open(root) as store:
        for repo in store.list_repos():
            for tag in store.list_tags(repo):
                d = store.resolve(repo, tag)
                m = store.get_manifest_typed(d)  # verified against its digest, and valid
                manifests = list(m.manifests) if isinstance(m, Index) else []
                for child in manifests:
                    assert store.has_manifest(child.digest)
                    m2 = store.get_manifest_typed(child.digest)
                    assert isinstance(m2, ImageManifest)
                    manifests_blobs = list(m2.blobs())
                    for b in manifests_blobs:
                        with store.get_blob(b.digest) as r:
                            r.verify()
                if isinstance(m, ImageManifest):
                    for b in m.blobs():
                        with store.get_blob(b.digest) as r:
                            r.verify()
                counts["tags"] += 1
                tags_dir = root / "refs" / repo / "_tags"
                allowed.add(tags_dir / tag)
                allowed.add(tags_dir / ".lock")
        # every manifest only references stored content (a crash never commits a dangling one)
        for d in store.iter_manifests():
            m = store.get_manifest_typed(d)
            for b in m.blobs():
                assert store.stat_blob(b.digest) == b.size
            if isinstance(m, Index):
                for c in m.manifests:
                    assert store.stat_manifest(c.digest) == c.size
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p not in allowed:
                # untagged repositories keep their lock file and nothing else
                assert name == ".lock" and p.parent.name == "_tags", f"unexpected file {p}"
    return counts


def spawn(root: Path, seed: int) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read() if p.stderr else line
    return p


def test_sigkill_writers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    clawstore.open(root).close()
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    rounds = 6
    progressed = 0
    for _ in range(rounds):
        writers = [spawn(root, rng.randrange(1 << 30)) for _ in range(2)]  # two at once: CAS races too
        time.sleep(rng.uniform(0.05, 1.2))
        for w in writers:
            assert w.poll() is None, w.stderr.read() if w.stderr else "writer exited"
            w.send_signal(signal.SIGKILL)
        for w in writers:
            w.wait(timeout=30)
            assert w.returncode == -signal.SIGKILL
            out = w.stdout.read() if w.stdout else ""
            progressed += out.count("round")
            if w.stdout:
                w.stdout.close()
            if w.stderr:
                w.stderr.close()
        counts = check_store(root)  # consistent after every round, not just at the end
        assert counts["blobs"] >= 1
    counts = check_store(root)
    assert progressed > 0 or counts["manifests"] > 0
    temps = counts["temps"]
    print(f"after {rounds} rounds ({progressed} writer iterations): {counts}")
    with clawstore.open(root) as store:
        report = store.cleanup(older_than=0)
    assert report.removed == temps
    assert list((root / "tmp").iterdir()) == []
    after = check_store(root)
    assert after["temps"] == 0
    assert (after["blobs"], after["manifests"], after["tags"]) == (
        counts["blobs"],
        counts["manifests"],
        counts["tags"],
    )


# -- cleanup and live writers ----------------------------------------------------------------------

SLOW_READER = r"""
import sys, clawstore
store = clawstore.open(sys.argv[1])
print(store.put_blob(sys.stdin.buffer).digest, flush=True)
"""


def test_cleanup_spares_live_writer(tmp_path: Path) -> None:
    """A writer blocked on a slow pipe has a temp file in tmp/: cleanup(0) must leave it, and the
    writer then commits the right blob. Once a writer is SIGKILLed, cleanup removes its file."""
    root = tmp_path / "store"
    clawstore.open(root).close()
    chunk = os.urandom(1 << 20)
    for kill in (False, True):
        p = subprocess.Popen(
            [sys.executable, "-c", SLOW_READER, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=False,
        )
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(chunk * 3)
        p.stdin.flush()
        deadline = time.monotonic() + 20
        while True:
            temps = [t for t in (root / "tmp").iterdir() if t.lstat().st_size >= len(chunk)]
            if temps:
                break
            assert time.monotonic() < deadline, "the writer never wrote its temp file"
            time.sleep(0.02)
        (temp,) = temps
        assert temp.name.startswith(f"{p.pid}-")
        with clawstore.open(root) as store:
            assert store.cleanup(older_than=0).removed == 0
            os.utime(temp, (0, 0))  # ancient: age alone must not condemn a live writer's file
            assert store.cleanup(older_than=3600).removed == 0
        assert temp.exists()
        if kill:
            p.kill()
            p.wait(timeout=10)
            p.stdin.close()
            p.stdout.close()
            with clawstore.open(root) as store:
                report = store.cleanup(older_than=0)
            assert report.removed == 2 and report.bytes >= len(chunk)  # the temp and its .lock
            assert not temp.exists()
        else:
            p.stdin.write(chunk)
            p.stdin.close()
            out = p.stdout.read().decode().strip()
            p.stdout.close()
            assert p.wait(timeout=20) == 0
            assert out == "sha256:" + hashlib.sha256(chunk * 4).hexdigest()
            with clawstore.open(root) as store:
                assert store.read_blob(out) == chunk * 4
    assert list((root / "tmp").iterdir()) == []


def test_cleanup_rules(tmp_path: Path) -> None:
    store: ArtifactStore = clawstore.open(tmp_path / "store")
    backend = store.backend
    assert isinstance(backend, LocalBackend)
    tmp = backend.layout.tmp
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # exited: its pid is (almost surely) free now

    # 1. a temp file of a dead pid whose .lock is held (a writer in another pid namespace): kept
    locked = tmp / f"{dead_pid}-locked"
    locked.write_bytes(b"x" * 10)
    (tmp / f"{dead_pid}-locked.lock").touch()
    fd = os.open(tmp / f"{dead_pid}-locked.lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # 2. a temp file whose .lock nobody holds (its writer was killed): removed at any age
    killed = tmp / f"{os.getpid()}-killed"
    killed.write_bytes(b"k" * 5)
    (tmp / f"{os.getpid()}-killed.lock").touch()
    # 3. a lone, unheld .lock (writer killed between removing its temp file and its lock)
    (tmp / f"{os.getpid()}-lone.lock").touch()
    # 4. no lock file, our (live) pid, young: kept unless older_than allows
    young = tmp / f"{os.getpid()}-young"
    young.write_bytes(b"y" * 20)
    # 5. no lock file, dead pid: removed at any age
    orphan = tmp / f"{dead_pid}-orphan"
    orphan.write_bytes(b"z" * 30)
    # 6. not a pid at all, old: removed by age
    odd = tmp / "not-a-pid"
    odd.write_bytes(b"w" * 40)
    os.utime(odd, (time.time() - 7200, time.time() - 7200))
    # 7. symlinks are none of ours: left alone, and never followed
    target = tmp_path / "outside"
    target.write_bytes(b"keep me")
    (tmp / "symlink").symlink_to(target)
    (tmp / "evil.lock").symlink_to(target)
    os.utime(tmp / "symlink", (0, 0), follow_symlinks=False)

    try:
        r = store.cleanup(older_than=3600)
        # killed + its lock, the lone lock, orphan, odd
        assert (r.removed, r.bytes) == (5, 75)
        assert locked.exists() and young.exists()
        assert not killed.exists() and not orphan.exists() and not odd.exists()
        assert sorted(p.name for p in tmp.iterdir()) == sorted(
            [locked.name, locked.name + ".lock", young.name, "symlink", "evil.lock"]
        )
        r = store.cleanup(older_than=0)
        assert (r.removed, r.bytes) == (1, 20)
        assert locked.exists() and not young.exists()
    finally:
        os.close(fd)
    assert store.cleanup(older_than=0).removed == 2
    assert not locked.exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["evil.lock", "symlink"]
    assert target.read_bytes() == b"keep me"


HASHER = r"""
import sys, clawstore
print("start", flush=True)
try:
    print(clawstore.digest_file(sys.argv[1], sys.argv[2]), flush=True)
except OSError as e:
    print("oserror", e, flush=True)
"""


@pytest.mark.parametrize("algorithm", ["blake3"])
def test_file_truncated_while_hashing(tmp_path: Path, algorithm: str) -> None:
    """Hashing a file someone truncates meanwhile gives a digest or an error, never a SIGBUS
    (a memory-mapped hash would kill the process)."""
    path = tmp_path / "victim"
    block = os.urandom(1 << 20)
    for _ in range(2):
        with open(path, "wb") as f:
            for _ in range(96):
                f.write(block)
        p = subprocess.Popen(
            [sys.executable, "-c", HASHER, str(path), algorithm], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "start"
        time.sleep(0.01)
        os.truncate(path, 4096)
        out = p.stdout.read()
        p.stdout.close()
        assert p.wait(timeout=60) == 0, f"hasher died with {p.returncode}"
        assert out.startswith((f"{algorithm}:", "oserror"))
