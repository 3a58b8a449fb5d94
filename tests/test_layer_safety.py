"""Crafted malicious layers (built with Python tarfile + zstandard, not with our packer) are
refused with UnsafeArchiveError and nothing is written or deleted outside the target."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import clawstore
import pytest
import zstandard
from clawstore import _core, volumes
from clawstore import mediatypes as mt
from clawstore.errors import UnsafeArchiveError
from clawstore.manifest import Descriptor, ImageManifest, canonical_json

Member = tuple[tarfile.TarInfo, bytes | None]


def info(
    name: str, kind: bytes = tarfile.REGTYPE, *, size: int = 0, link: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.size = size
    t.linkname = link
    t.mode = mode
    return t


def layer(members: list[Member]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return zstandard.ZstdCompressor(level=3).compress(raw.getvalue())


class Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def bomb(size: int) -> bytes:
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=3)
    with (
        cctx.stream_writer(out, closefd=False) as w,
        tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tf,  # type: ignore[call-overload]
    ):
        tf.addfile(info("zeros", size=size), Zeros(size))
    return out.getvalue()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(target, outside): an empty target and a sibling directory holding a secret."""
    target = tmp_path / "target"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    before = snapshot_of(tmp_path, skip=target)
    yield target, outside
    assert snapshot_of(tmp_path, skip=target) == before, "something outside the target changed"


def snapshot_of(root: Path, skip: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p == skip:
                continue
            out[str(p)] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def unpack(target: Path, *layers: bytes, **limits: object) -> None:
    u = _core.Unpacker(target, **limits)
    for data in layers:
        u.apply(io.BytesIO(data))
    u.finish()


def refused(target: Path, *layers: bytes, **limits: object) -> None:
    with pytest.raises(UnsafeArchiveError):
        unpack(target, *layers, **limits)


def test_absolute_path(world: tuple[Path, Path]) -> None:
    target, outside = world
    refused(target, layer([(info(str(outside / "abs-evil"), size=4), b"evil")]))
    assert not (outside / "abs-evil").exists()


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "a/b/../../../evil", ".."])
def test_dot_dot(world: tuple[Path, Path], name: str) -> None:
    target, _ = world
    refused(target, layer([(info("a", tarfile.DIRTYPE, mode=0o755), None), (info(name, size=4), b"evil")]))


def test_symlink_then_write_through_same_layer(world: tuple[Path, Path]) -> None:
    target, outside = world
    refused(
        target,
        layer(
            [(info("link", tarfile.SYMTYPE, link=str(outside)), None), (info("link/pwned", size=4), b"evil")]
        ),
    )
    assert not (outside / "pwned").exists()


def test_symlink_then_overwrite_through_same_layer(world: tuple[Path, Path]) -> None:
    target, outside = world
    # a symlink to the outside secret, then a regular file of the same name: the symlink is
    # replaced, the secret is untouched
    unpack(
        target,
        layer(
            [(info("s", tarfile.SYMTYPE, link=str(outside / "secret")), None), (info("s", size=3), b"new")]
        ),
    )
    assert (target / "s").read_bytes() == b"new" and not (target / "s").is_symlink()


def test_symlink_from_earlier_layer_then_write_through(world: tuple[Path, Path]) -> None:
    target, _ = world
    first = layer([(info("d", tarfile.SYMTYPE, link="../outside"), None)])
    second = layer([(info("d/secret", size=4), b"evil")])
    refused(target, first, second)


def test_symlinked_dir_then_mkdir_through(world: tuple[Path, Path]) -> None:
    target, outside = world
    refused(
        target,
        layer(
            [(info("d", tarfile.SYMTYPE, link=str(outside)), None), (info("d/sub", tarfile.DIRTYPE), None)]
        ),
    )
    assert not (outside / "sub").exists()


@pytest.mark.parametrize("link", ["../outside/secret", "/etc/passwd", "a/../../outside/secret"])
def test_hardlink_escape(world: tuple[Path, Path], link: str) -> None:
    target, _ = world
    refused(target, layer([(info("hl", tarfile.LNKTYPE, link=link), None)]))


def test_hardlink_through_symlink(world: tuple[Path, Path]) -> None:
    target, outside = world
    refused(
        target,
        layer(
            [
                (info("s", tarfile.SYMTYPE, link=str(outside)), None),
                (info("hl", tarfile.LNKTYPE, link="s/secret"), None),
            ]
        ),
    )
    assert os.stat(outside / "secret").st_nlink == 1


def test_whiteout_through_symlink_deletes_nothing(world: tuple[Path, Path]) -> None:
    target, outside = world
    first = layer([(info("s", tarfile.SYMTYPE, link=str(outside)), None)])
    second = layer([(info("s/.wh.secret"), b"")])
    refused(target, first, second)
    assert (outside / "secret").exists()


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_and_fifos_refused_unless_allowed(world: tuple[Path, Path], kind: bytes) -> None:
    target, _ = world
    ti = info("dev", kind)
    ti.devmajor, ti.devminor = 1, 3
    refused(target, layer([(ti, None)]))
    if kind == tarfile.FIFOTYPE:
        fresh = target / "fresh"
        fresh.mkdir()
        unpack(fresh, layer([(ti, None)]), allow_devices=True)
        assert (fresh / "dev").exists()


def test_zstd_bomb_refused_by_ratio(world: tuple[Path, Path]) -> None:
    target, _ = world
    data = bomb(100 << 20)
    assert len(data) < 200_000
    refused(target, data)


def test_bytes_limit(world: tuple[Path, Path]) -> None:
    target, _ = world
    refused(target, bomb(8 << 20), max_bytes=4 << 20, max_ratio=0)


def test_declared_size_limit(world: tuple[Path, Path]) -> None:
    target, _ = world
    u = _core.Unpacker(target, max_ratio=0)
    with pytest.raises(UnsafeArchiveError, match="declares"):
        u.apply(io.BytesIO(bomb(4 << 20)), size=1 << 20)


def test_tar_bomb_entries_limit(world: tuple[Path, Path]) -> None:
    target, _ = world
    refused(target, layer([(info(f"f{i}"), b"") for i in range(300)]), max_entries=100)


def test_diff_id_mismatch(world: tuple[Path, Path]) -> None:
    target, _ = world
    data = layer([(info("f", size=1), b"x")])
    u = _core.Unpacker(target)
    with pytest.raises(clawstore.DigestMismatchError):
        u.apply(io.BytesIO(data), diff_id="sha256:" + "0" * 64)


def test_blob_digest_checked_for_paths(world: tuple[Path, Path], tmp_path: Path) -> None:
    target, _ = world
    blob = tmp_path / "outside" / "blob"
    blob.write_bytes(layer([(info("f", size=1), b"x")]))
    u = _core.Unpacker(target)
    with pytest.raises(clawstore.DigestMismatchError):
        u.apply(blob, digest="sha256:" + hashlib.sha256(b"other").hexdigest())
    blob.unlink()


def test_malicious_volume_restore_leaves_nothing(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = layer(
        [(info("link", tarfile.SYMTYPE, link=str(outside)), None), (info("link/pwned", size=4), b"evil")]
    )
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(evil)
    ld = store.put_blob(evil, media_type=mt.VOLUME_LAYER)
    index = store.put_blob(_core.scan_tree(outside).encode(), media_type=mt.VOLUME_INDEX_ZSTD)
    config = canonical_json(
        {"version": 1, "entries": 2, "files": 1, "bytes": 4, "parent": None, "index": index.to_dict()}
    )
    cd = store.put_blob(config, media_type=mt.VOLUME)
    layer_desc = Descriptor(
        ld.digest,
        ld.size,
        mt.VOLUME_LAYER,
        annotations={
            volumes.ANNOTATION_DIFF_ID: "sha256:" + hashlib.sha256(raw).hexdigest(),
            volumes.ANNOTATION_UNCOMPRESSED_SIZE: str(len(raw)),
        },
    )
    m = ImageManifest(config=cd, layers=(layer_desc, index), artifact_type=mt.VOLUME)
    md = store.put_manifest(m.to_json())
    store.tag("evil/vol", "latest", md.digest)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError):
        volumes.restore(store, "evil/vol:latest", dest)
    assert not dest.exists()
    assert not (outside / "pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "store"] or not any(
        p.name.startswith(".dest") for p in tmp_path.iterdir()
    )
