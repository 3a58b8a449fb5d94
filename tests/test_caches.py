"""Caches: actions/cache key semantics, immutable entries, delta dedup between keys, restore
writing only what differs, typed errors for bad keys and crafted entries, kill -9 during save.

Oracle for trees: a walk with hashlib over (path, kind, mode, content / link target).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import clawstore
import pytest
import zstandard
from clawstore import caches
from clawstore import mediatypes as mt
from clawstore.errors import InvalidManifestError, InvalidNameError, RefNotFoundError, UnsafeArchiveError
from clawstore.manifest import Descriptor, ImageManifest, canonical_json


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def make_tree(root: Path, n: int = 200, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    files = []
    for i in range(n):
        p = root / f"pkg{i % 17}" / f"lib{i % 5}" / f"f{i}.js"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randrange(100, 3000)))
        files.append(p)
    (root / "pkg0" / "bin").mkdir(exist_ok=True)
    (root / "pkg0" / "bin" / "tool").symlink_to("../lib0/f0.js")
    os.chmod(files[1], 0o755)
    return files


# -- key semantics -------------------------------------------------------------------------------
# (existing (key, created_at) entries, key, restore keys, expected) per actions/cache's docs:
# exact key; else partial match of the key; else each restore key in order as a prefix; the most
# recently created entry when a prefix matches several.
KEYS = [("npm-linux-aaa", 1.0), ("npm-linux-bbb", 2.0), ("npm-macos-ccc", 3.0), ("pip-linux-ddd", 4.0)]
MATCH_TABLE = [
    (KEYS, "npm-linux-aaa", [], ("hit", "npm-linux-aaa")),
    (KEYS, "npm-linux-aaa", ["npm-"], ("hit", "npm-linux-aaa")),  # exact wins over newer prefix
    (KEYS, "npm-linux-zzz", [], None),
    (KEYS, "npm-linux-zzz", ["npm-linux-"], ("partial", "npm-linux-bbb")),  # newest of the prefix
    (KEYS, "npm-linux-zzz", ["npm-"], ("partial", "npm-macos-ccc")),
    (KEYS, "npm-linux-zzz", ["npm-linux-", "npm-"], ("partial", "npm-linux-bbb")),  # order of keys
    (KEYS, "npm-linux-zzz", ["yarn-", "npm-"], ("partial", "npm-macos-ccc")),
    (KEYS, "npm-linux-zzz", ["yarn-"], None),
    (KEYS, "npm-linux", [], ("partial", "npm-linux-bbb")),  # the key itself as a prefix first
    (KEYS, "npm-linux", ["pip-"], ("partial", "npm-linux-bbb")),
    (KEYS, "npm", ["pip-"], ("partial", "npm-macos-ccc")),
    (KEYS, "NPM-linux-aaa", [], None),  # case-sensitive
    (KEYS, "npm-linux-aaa-x", ["npm-linux-aaa"], ("partial", "npm-linux-aaa")),
    ([], "k", ["k"], None),
]


@pytest.mark.parametrize(("keys", "key", "restore_keys", "want"), MATCH_TABLE)
def test_match_table(
    keys: list[tuple[str, float]], key: str, restore_keys: list[str], want: tuple[str, str] | None
) -> None:
    assert caches.match(keys, key, restore_keys) == want


def test_lookup_through_the_store_follows_the_table(tmp_path: Path) -> None:
    store = clawstore.open(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    for k, _t in KEYS:  # saved in this order: creation times increase as in KEYS
        (src / "which").write_text(k)
        caches.save(store, k, src, base=None)
        time.sleep(0.002)
    for _keys, key, restore_keys, want in MATCH_TABLE[:-1]:
        kind, entry = caches.lookup(store, key, restore_keys)
        got = (kind, entry.key) if entry is not None else None
        assert got == want or (want is None and kind == "miss"), (key, restore_keys)
        out = tmp_path / f"out-{hashlib.sha256((key + str(restore_keys)).encode()).hexdigest()[:8]}"
        r = caches.restore(store, key, out, restore_keys=restore_keys)
        if want is None:
            assert r.kind == "miss" and not out.exists()
        else:
            assert (r.kind, r.key) == want
            assert (out / "which").read_text() == want[1]


@pytest.mark.parametrize(
    "key", ["", "a,b", "x" * 513, "tab\there", "nl\n", "\x00", "del\x7f"], ids=lambda k: repr(k)[:20]
)
def test_bad_keys_are_typed_errors(local_store: clawstore.ArtifactStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(InvalidNameError):
        caches.save(local_store, key, tmp_path)
    with pytest.raises(InvalidNameError):
        caches.restore(local_store, key, tmp_path / "o")
    with pytest.raises(InvalidNameError):
        caches.restore(local_store, "ok", tmp_path / "o", restore_keys=[key])


def test_long_and_unicode_keys_are_fine(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    for key in ["x" * 512, "日本語/キー:é!@#$%^&*()", "Linux-node-18-" + "f" * 64]:
        assert caches.save(local_store, key, src).created_now
        assert caches.restore(local_store, key, tmp_path / f"o{len(key)}").kind == "hit"


@pytest.mark.parametrize("scope", ["", "UPPER", "a//b", "../x", "-x", "a b"])
def test_bad_scopes_are_typed_errors(
    local_store: clawstore.ArtifactStore, tmp_path: Path, scope: str
) -> None:
    with pytest.raises(InvalidNameError):
        caches.save(local_store, "k", tmp_path, scope=scope)


# -- save / restore ------------------------------------------------------------------------------
def test_save_restore_roundtrip_and_immutability(store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 120)
    r = caches.save(store, "deps-1", src, scope="org/app")
    assert r.created_now and r.new_bytes > 0
    m = r.entry.manifest
    assert m.artifact_type == mt.CACHE and m.config.media_type == mt.CACHE
    assert [d.media_type for d in m.layers] == [mt.CACHE_LAYER, mt.CACHE_INDEX_ZSTD]
    want = tree(src)
    (src / "pkg1" / "lib1" / "f1.js").write_bytes(b"changed after save")
    again = caches.save(store, "deps-1", src, scope="org/app")
    assert not again.created_now and again.entry.digest == r.entry.digest
    out = tmp_path / "out"
    res = caches.restore(store, "deps-1", out, scope="org/app")
    assert res.kind == "hit" and res.key == "deps-1"
    assert tree(out) == want
    assert caches.restore(store, "deps-1", tmp_path / "o2").kind == "miss"  # other scope


def test_layer_decodes_with_independent_tools(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 30)
    e = caches.save(local_store, "k", src).entry
    raw = local_store.read_blob(e.layers[0].digest)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == str(e.layers[0].digest)
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = {m.name.removeprefix("./") for m in tf.getmembers()}
    assert set(tree(src)) <= names


def test_second_key_differing_by_one_percent_stores_little(
    store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 400)
    first = caches.save(store, "npm-linux-aaa", src)
    for p in files[::100]:  # 4 of 400 files
        p.write_bytes(os.urandom(p.stat().st_size))
    second = caches.save(store, "npm-linux-bbb", src)
    assert second.base == "npm-linux-aaa"
    assert second.new_bytes < 0.05 * first.new_bytes
    assert second.entry.layers[0] == first.entry.layers[0]  # the shared files are stored once
    out = tmp_path / "out"
    assert caches.restore(store, "npm-linux-bbb", out).kind == "hit"
    assert tree(out) == tree(src)


def test_chains_squash_past_max_chain(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 50)
    for i in range(6):
        files[i].write_bytes(b"v%d" % i)
        r = caches.save(local_store, f"k-{i}", src, max_chain=3)
        assert len(r.entry.layers) <= 3
        out = tmp_path / f"out{i}"
        caches.restore(local_store, f"k-{i}", out)
        assert tree(out) == tree(src)


def test_restore_into_existing_dir_writes_only_what_differs(
    local_store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 100)
    caches.save(local_store, "v1", src)
    v1 = tree(src)
    files[5].write_bytes(b"new content")
    files[6].unlink()
    (src / "added.txt").write_text("added")
    (src / "pkg3" / "lib3" / "f3.js").unlink()
    (src / "pkg3" / "lib3" / "f3.js").mkdir()  # a file becomes a directory
    caches.save(local_store, "v2", src)
    v2 = tree(src)

    out = tmp_path / "out"
    caches.restore(local_store, "v1", out)
    inode = {p: (out / p).lstat().st_ino for p in tree(out)}
    r = caches.restore(local_store, "v2", out)
    assert tree(out) == v2
    # written: the changed file, the new file, the new dir, and their parent dirs' metadata
    assert 0 < r.written <= 10 and r.removed == 1  # f6.js (f3.js changes type in place)
    untouched = [p for p in v2 if p in inode and "f5.js" not in p and "f3.js" not in p and v2[p][0] == "file"]
    assert untouched and all((out / p).lstat().st_ino == inode[p] for p in untouched)
    # restoring the same entry again writes nothing
    again = caches.restore(local_store, "v2", out)
    assert again.written == 0 and again.removed == 0
    # and back to v1 (the directory becomes a file again)
    caches.restore(local_store, "v1", out)
    assert tree(out) == v1


def test_delete_and_entries(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    caches.save(local_store, "one", tmp_path, scope="s")
    caches.save(local_store, "two", tmp_path, scope="s")
    assert [e.key for e in caches.entries(local_store, scope="s")] == ["two", "one"]
    assert caches.scopes(local_store) == ["s"]
    caches.delete(local_store, "one", scope="s")
    assert [e.key for e in caches.entries(local_store, scope="s")] == ["two"]
    with pytest.raises(RefNotFoundError):
        caches.delete(local_store, "one", scope="s")


# -- crafted entries -----------------------------------------------------------------------------
def _craft(
    store: clawstore.ArtifactStore, key: str, config: object, layers: tuple[Descriptor, ...] = ()
) -> None:
    cfg = store.put_blob(canonical_json(config), media_type=mt.CACHE)
    m = ImageManifest(
        cfg, layers, artifact_type=mt.CACHE, annotations={caches.A_KEY: key, caches.A_CREATED_AT: "1.0"}
    )
    store.tag(caches.repository("default"), caches.tag_of(key), store.put_manifest(m.to_json()).digest)


def test_crafted_entries_are_typed_errors(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    _craft(local_store, "k1", {"version": 99, "key": "k1"})
    with pytest.raises(InvalidManifestError, match="unsupported config"):
        caches.restore(local_store, "k1", tmp_path / "o")
    _craft(local_store, "k2", {"version": 1, "key": "someone-else"})
    with pytest.raises(InvalidManifestError, match="key"):
        caches.restore(local_store, "k2", tmp_path / "o")
    junk = local_store.put_blob(b"junk", media_type=mt.OCTET_STREAM)
    _craft(local_store, "k3", {"version": 1, "key": "k3"}, (junk,))
    with pytest.raises(InvalidManifestError, match="layer type"):
        caches.restore(local_store, "k3", tmp_path / "o")
    # entries that cannot be read are skipped by prefix lookups, not fatal
    assert caches.restore(local_store, "zz", tmp_path / "o", restore_keys=["k"]).kind == "miss"


def test_unsafe_layer_is_refused(local_store: clawstore.ArtifactStore, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../escape")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    blob = zstandard.ZstdCompressor().compress(buf.getvalue())
    layer = local_store.put_blob(blob, media_type=mt.CACHE_LAYER)
    layer = Descriptor(
        layer.digest,
        layer.size,
        mt.CACHE_LAYER,
        annotations={caches.A_UNCOMPRESSED: str(len(buf.getvalue()))},
    )
    src = tmp_path / "src"
    src.mkdir()
    index = local_store.put_blob(clawstore._core.scan_tree(src).encode(), media_type=mt.CACHE_INDEX_ZSTD)
    _craft(local_store, "evil", {"version": 1, "key": "evil", "index": index.to_dict()}, (layer, index))
    with pytest.raises(UnsafeArchiveError):
        caches.restore(local_store, "evil", tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "escape").exists()
    assert not any(p.name.startswith(".x.") for p in (tmp_path / "out").iterdir())


# -- kill -9 -------------------------------------------------------------------------------------
SAVER = r"""
import sys, clawstore
from clawstore import caches
store = clawstore.open(sys.argv[1])
caches.save(store, sys.argv[2], sys.argv[3])
print("saved", flush=True)
"""


@pytest.mark.slow
def test_kill9_during_save_leaves_no_entry_or_a_whole_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 300)
    big = src / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    root = tmp_path / "store"
    clawstore.open(root).close()
    want = tree(src)
    rng = random.Random(7)
    for i in range(4):
        p = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(root), f"key-{i}", str(src)], stdout=subprocess.PIPE
        )
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        with clawstore.open(root) as store:
            out = tmp_path / f"out{i}"
            r = caches.restore(store, f"key-{i}", out)
            assert r.kind in ("hit", "miss")
            if r.kind == "hit":
                assert tree(out) == want
            # a save after the crash always completes
            assert caches.save(store, f"key-{i}", src).entry is not None
            assert caches.restore(store, f"key-{i}", tmp_path / f"again{i}").kind == "hit"
            assert tree(tmp_path / f"again{i}") == want


def test_a_copied_tree_dedups_against_its_original(
    local_store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    """New inodes and ctimes (cp -a, a fresh restore, a CI checkout) are not changes."""
    src = tmp_path / "src"
    files = make_tree(src, 300)
    first = caches.save(local_store, "k-1", src)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(src), str(copy)], check=True)
    files[0].write_bytes(b"x")  # only in src, not in the copy
    second = caches.save(local_store, "k-2", copy)
    assert second.base == "k-1" and second.new_bytes == 0
    assert second.entry.layers == first.entry.layers
    (copy / "pkg0" / "lib0" / "f0.js").write_bytes(b"changed in the copy")
    third = caches.save(local_store, "k-3", copy)
    assert 0 < third.new_bytes < 0.05 * first.new_bytes
    out = tmp_path / "out"
    caches.restore(local_store, "k-3", out)
    assert tree(out) == tree(copy)


def test_content_digests_catch_same_size_same_mtime_edits(
    local_store: clawstore.ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"aaaa")
    st = f.stat()
    caches.save(local_store, "q-1", src, content_digests=True)
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    quick = caches.save(local_store, "q-2", src)  # the quick check cannot see it
    assert quick.new_bytes == 0
    thorough = caches.save(local_store, "q-3", src, content_digests=True, base="q-1")
    assert thorough.new_bytes > 0
    out = tmp_path / "out"
    caches.restore(local_store, "q-3", out)
    assert (out / "f").read_bytes() == b"bbbb"
    caches.restore(local_store, "q-1", out)  # same size and mtime: only a content check sees it
    assert (out / "f").read_bytes() == b"bbbb"
    caches.restore(local_store, "q-1", out, check_content=True)
    assert (out / "f").read_bytes() == b"aaaa"
