"""Bad input: every malformed digest, name or manifest gets its typed error, before any I/O.

Each test snapshots the whole tmp_path (the store lives inside it, and the test runs with its
working directory inside it too) and the store's own listing, and checks nothing changed: no
file, directory or temp file inside or outside the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import clawstore
import pytest
from clawstore import (
    ArtifactStore,
    Digest,
    DigestMismatchError,
    ImageManifest,
    Index,
    InvalidDigestError,
    InvalidManifestError,
    InvalidNameError,
    Reference,
)
from clawstore import mediatypes as mt
from clawstore.manifest import EMPTY_CONFIG, MAX_MANIFEST_SIZE, canonical_json, parse_manifest

HEX = hashlib.sha256(b"x").hexdigest()
GOOD = f"sha256:{HEX}"

BAD_DIGESTS: list[Any] = [
    "",
    "sha256",
    "sha256:",
    ":" + HEX,
    f"SHA256:{HEX}",
    f"sha256:{HEX.upper()}",
    f"sha256:{HEX[:-1]}",
    f"sha256:{HEX}0",
    f"sha512:{HEX}",
    f"blake3:{HEX * 2}",
    f"md5:{hashlib.md5(b'x').hexdigest()}",
    f"sha1:{hashlib.sha1(b'x').hexdigest()}",
    f"sha256+b64u:{HEX}",
    "sha256:../..",
    "sha256:../../../../etc/passwd",
    f"sha256:../{HEX[3:]}",
    f"sha256:{HEX[:10]}/{HEX[11:]}",
    f"sha256:{HEX[:-1]}\x00",
    f"sha256\x00:{HEX}",
    f"sha256:{HEX}\n",
    f" sha256:{HEX}",
    f"sha256: {HEX[1:]}",
    f"sha256:{HEX[:-1]}g",
    "sha256:" + "\u0663" * 64,  # Arabic-Indic digit three: a digit, not hex
    "sha256:" + "\udc80" * 64,  # a lone surrogate (not encodable as UTF-8)
    f"sha256::{HEX[1:]}",
    None,
    42,
    HEX.encode(),
    GOOD.encode(),
    ["sha256", HEX],
]

BAD_REPOS: list[Any] = [
    "",
    ".",
    "..",
    "../x",
    "x/..",
    "x/../y",
    "x/./y",
    "/abs",
    "/",
    "//",
    "a//b",
    "a/",
    "a\\b",
    "a\x00b",
    "a\x00",
    "A",
    "aB",
    "a b",
    "a:b",
    "a@b",
    "a\n",
    "-a",
    "a-",
    "_a",
    "a_",
    "a___b",
    ".a",
    "a.",
    "a..b",
    "a/_tags",
    "ü",
    "a" * 256,
    "/".join(["abcdefg"] * 32) + "h",  # 256 characters of valid components
    None,
    7,
    b"repo",
]

BAD_TAGS: list[Any] = [
    "",
    ".",
    "..",
    ".hidden",
    "-x",
    "a/b",
    "/x",
    "x" * 129,
    "a\x00",
    "\x00",
    "a b",
    "a:b",
    "a@b",
    "tag\n",
    "ü",
    ".lock",
    None,
    3,
    b"latest",
]


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under root: relative path -> (kind, size, content hash)."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir", 0, "")
        for f in filenames:
            p = os.path.join(dirpath, f)
            data = Path(p).read_bytes() if not os.path.islink(p) else os.readlink(p).encode()
            out[os.path.relpath(p, root)] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return out


def listing(store: ArtifactStore) -> tuple[Any, ...]:
    repos = store.list_repos()
    return (
        sorted(store.iter_blobs()),
        sorted(store.iter_manifests()),
        repos,
        [store.list_tags(r) for r in repos],
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArtifactStore, Path]]:
    """One populated store (a blob, a manifest, tags) for the module: bad input is refused before
    any backend call, and every test checks the whole directory is unchanged, so sharing it only
    makes the check stricter (nothing may accumulate either)."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "cwd").mkdir()
    with clawstore.open(root / "store") as store:
        store.put_blob(mt.EMPTY_JSON)
        layer = store.put_blob(b"layer")
        d = store.put_manifest(ImageManifest(EMPTY_CONFIG, (layer,), artifact_type=mt.VOLUME).to_json())
        store.tag("repo", "latest", d.digest)
        store.tag("repo/sub", "latest", d.digest)
        yield store, root


@pytest.fixture
def populated(shared: tuple[ArtifactStore, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[ArtifactStore]:
    """The shared store, with cwd inside its directory; unchanged afterwards, inside and out."""
    store, root = shared
    cwd = root / "cwd"
    monkeypatch.chdir(cwd)
    before_tree, before_list = tree(root), listing(store)
    yield store
    assert tree(root) == before_tree
    assert listing(store) == before_list
    assert os.listdir(cwd) == []


def ids(values: list[Any]) -> list[str]:
    return [repr(v)[:40] for v in values]


# -- digests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_DIGESTS, ids=ids(BAD_DIGESTS))
def test_bad_digest_parse(bad: Any) -> None:
    with pytest.raises(InvalidDigestError):
        Digest.parse(bad)
    with pytest.raises(InvalidDigestError):
        Digest(bad)


@pytest.mark.parametrize("bad", BAD_DIGESTS, ids=ids(BAD_DIGESTS))
def test_bad_digest_everywhere(populated: ArtifactStore, bad: Any) -> None:
    s = populated
    good_manifest = s.resolve("repo", "latest")
    calls: list[Callable[[], object]] = [
        lambda: s.get_blob(bad),
        lambda: s.read_blob(bad),
        lambda: s.stat_blob(bad),
        lambda: s.has_blob(bad),
        lambda: s.delete_blob(bad),
        lambda: s.get_manifest(bad),
        lambda: s.stat_manifest(bad),
        lambda: s.has_manifest(bad),
        lambda: s.delete_manifest(bad),
        lambda: s.put_blob(b"new content", expected=bad),
        lambda: s.put_blob(Path("nonexistent"), expected=bad),
        lambda: s.put_manifest(s.get_manifest(good_manifest), expected=bad),
        lambda: s.tag("repo", "new", bad),
        lambda: s.tag("repo", "latest", good_manifest, expect=bad),
        lambda: s.untag("repo", "latest", expect=bad),
    ]
    if bad is None:  # expected=None means "no expectation": those calls are legitimate
        calls = [c for i, c in enumerate(calls) if i not in (9, 10, 11)]
    for call in calls:
        with pytest.raises(InvalidDigestError):
            call()


@pytest.mark.parametrize("algorithm", ["md5", "SHA256", "sha-256", "", "../x", "sha256\x00"])
def test_bad_algorithm(populated: ArtifactStore, algorithm: str) -> None:
    with pytest.raises(InvalidDigestError):
        populated.put_blob(b"data", algorithm=algorithm)
    with pytest.raises(InvalidDigestError):
        clawstore.digest_bytes(b"data", algorithm)
    with pytest.raises(InvalidDigestError):
        clawstore.Hasher(algorithm)


def test_digest_mismatch_writes_nothing(populated: ArtifactStore) -> None:
    src = Path("src").absolute()  # in cwd, inside the checked directory
    with pytest.raises(DigestMismatchError):
        populated.put_blob(b"some bytes", expected=GOOD)
    import io

    with pytest.raises(DigestMismatchError):
        populated.put_blob(io.BytesIO(b"some bytes" * 100000), expected=GOOD)
    src.write_bytes(b"file bytes" * 100000)
    try:
        with pytest.raises(DigestMismatchError):
            populated.put_blob(src, expected=GOOD)
    finally:
        src.unlink()


# -- names ---------------------------------------------------------------------------------------


def test_repo_length_limit(store: ArtifactStore) -> None:
    m = store.put_manifest(
        ImageManifest(store.put_blob(b"{}", media_type=mt.OCI_EMPTY), (), artifact_type=mt.VOLUME).to_json()
    ).digest
    longest = "/".join(["a" * 127, "b" * 127])  # 255 characters: allowed
    assert len(longest) == 255
    store.tag(longest, "t", m)
    assert store.resolve(longest, "t") == m
    assert store.list_repos() == [longest]
    with pytest.raises(InvalidNameError):
        store.tag(longest + "c", "t", m)


@pytest.mark.parametrize("bad", BAD_REPOS, ids=ids(BAD_REPOS))
def test_bad_repository(populated: ArtifactStore, bad: Any) -> None:
    s = populated
    m = s.resolve("repo", "latest")
    for call in (
        lambda: s.resolve(bad, "latest"),
        lambda: s.tag(bad, "latest", m),
        lambda: s.tag(bad, "latest", m, expect=clawstore.MISSING),
        lambda: s.untag(bad, "latest"),
        lambda: s.list_tags(bad),
    ):
        with pytest.raises(InvalidNameError):
            call()
    if isinstance(bad, str) and ":" not in bad and "@" not in bad:
        with pytest.raises(InvalidNameError):
            Reference.parse(f"{bad}:latest")


@pytest.mark.parametrize("bad", BAD_TAGS, ids=ids(BAD_TAGS))
def test_bad_tag(populated: ArtifactStore, bad: Any) -> None:
    s = populated
    m = s.resolve("repo", "latest")
    for call in (
        lambda: s.resolve("repo", bad),
        lambda: s.tag("repo", bad, m),
        lambda: s.untag("repo", bad),
    ):
        with pytest.raises(InvalidNameError):
            call()
    if isinstance(bad, str) and bad and "/" not in bad and ":" not in bad and "@" not in bad:
        with pytest.raises(InvalidNameError):
            Reference.parse(f"repo:{bad}")


def test_names_checked_before_digest_or_manifest(populated: ArtifactStore) -> None:
    """A bad name is refused even when the digest is fine and the manifest exists."""
    with pytest.raises(InvalidNameError):
        populated.tag("../escape", "t", populated.resolve("repo", "latest"))
    with pytest.raises(InvalidNameError):
        populated.tag("repo", "../../escape", GOOD)


def test_good_edge_names(store: ArtifactStore) -> None:
    m = store.put_manifest(
        ImageManifest(store.put_blob(b"{}", media_type=mt.OCI_EMPTY), (), artifact_type=mt.VOLUME).to_json()
    ).digest
    for repo in ("a", "0", "a.b", "a_b", "a__b", "a---b", "a/b/c/d/e", "volumes/workspace/alice"):
        for tag in ("t", "_", "A", "0", "a" * 128, "v1.0-rc_1", "_tags"):
            store.tag(repo, tag, m)
            assert store.resolve(repo, tag) == m


# -- manifests -----------------------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    return ImageManifest(
        EMPTY_CONFIG, (clawstore.Descriptor.for_bytes(b"layer", mt.VOLUME_LAYER),), artifact_type=mt.VOLUME
    ).to_dict()


def _with(**changes: Any) -> bytes:
    obj = _valid()
    for k, v in changes.items():
        if v is ...:
            del obj[k]
        else:
            obj[k] = v
    return canonical_json(obj)


def _layer(**changes: Any) -> bytes:
    obj = _valid()
    layer = obj["layers"][0]
    for k, v in changes.items():
        if v is ...:
            del layer[k]
        else:
            layer[k] = v
    return canonical_json(obj)


VALID = canonical_json(_valid())
DEEP = b'{"schemaVersion":2,"annotations":' + b"[" * 200_000 + b"]" * 200_000 + b"}"

BAD_MANIFESTS: dict[str, Any] = {
    "empty": b"",
    "not json": b"not json",
    "truncated": VALID[:-1],
    "trailing garbage": VALID + b"}",
    "array": b"[]",
    "string": b'"manifest"',
    "number": b"2",
    "null": b"null",
    "latin1": VALID.replace(b"layer", "l\xe4yer".encode("latin-1")),
    "utf-16": VALID.decode().encode("utf-16"),
    "utf-8 bom": b"\xef\xbb\xbf" + VALID,
    "NaN": VALID.replace(b'"schemaVersion":2', b'"schemaVersion":NaN'),
    "duplicate key": VALID.replace(b'"schemaVersion":2', b'"schemaVersion":2,"schemaVersion":2'),
    "duplicate mediaType": VALID[:-1] + b',"mediaType":"application/vnd.oci.image.index.v1+json"}',
    "deep nesting": DEEP,
    "schemaVersion 1": _with(schemaVersion=1),
    "schemaVersion '2'": _with(schemaVersion="2"),
    "schemaVersion 2.0": _with(schemaVersion=2.0),
    "schemaVersion true": _with(schemaVersion=True),
    "schemaVersion missing": _with(schemaVersion=...),
    "config missing": _with(config=...),
    "config not object": _with(config="sha256:" + HEX),
    "layers missing": _with(layers=...),
    "layers not list": _with(layers={}),
    "layer not object": _with(layers=[GOOD]),
    "layer digest missing": _layer(digest=...),
    "layer digest bad": _layer(digest="sha256:../.."),
    "layer digest upper": _layer(digest=f"sha256:{HEX.upper()}"),
    "layer digest md5": _layer(digest="md5:" + "0" * 32),
    "layer size missing": _layer(size=...),
    "layer size negative": _layer(size=-1),
    "layer size string": _layer(size="5"),
    "layer size float": _layer(size=5.0),
    "layer size bool": _layer(size=True),
    "layer mediaType missing": _layer(mediaType=...),
    "layer mediaType bad": _layer(mediaType="not a media type"),
    "layer annotations bad": _layer(annotations={"a": 1}),
    "layer urls bad": _layer(urls="http://x"),
    "annotations not strings": _with(annotations={"a": ["b"]}),
    "annotations list": _with(annotations=["a"]),
    "artifactType bad": _with(artifactType="nope"),
    "empty config without artifactType": _with(artifactType=...),
    "manifest with manifests": _with(manifests=[]),
    "subject bad": _with(subject={"digest": GOOD}),
    # Docker schema 1 (signed, with fsLayers): not a shape the store accepts
    "unknown mediaType": _with(mediaType="application/vnd.docker.distribution.manifest.v1+prettyjws"),
    "mediaType not a string": _with(mediaType=5),
    "index with layers": canonical_json({**Index(()).to_dict(), "layers": []}),
    "index entry is a layer": canonical_json(
        Index((clawstore.Descriptor(Digest(GOOD), 1, mt.VOLUME_LAYER),)).to_dict()
    ),
    "index manifests not list": canonical_json({**Index(()).to_dict(), "manifests": {}}),
    "oversized": _with(annotations={"pad": "x" * MAX_MANIFEST_SIZE}),
    "oversized whitespace": VALID + b" " * MAX_MANIFEST_SIZE,
    "str not bytes": VALID.decode(),
    "dict not bytes": _valid(),
    "None": None,
    "int": 5,
}


@pytest.mark.parametrize("name", list(BAD_MANIFESTS))
def test_bad_manifest(populated: ArtifactStore, name: str) -> None:
    data = BAD_MANIFESTS[name]
    with pytest.raises(InvalidManifestError):
        populated.put_manifest(data)
    if isinstance(data, bytes):
        with pytest.raises(InvalidManifestError):
            parse_manifest(data)


def test_valid_base_manifest_is_valid() -> None:
    """The bad manifests above are each one change away from this valid one."""
    assert isinstance(parse_manifest(VALID), ImageManifest)
    assert isinstance(parse_manifest(canonical_json(Index(()).to_dict())), Index)


@pytest.mark.parametrize(
    ("given", "declared"),
    [
        (mt.OCI_INDEX, mt.OCI_MANIFEST),
        (mt.VOLUME, mt.OCI_MANIFEST),
        ("application/json", None),
        ("application/vnd.docker.distribution.manifest.v2+json", None),
        ("nonsense", None),
    ],
)
def test_wrong_media_type(populated: ArtifactStore, given: str, declared: str | None) -> None:
    s = populated
    obj = json.loads(s.get_manifest(s.resolve("repo", "latest")))
    if declared is None:
        del obj["mediaType"]
    with pytest.raises(InvalidManifestError):
        s.put_manifest(canonical_json(obj), given)


def test_dangling_manifests(populated: ArtifactStore) -> None:
    s = populated
    with pytest.raises(InvalidManifestError, match="missing"):
        s.put_manifest(
            VALID.replace(b'"size":5', b'"size":6').replace(  # never stored
                hashlib.sha256(b"layer").hexdigest().encode(), hashlib.sha256(b"layer!").hexdigest().encode()
            )
        )
    ghost = clawstore.Descriptor(Digest(GOOD), 1, mt.OCI_MANIFEST)
    with pytest.raises(InvalidManifestError, match="missing"):
        s.put_manifest(Index((ghost,)).to_json())
    stored = s.resolve("repo", "latest")
    wrong_size = clawstore.Descriptor(stored, s.stat_manifest(stored) + 1, mt.OCI_MANIFEST)
    with pytest.raises(InvalidManifestError):
        s.put_manifest(Index((wrong_size,)).to_json())
