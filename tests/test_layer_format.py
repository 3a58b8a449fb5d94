"""Layers are plain tar+zstd: read back by the `zstd`/`tar` commands and by Python zstandard +
tarfile, with the blob digest and diff_id checked by hashlib / blake3 (independent oracles)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import blake3
import pytest
import zstandard
from clawstore import _core
from volume_trees import assert_same_tree, describe, make_every_kind


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_every_kind(src, big=2 * 1024 * 1024 + 3)
    return src


def pack(src: Path, out: Path, **kw: object) -> dict:
    return _core.pack_to_file(_core.scan_tree(src), out, **kw)


def test_digest_and_diff_id_by_hashlib(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "layer.tar.zst"
    r = pack(tree, out)
    blob = out.read_bytes()
    assert r["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert r["size"] == len(blob)
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    assert r["diff_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert r["uncompressed_size"] == len(raw)
    assert r["files"] == sum(1 for d in describe(tree).values() if d[0] == 0o100000)


def test_blake3_blob_digest(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "layer.tar.zst"
    r = pack(tree, out, algorithm="blake3")
    assert r["digest"] == "blake3:" + blake3.blake3(out.read_bytes()).hexdigest()
    assert r["diff_id"].startswith("sha256:")


def test_python_tarfile_reads_every_member(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "layer.tar.zst"
    pack(tree, out)
    with (
        open(out, "rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f) as z,
        tarfile.open(fileobj=z, mode="r|") as tf,
    ):
        members = {}
        for m in tf:
            members[m.name.rstrip("/")] = m
            if m.isfile():
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                assert data == (tree / m.name).read_bytes(), m.name
    assert members["."].isdir()
    assert members["abs-link"].issym() and members["abs-link"].linkname == "/etc/hostname"
    assert members["long-target-link"].linkname == "x" * 200
    hl = members["nested/big-hardlink"]
    assert hl.islnk() and hl.linkname == "big.bin"
    assert members["empty dir"].isdir()
    assert members["setuid"].mode == 0o4755
    text = members["text.py"]
    assert text.pax_headers["mtime"] == "1700000000.123456789"
    assert members["empty-file"].pax_headers["mtime"] == "-5.000000001"
    long_name = next(n for n in members if n.endswith("x" * 150 + ".txt"))
    assert len(long_name) > 250
    assert members["héllo wörld ✓.txt"].isfile()
    # deterministic member order: sorted paths, root first
    names = list(members)
    assert names[0] == "." and names[1:] == sorted(names[1:], key=lambda s: s.encode())


@pytest.mark.skipif(not (shutil.which("zstd") and shutil.which("tar")), reason="zstd/tar commands missing")
def test_zstd_and_tar_commands_extract_identical_tree(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "layer.tar.zst"
    pack(tree, out)
    dest = tmp_path / "by-tar"
    dest.mkdir()
    p = subprocess.run(
        f"zstd -dc '{out}' | tar -xpf - -C '{dest}'", shell=True, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert_same_tree(tree, dest)
    # and `zstd -t` / `tar -t` agree on the member list
    listing = subprocess.run(
        f"zstd -dc '{out}' | tar -tf -", shell=True, capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert len(listing) == len(describe(tree))


def test_deterministic_across_threads_and_stream_equals_file(tree: Path, tmp_path: Path) -> None:
    a = pack(tree, tmp_path / "a", threads=1)
    b = pack(tree, tmp_path / "b", threads=2, readers=1)
    assert a == b
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    stream = _core.PackStream(_core.scan_tree(tree))
    buf = bytearray(100_000)
    chunks = []
    while n := stream.readinto(buf):
        chunks.append(bytes(buf[:n]))
    assert stream.result() == a
    assert b"".join(chunks) == (tmp_path / "a").read_bytes()


def test_unread_stream_has_no_result(tree: Path) -> None:
    stream = _core.PackStream(_core.scan_tree(tree))
    stream.read(10)
    with pytest.raises(ValueError, match="not read to the end"):
        stream.result()
    stream.close()


def test_delta_layer_holds_changes_and_whiteouts(tree: Path, tmp_path: Path) -> None:
    old = _core.scan_tree(tree)
    os.remove(tree / "private")
    shutil.rmtree(tree / "nested" / "deeper")
    (tree / "added").write_text("added")
    new = _core.scan_tree(tree)
    delta = new.diff(_core.decode_index(old.encode()))
    assert sorted(delta.whiteouts) == ["nested/deeper", "private"]
    out = tmp_path / "delta.tar.zst"
    r = _core.pack_to_file(new, out, delta)
    with (
        open(out, "rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f) as z,
        tarfile.open(fileobj=z, mode="r|") as tf,
    ):
        names = [m.name for m in tf]
    assert "nested/.wh.deeper" in names and ".wh.private" in names and "added" in names
    assert "big.bin" not in names
    assert r["entries"] == len(names)


def test_file_vanishing_during_pack_is_an_error(tree: Path, tmp_path: Path) -> None:
    scan = _core.scan_tree(tree)
    os.remove(tree / "private")
    with pytest.raises(OSError, match="private"):
        _core.pack_to_file(scan, tmp_path / "x")
    stream = _core.PackStream(scan)
    with pytest.raises(OSError):
        stream.read()


def test_scan_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside, src / "link")
    paths = [e[0] for e in _core.scan_tree(src).entries()]
    assert paths == [".", "link"]
