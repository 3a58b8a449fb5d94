"""OCI image layout export read by an independent tool (skopeo), and import of layouts written
by us and by skopeo."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import clawstore
import pytest
import zstandard
from clawstore import checkpoints as cp
from clawstore import mediatypes as mt
from clawstore.hub import Hub
from clawstore.manifest import Descriptor, ImageManifest, canonical_json
from hubutil import ADMIN

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo not installed (apt-get install skopeo)")


def skopeo(*args: str) -> str:
    assert SKOPEO is not None
    r = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def push_image(s: clawstore.ArtifactStore, repo: str, tag: str) -> Descriptor:
    """A real (tiny) OCI container image: tar layer + image config with its diff_id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"hello from clawstore\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    layer_bytes = buf.getvalue()
    layer = s.put_blob(layer_bytes, media_type=mt.OCI_LAYER_TAR)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"]},
        "config": {},
    }
    cfg = s.put_blob(canonical_json(config), media_type=mt.OCI_CONFIG)
    m = ImageManifest(Descriptor(cfg.digest, cfg.size, mt.OCI_CONFIG), (layer,))
    d = s.put_manifest(m.to_json())
    s.tag(repo, tag, d.digest)
    return d


@needs_skopeo
def test_skopeo_reads_exported_image(hub: Hub, tmp_path: Path) -> None:
    with hub.session(ADMIN, "img/hello") as s:
        d = push_image(s, "img/hello", "v1")
    layout = tmp_path / "oci"
    hub.export_oci(ADMIN, "img/hello:v1", layout)
    info = json.loads(skopeo("inspect", f"oci:{layout}:v1"))
    m = hub.store.get_manifest_typed(d.digest)
    assert info["Digest"] == d.digest
    assert info["Layers"] == [str(m.layers[0].digest)]
    assert info["Os"] == "linux" and info["Architecture"] == "amd64"
    # skopeo copies every blob out, verifying digests as it goes.
    skopeo("copy", f"oci:{layout}:v1", f"dir:{tmp_path / 'dir'}")
    copied = {p.name for p in (tmp_path / "dir").iterdir()}
    assert {m.config.digest.encoded, m.layers[0].digest.encoded} <= copied


@needs_skopeo
def test_skopeo_copies_exported_checkpoint_artifact(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    (src / "b.txt").write_bytes(b"beta")
    with hub.session(ADMIN, "ck/x") as s:
        r = cp.create(s, "ck/x:t1", src)
    layout = tmp_path / "oci"
    hub.export_oci(ADMIN, "ck/x:t1", layout)
    raw = skopeo("inspect", "--raw", f"oci:{layout}:t1")
    assert hashlib.sha256(raw.encode()).hexdigest() == r.digest.encoded  # byte-identical
    skopeo("copy", f"oci:{layout}:t1", f"dir:{tmp_path / 'dir'}")
    copied = tmp_path / "dir"
    # the pack is an ordinary tar+zstd layer (its frames read as one stream)
    m = hub.store.get_manifest_typed(r.digest)
    assert [d.media_type for d in m.layers] == [mt.CHECKPOINT_PACK]
    pack = (copied / m.layers[0].digest.encoded).read_bytes()
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(pack), read_across_frames=True).read()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        got = {ti.name: tf.extractfile(ti).read() for ti in tf.getmembers()}  # type: ignore[union-attr]
    assert got == {"a.txt": b"alpha", "b.txt": b"beta"}
    # and a store that imports the layout restores the checkpoint
    other = Hub(clawstore.open(tmp_path / "other"), f"sqlite:///{tmp_path / 'other.sqlite'}")
    other.import_oci(ADMIN, layout, "copied/x")
    cp.restore(other.store, "copied/x:t1", tmp_path / "out")
    assert (tmp_path / "out" / "b.txt").read_bytes() == b"beta"
    other.close()


def test_export_import_round_trip_keeps_digests(hub: Hub, tmp_path: Path) -> None:
    with hub.session(ADMIN, "img/hello") as s:
        d1 = push_image(s, "img/hello", "v1")
    layout = tmp_path / "oci"
    hub.export_oci(ADMIN, "img/hello:v1", layout)
    hub.export_oci(ADMIN, "img/hello:v1", layout)  # idempotent; one index entry per name
    index = json.loads((layout / "index.json").read_text())
    assert len(index["manifests"]) == 1
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    other = Hub(clawstore.open(tmp_path / "other"), f"sqlite:///{tmp_path / 'other.sqlite'}")
    got = other.import_oci(ADMIN, layout, "copied/hello")
    assert got == [("v1", d1.digest)]
    assert other.fsck(ADMIN, verify_blobs=True).ok
    other.close()


def test_import_rejects_tampered_layout(hub: Hub, tmp_path: Path) -> None:
    with hub.session(ADMIN, "img/hello") as s:
        d = push_image(s, "img/hello", "v1")
    layout = tmp_path / "oci"
    hub.export_oci(ADMIN, "img/hello:v1", layout)
    layer = hub.store.get_manifest_typed(d.digest).layers[0]
    p = layout / "blobs" / "sha256" / layer.digest.encoded
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    other = Hub(clawstore.open(tmp_path / "other"), f"sqlite:///{tmp_path / 'other.sqlite'}")
    with pytest.raises(clawstore.DigestMismatchError):
        other.import_oci(ADMIN, layout, "copied/hello")
    assert not other.store.has_blob(layer.digest)
    other.close()


@needs_skopeo
def test_import_layout_written_by_skopeo(hub: Hub, tmp_path: Path) -> None:
    with hub.session(ADMIN, "img/hello") as s:
        d = push_image(s, "img/hello", "v1")
    hub.export_oci(ADMIN, "img/hello:v1", tmp_path / "ours")
    # skopeo writes its own layout (its own index.json and manifest serialisation)
    skopeo("copy", f"oci:{tmp_path / 'ours'}:v1", f"oci:{tmp_path / 'theirs'}:copied")
    got = hub.import_oci(ADMIN, tmp_path / "theirs", "img/back")
    assert [name for name, _ in got] == ["copied"]
    ours, theirs = hub.store.get_manifest_typed(d.digest), hub.store.get_manifest_typed(got[0][1])
    assert isinstance(theirs, ImageManifest) and isinstance(ours, ImageManifest)
    assert theirs.config.digest == ours.config.digest
    # skopeo may recompress the layer on the way; its content must still be our tar
    (mine,), (copy,) = ours.layers, theirs.layers
    raw = hub.store.read_blob(copy.digest)
    if copy.media_type.endswith("+gzip"):
        import gzip

        raw = gzip.decompress(raw)
    assert hashlib.sha256(raw).hexdigest() == mine.digest.encoded
    # with --preserve-digests the manifest bytes survive too
    skopeo("copy", "--preserve-digests", f"oci:{tmp_path / 'ours'}:v1", f"oci:{tmp_path / 'same'}:kept")
    assert hub.import_oci(ADMIN, tmp_path / "same", "img/same") == [("kept", d.digest)]
    assert hub.fsck(ADMIN).ok
