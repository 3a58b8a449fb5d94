"""The `clawstore` command line, run in-process through the real entry (`run_main`, which turns
errors into one `error:` line) and, for the installed script, as a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import blake3
import clawstore
import pytest
from clawstore import mediatypes as mt
from clawstore.cli import cli
from clawstore.cli.common import run_main
from clawstore.manifest import EMPTY_CONFIG, Descriptor, ImageManifest
from click.testing import CliRunner


@dataclass
class Result:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()


def run(args: list[str], input: bytes | None = None, env: dict[str, str | None] | None = None) -> Result:
    """Run `clawstore ARGS` in-process exactly as the console script does."""
    code = 0
    with CliRunner().isolation(input=input, env=env) as (out, err, _):
        try:
            run_main(cli, args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        return Result(code, out.getvalue(), err.getvalue().decode())


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def cs(url: str):
    """`cs(*args)`: run clawstore against the test store."""

    def _run(*args: str, input: bytes | None = None) -> Result:
        return run(["--store", url, *args], input=input)

    return _run


def assert_error(r: Result, *fragments: str) -> None:
    """A failed command: non-zero exit, exactly one `error:` line on stderr, no traceback."""
    assert r.code != 0, r
    assert "Traceback" not in r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for f in fragments:
        assert f in lines[0], lines[0]


def manifest_for(layer: Descriptor) -> bytes:
    return ImageManifest(EMPTY_CONFIG, (layer,), artifact_type="application/vnd.example.test").to_json()


# -- blobs -------------------------------------------------------------------------------------
def test_blob_put_get_file_roundtrip(cs, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    r = cs("blob", "put", str(src))
    assert r.code == 0, r
    assert r.text == f"sha256:{hashlib.sha256(data).hexdigest()}\n"
    digest = r.text.strip()
    assert cs("blob", "stat", digest).text == f"{len(data)}\n"
    got = cs("blob", "get", digest)
    assert got.code == 0 and got.out == data
    out = tmp_path / "out.bin"
    assert cs("blob", "get", digest, "-o", str(out)).code == 0
    assert out.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin", "out.bin", "store"]  # no temp left


def test_blob_put_stdin(cs) -> None:
    data = b"from stdin\n" * 1000
    r = cs("blob", "put", "-", input=data)
    assert r.code == 0 and r.text.strip() == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert cs("blob", "get", r.text.strip()).out == data


@pytest.mark.parametrize(
    ("algorithm", "oracle"),
    [
        ("sha512", lambda b: hashlib.sha512(b).hexdigest()),
        ("blake3", lambda b: blake3.blake3(b).hexdigest()),
        ("sha256", lambda b: hashlib.sha256(b).hexdigest()),
    ],
)
def test_blob_put_algorithms(cs, tmp_path: Path, algorithm: str, oracle) -> None:
    data = os.urandom(2_000_000)
    src = tmp_path / "f"
    src.write_bytes(data)
    r = cs("blob", "put", "--algorithm", algorithm, str(src))
    assert r.text.strip() == f"{algorithm}:{oracle(data)}"
    assert cs("blob", "get", r.text.strip()).out == data


def test_blob_put_expected(cs, url: str, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    good = f"sha256:{hashlib.sha256(b'payload').hexdigest()}"
    assert cs("blob", "put", "--expected", good, str(src)).text.strip() == good
    wrong = "sha256:" + "0" * 64
    r = cs("blob", "put", "--expected", wrong, "-", input=b"other payload")
    assert_error(r, "expected", wrong)
    assert list(clawstore.open(url).iter_blobs()) == [good]


def test_blob_get_corrupt_leaves_no_file(cs, url: str, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    digest = cs("blob", "put", "-", input=data).text.strip()
    path = clawstore.open(url).backend.layout.blob(clawstore.Digest(digest))
    flipped = bytearray(data)
    flipped[50_000] ^= 0x10
    path.write_bytes(bytes(flipped))
    out = tmp_path / "out.bin"
    r = cs("blob", "get", digest, "-o", str(out))
    assert_error(r, digest)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    # An existing file is not clobbered by a failed download.
    out.write_bytes(b"old")
    assert_error(cs("blob", "get", digest, "-o", str(out)))
    assert out.read_bytes() == b"old"
    # To stdout the bytes stream, but the command still fails.
    assert_error(cs("blob", "get", digest), "hashes to")


def test_blob_rm(cs, tmp_path: Path) -> None:
    digest = cs("blob", "put", "-", input=b"layer").text.strip()
    cs("blob", "put", "-", input=b"{}")
    m = tmp_path / "m.json"
    m.write_bytes(manifest_for(Descriptor(clawstore.Digest(digest), 5, "text/plain")))
    assert cs("manifest", "put", str(m)).code == 0
    assert_error(cs("blob", "rm", digest), "referenced by manifest", "--force")
    assert cs("blob", "stat", digest).code == 0
    assert cs("blob", "rm", "--force", digest).code == 0
    assert_error(cs("blob", "stat", digest), "not found")
    assert_error(cs("blob", "rm", digest), "not found")


def test_blob_errors(cs, tmp_path: Path) -> None:
    assert_error(cs("blob", "put", str(tmp_path / "missing")), "missing")
    assert_error(cs("blob", "put", str(tmp_path)), "directory")
    assert_error(cs("blob", "get", "sha256:" + "a" * 64), "not found")
    assert_error(cs("blob", "put", "--expected", "md5:abc", "-", input=b"x"), "md5")


# -- manifests and tags ------------------------------------------------------------------------
@pytest.fixture
def pushed(cs, tmp_path: Path) -> str:
    """A stored manifest (empty config + one layer); returns its digest."""
    layer = cs("blob", "put", "-", input=b"layer bytes").text.strip()
    assert cs("blob", "put", "-", input=b"{}").text.strip() == mt.EMPTY_DIGEST
    m = tmp_path / "manifest.json"
    m.write_bytes(manifest_for(Descriptor(clawstore.Digest(layer), 11, "text/plain")))
    r = cs("manifest", "put", str(m))
    assert r.code == 0, r
    assert r.text.strip() == f"sha256:{hashlib.sha256(m.read_bytes()).hexdigest()}"
    return r.text.strip()


def test_manifest_roundtrip(cs, pushed: str, tmp_path: Path) -> None:
    data = (tmp_path / "manifest.json").read_bytes()
    assert cs("manifest", "get", pushed).out == data  # the exact bytes, no newline added
    out = tmp_path / "got.json"
    assert cs("manifest", "get", pushed, "-o", str(out)).code == 0
    assert out.read_bytes() == data
    assert cs("manifest", "put", "-", input=data).text.strip() == pushed


def test_manifest_put_rejections(cs, tmp_path: Path) -> None:
    assert_error(cs("manifest", "put", "-", input=b"not json"), "JSON")
    dangling = manifest_for(Descriptor(clawstore.Digest("sha256:" + "b" * 64), 3, "text/plain"))
    assert_error(cs("manifest", "put", "-", input=dangling), "missing blob")
    assert_error(cs("manifest", "put", "-", input=b" " * (4 * 1024 * 1024 + 1)), "limit")
    assert_error(cs("manifest", "put", str(tmp_path / "nope.json")), "nope.json")
    assert_error(cs("manifest", "get", "sha256:" + "c" * 64), "not found")


def test_tags(cs, pushed: str) -> None:
    assert cs("tag", "team/app:v1", pushed).code == 0
    assert cs("tag", "team/app:latest", pushed, "--create").code == 0
    assert cs("resolve", "team/app:v1").text == f"{pushed}\n"
    assert cs("resolve", f"team/app@{pushed}").text == f"{pushed}\n"
    assert cs("tags", "team/app").text.split() == ["latest", "v1"]
    assert cs("repos").text.split() == ["team/app"]
    assert_error(cs("tag", "team/app:v1", pushed, "--create"), "exists")
    other = "sha256:" + "d" * 64
    assert_error(cs("tag", "team/app:v1", pushed, "--expect", other), "expected")
    assert cs("tag", "team/app:v1", pushed, "--expect", pushed).code == 0
    assert_error(cs("tag", "team/app:v2", other), "not found")
    assert_error(cs("untag", "team/app:v1", "--expect", other))
    assert cs("untag", "team/app:v1").code == 0
    assert_error(cs("resolve", "team/app:v1"), "not found")
    assert_error(cs("untag", "team/app:v1"), "not found")
    assert cs("tags", "team/app").text.split() == ["latest"]
    r = cs("tag", "team/app:v1", pushed, "--create", "--expect", pushed)
    assert r.code == 2 and "Traceback" not in r.err  # usage error


@pytest.mark.parametrize(
    "args",
    [
        ["blob", "get", "sha256:" + "A" * 64],
        ["blob", "stat", "sha256:" + "a" * 63],
        ["blob", "rm", "md5:" + "a" * 32],
        ["blob", "get", "sha256:../.."],
        ["manifest", "get", "sha256"],
        ["tag", "UPPER/case:v1", "sha256:" + "a" * 64],
        ["tag", "a/../b:v1", "sha256:" + "a" * 64],
        ["tag", "/abs:v1", "sha256:" + "a" * 64],
        ["tag", "repo:" + "t" * 129, "sha256:" + "a" * 64],
        ["tag", "repo:.hidden", "sha256:" + "a" * 64],
        ["tag", "repo", "sha256:" + "a" * 64],
        ["tag", "repo:v1", "not-a-digest"],
        ["resolve", "repo//x:v1"],
        ["resolve", "repo:"],
        ["tags", "Repo"],
        ["untag", "a\x00b:v1"],
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(cs, url: str, args: list[str]) -> None:
    assert_error(cs(*args))
    root = Path(url.removeprefix("file://"))
    written = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert written == []


# -- store selection ---------------------------------------------------------------------------
def test_store_from_env_and_option(tmp_path: Path) -> None:
    a, b = (tmp_path / "a").as_uri(), (tmp_path / "b").as_uri()
    r = run(["blob", "put", "-"], input=b"env", env={"CLAWSTORE_URL": a})
    assert r.code == 0
    assert run(["blob", "stat", r.text.strip()], env={"CLAWSTORE_URL": a}).text == "3\n"
    # --store wins over the environment.
    assert_error(
        run(["--store", b, "blob", "stat", r.text.strip()], env={"CLAWSTORE_URL": a}),
        f"no clawstore store at {tmp_path / 'b'}",
    )
    assert clawstore.open(a).has_blob(r.text.strip())


def test_unsupported_url(tmp_path: Path) -> None:
    assert_error(run(["--store", "ftp://host/x", "repos"]), "unsupported")


# -- fsck --------------------------------------------------------------------------------------
def test_fsck_cli(cs, url: str, pushed: str) -> None:
    assert cs("tag", "app:v1", pushed).code == 0
    r = cs("fsck")
    assert r.code == 0 and r.text.startswith("fsck ok:") and r.err == ""
    store = clawstore.open(url)
    blob = next(d for d in store.iter_blobs() if d != mt.EMPTY_DIGEST)
    path = store.backend.layout.blob(blob)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    r = cs("fsck")
    assert_error(r, "fsck found 2 error(s)")
    assert f"error: corrupt-blob: {blob}" in r.text
    assert "dangling-reference" in r.text
    report = json.loads(cs("fsck", "--json").out)
    assert report["ok"] is False
    assert {p["kind"] for p in report["problems"]} == {"corrupt-blob", "dangling-reference"}
    # --repair deletes the corrupt copy; the manifest still lacks it until the content is re-pushed.
    r = cs("fsck", "--repair")
    assert r.code == 1 and "[repaired]" in r.text
    assert cs("blob", "put", "-", input=b"layer bytes").text.strip() == blob
    r = cs("fsck")
    assert r.code == 0, r


def test_fsck_sample_cli(cs, url: str, pushed: str) -> None:
    """--sample 0 lists and sizes every blob and checks references but re-hashes none, so a
    corrupt blob goes unseen; --sample 1 (the default) re-hashes all; out of range is refused."""
    store = clawstore.open(url)
    blob = next(d for d in store.iter_blobs() if d != mt.EMPTY_DIGEST)
    path = store.backend.layout.blob(blob)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    r = cs("fsck", "--sample", "0", "--json")
    report = json.loads(r.out)
    assert r.code == 0 and report["blobs_hashed"] == 0 and report["blobs"] >= 2 and report["sample"] == 0
    r = cs("fsck", "--sample", "1")
    assert_error(r, "fsck found 2 error(s)")
    r = cs("fsck", "--sample", "1.5")
    assert r.code == 2 and "1.5" in r.err


# -- the installed entry point -----------------------------------------------------------------
def _entry_point() -> list[str]:
    script = Path(sys.executable).parent / "clawstore"
    if script.exists():
        return [str(script)]
    found = shutil.which("clawstore")
    return [found] if found else [sys.executable, "-m", "clawstore"]


def test_installed_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "CLAWSTORE_URL": (tmp_path / "s").as_uri()}
    data = os.urandom(9 << 20)  # above the progress threshold: still no bar when piped
    src = tmp_path / "big"
    src.write_bytes(data)
    put = subprocess.run(
        [*_entry_point(), "blob", "put", str(src)], env=env, capture_output=True, timeout=120
    )
    assert put.returncode == 0 and put.stderr == b"", put
    digest = put.stdout.decode().strip()
    assert digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
    get = subprocess.run([*_entry_point(), "blob", "get", digest], env=env, capture_output=True, timeout=120)
    assert get.returncode == 0 and get.stdout == data and get.stderr == b""
    bad = subprocess.run(
        [*_entry_point(), "resolve", "no/such:tag"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1
    assert bad.stderr == "error: no/such:tag not found\n"
    broken = subprocess.run(
        [*_entry_point(), "blob", "get", "sha256:xyz"], env=env, capture_output=True, text=True, timeout=120
    )
    assert broken.returncode == 1 and broken.stderr.startswith("error: invalid digest")
    assert "Traceback" not in broken.stderr


def test_terminal_progress_path_stores_the_same_bytes(
    cs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, large puts/gets stream through a progress bar: same digests, same bytes."""
    import clawstore.cli.blob as blob_cli
    import clawstore.cli.common as common

    monkeypatch.setattr(common, "is_interactive", lambda: True)
    monkeypatch.setattr(blob_cli, "is_interactive", lambda: True)
    used: list[int] = []

    class CountingReader(blob_cli._ProgressReader):
        def readinto(self, buf: bytearray | memoryview) -> int:
            n = super().readinto(buf)
            used.append(n)
            return n

    monkeypatch.setattr(blob_cli, "_ProgressReader", CountingReader)
    data = os.urandom(blob_cli.PROGRESS_MIN + 12345)
    src = tmp_path / "big"
    src.write_bytes(data)
    expect = f"sha256:{hashlib.sha256(data).hexdigest()}"
    r = cs("blob", "put", str(src))
    assert r.code == 0 and r.text.strip() == expect, r
    assert sum(used) == len(data)  # the file went through the progress reader
    assert cs("blob", "put", "-", input=data).text.strip() == expect
    assert sum(used) == 2 * len(data)
    out = tmp_path / "out"
    assert cs("blob", "get", expect, "-o", str(out)).code == 0
    assert out.read_bytes() == data
    assert cs("fsck").code == 0


_SOME_DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "args",
    [
        ["fsck"],
        ["fsck", "--repair"],
        ["blob", "get", _SOME_DIGEST],
        ["blob", "stat", _SOME_DIGEST],
        ["blob", "rm", _SOME_DIGEST],
        ["manifest", "get", _SOME_DIGEST],
        ["resolve", "demo/app:v1"],
        ["tag", "demo/app:v1", _SOME_DIGEST],
        ["untag", "demo/app:v1"],
        ["tags", "demo/app"],
        ["repos"],
        ["gc", "--dry-run"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_commands_needing_a_store_never_create_one(tmp_path: Path, args: list[str]) -> None:
    """A mistyped store path must not become an empty store reported as fine."""
    missing = tmp_path / "typo" / "store"
    r = run(["--store", missing.as_uri(), *args])
    assert r.code == 1, r
    assert r.err == f"error: no clawstore store at {missing}\n"
    assert not (tmp_path / "typo").exists()
    # A plain path (no file:// scheme) and CLAWSTORE_URL behave the same.
    r = run(args, env={"CLAWSTORE_URL": str(missing)})
    assert r.code == 1 and "no clawstore store at" in r.err
    assert not (tmp_path / "typo").exists()


def test_writing_commands_create_the_store(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "store"
    r = run(["--store", fresh.as_uri(), "blob", "put", "-"], input=b"hello")
    assert r.code == 0, r
    assert r.text.strip() == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert run(["--store", fresh.as_uri(), "fsck"]).code == 0  # now it exists: reads work


def test_get_output_is_fsynced_before_rename_and_ignores_stale_partials(
    cs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = cs("blob", "put", "-", input=b"payload").text.strip()
    dest = tmp_path / "out.bin"
    # A partial file an earlier `blob get` (same pid, killed) left behind must not block this one.
    (tmp_path / f".out.bin.clawstore-{os.getpid()}.partial").write_bytes(b"stale")
    synced: list[int] = []
    replaced: list[bool] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == dest:
            replaced.append(bool(synced) and synced[-1] == len(b"payload"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    r = cs("blob", "get", digest, "-o", str(dest))
    assert r.code == 0, r
    assert dest.read_bytes() == b"payload"
    assert replaced == [True], "the output file must be fsynced before it is renamed into place"


#: Commands that only read or delete: each module marks them `existing_store` on the command.
EXISTING_STORE_COMMANDS = (
    "blob get",
    "blob stat",
    "blob rm",
    "gc",
    "volume restore",
    "volume ls",
    "volume history",
    "checkpoint restore",
    "checkpoint ls",
    "checkpoint diff",
    "checkpoint cat",
    "checkpoint files",
    "retention ls",
    "retention apply",
    "export",
    "grant ls",
    "lease ls",
    "lease release",
    "catalog fsck",
    "catalog history",
)


def test_read_only_commands_carry_existing_store() -> None:
    import click
    from clawstore.cli import cli
    from clawstore.cli.common import _needs_existing_store

    for path in EXISTING_STORE_COMMANDS:
        cmd: click.Command | None = cli
        for name in path.split():
            cmd = cmd.get_command(click.Context(cmd), name) if isinstance(cmd, click.Group) else None
        assert cmd is not None, f"`clawstore {path}` no longer exists: update the list"
        assert _needs_existing_store(click.Context(cmd)), f"`clawstore {path}` is not marked existing_store"


@pytest.mark.parametrize(
    "args",
    [
        ["gc"],
        ["volume", "ls"],
        ["volume", "restore", "vol/x:latest", "DEST"],
        ["checkpoint", "ls", "agents/a"],
        ["export", "demo/app:v1", "--oci-layout", "DEST"],
        ["catalog", "history", "demo/app:v1"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_reading_commands_of_other_areas_never_create_a_store(tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "typo"
    args = [str(tmp_path / "dest") if a == "DEST" else a for a in args]
    r = run(["--store", missing.as_uri(), *args])
    assert r.code == 1, r
    assert r.err == f"error: no clawstore store at {missing}\n"
    assert not missing.exists()


def test_progress_reader_does_not_turn_would_block_into_end_of_data(tmp_path: Path) -> None:
    """On a terminal `blob put -` reads stdin through a progress wrapper; a non-blocking stdin
    with no data yet (readinto -> None) must fail the put, not store a truncated blob."""
    from clawstore.cli.blob import _ProgressReader
    from clawstore.cli.common import Progress

    class WouldBlock:
        def __init__(self) -> None:
            self.calls = 0

        def readinto(self, buf: bytearray | memoryview) -> int | None:
            self.calls += 1
            if self.calls == 1:
                buf[:4] = b"head"
                return 4
            return None

    store = clawstore.open(tmp_path / "s")
    with Progress("put", None) as bar, pytest.raises(BlockingIOError):
        store.put_blob(_ProgressReader(WouldBlock(), bar))  # type: ignore[arg-type]
    assert list(store.iter_blobs()) == []
    assert not store.has_blob(clawstore.digest_bytes(b"head"))


def test_every_listed_command_loads_and_help_lists_it() -> None:
    from clawstore.cli import _COMMANDS, load_command

    for name in _COMMANDS:
        assert load_command(name).name == name
    r = run(["--help"])
    assert r.code == 0
    for name in _COMMANDS:
        assert f"  {name} " in r.text


#: What a local-store command without a catalog must not import: the catalog (SQLAlchemy,
#: Alembic, a PostgreSQL driver), S3, the terminal UI (rich: only on a terminal), test tools,
#: and the areas it does not use.
HEAVY_MODULES = (
    "sqlalchemy",
    "alembic",
    "psycopg",
    "psycopg2",
    "boto3",
    "botocore",
    "rich",
    "hypothesis",
    "zstandard",
    "clawstore.hub",
    "clawstore.backends.s3",
    "clawstore.logs",
    "clawstore.caches",
    "clawstore.checkpoints",
    "clawstore.cli.hub",
)


@pytest.mark.parametrize(
    "args",
    [
        ["volume", "snapshot", "{tree}", "vol/x:latest"],
        ["volume", "snapshot", "{tree}", "vol/x:latest"],  # the no-change path
        ["volume", "restore", "vol/x:latest", "{dest}"],
        ["blob", "put", "{tree}/f"],
        ["tags", "vol/x"],
    ],
)
def test_local_commands_import_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    """The CLI starts fast: a local-store command without a catalog imports only what it uses."""
    tree = tmp_path / "tree"
    if not tree.exists():
        tree.mkdir()
        (tree / "f").write_bytes(b"data\n")
    store = tmp_path / "store"
    if args[:2] != ["volume", "snapshot"]:
        run(["--store", store.as_uri(), "volume", "snapshot", str(tree), "vol/x:latest"])
    argv = [a.format(tree=tree, dest=tmp_path / "dest") for a in args]
    code = (
        "import sys\n"
        "from clawstore.cli import cli\n"
        f"cli.main({['--store', store.as_uri(), *argv]!r}, standalone_mode=False)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CLAWSTORE_CATALOG"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = set(p.stdout.split())
    assert "clawstore._core" in loaded  # the command did run
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY_MODULES or m.startswith(HEAVY_MODULES))
    assert heavy == []
