"""Reading a checkpoint: resolve, fetch and validate its index (every path canonical and
unique, every parent a directory of the index, every location inside its pack), merge a delta
config with its base index blob, and remember the checkpoints a process loaded lately."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from typing import Any, Final

from clawstore import _core
from clawstore.checkpoints.format import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    PACK_TYPE,
    Checkpoint,
)
from clawstore.digest import Digest
from clawstore.errors import (
    ClawstoreError,
    InvalidManifestError,
    UnsafeArchiveError,
)
from clawstore.manifest import Descriptor, ImageManifest, parse_manifest
from clawstore.names import Reference
from clawstore.store import ArtifactStore


def resolve_ref(store: ArtifactStore, ref: str | Digest) -> Digest:
    """A digest, REPO@DIGEST or REPO:TAG -> the manifest digest."""
    text = str(ref)
    if text.startswith(("sha256:", "sha512:", "blake3:")):
        return Digest.parse(text)
    r = Reference.parse(text)
    return r.digest or store.resolve(r.repository, r.tag or "latest")


def _bad(digest: Digest, msg: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"checkpoint {digest}: {msg}")


#: sha256 content digests (the format's own), matched without building a Digest per record.
_SHA256: Final = re.compile(r"sha256:[0-9a-f]{64}")
#: Relative paths whose components are all ordinary names (no "", ".", ".." and no NUL).
_PLAIN_PATH: Final = re.compile(r"(?:(?!\.\.?(?:/|\Z))[^/\x00]+/)*(?!\.\.?\Z)[^/\x00]+")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_path(digest: Digest, p: object) -> str:
    if not isinstance(p, str) or not p:
        raise _bad(digest, f"index path {p!r} is not a non-empty string")
    # also "/x", "x/", "a//b"; the regex is the fast path, the split says exactly what is wrong
    if _PLAIN_PATH.fullmatch(p) is None and (
        "\x00" in p or any(part in ("", ".", "..") for part in p.split("/"))
    ):
        raise _bad(digest, f"unsafe path in index: {p!r}")
    return p


def _validate(
    digest: Digest, manifest: ImageManifest, config: dict[str, Any], raw_entries: list[Any]
) -> tuple[tuple[Descriptor, ...], tuple[dict[str, Any], ...]]:
    """Check every record of a checkpoint's index; UnsafeArchiveError on anything a restore could
    be tricked by. Returns the pack descriptors and the entries."""
    layer_sizes = {str(d.digest): d.size for d in manifest.layers}
    raw_packs = config.get("packs")
    if not isinstance(raw_packs, list):
        raise _bad(digest, "config has no pack table")
    packs: list[Descriptor] = []
    for p in raw_packs:
        if not isinstance(p, dict) or not isinstance(p.get("digest"), str) or not is_int(p.get("size")):
            raise _bad(digest, f"bad pack record {str(p)[:80]!r}")
        d = Digest.parse(p["digest"])
        if layer_sizes.get(str(d)) != p["size"]:
            raise _bad(digest, f"pack {d} is not a layer of the manifest (or its size differs)")
        packs.append(Descriptor(d, p["size"], PACK_TYPE))
    seen: dict[str, str] = {}
    for e in raw_entries:
        if not isinstance(e, dict):
            raise _bad(digest, f"index record is not an object: {str(e)[:80]!r}")
        path = check_path(digest, e.get("p"))
        kind = e.get("t")
        if path in seen:
            raise _bad(digest, f"duplicate path in index: {path!r}")
        if kind not in ("file", "dir", "symlink"):
            raise _bad(digest, f"{path!r}: unknown entry type {kind!r}")
        parent = path.rpartition("/")[0]
        if parent and seen.get(parent) != "dir":
            # Also refuses anything below a symlink or a file, and implied directories.
            raise _bad(digest, f"{path!r}: parent {parent!r} is not a directory listed before it")
        mode, mtime = e.get("m"), e.get("mt")
        # (type() is int, not is_int: the same test, inlined on the hot path of every record)
        if type(mode) is not int or not 0 <= mode <= 0o7777:
            raise _bad(digest, f"{path!r}: bad mode {mode!r}")
        if type(mtime) is not int or abs(mtime) >= 1 << 62:
            raise _bad(digest, f"{path!r}: bad mtime {mtime!r}")
        if kind == "symlink":
            target = e.get("l")
            if not isinstance(target, str) or not target or "\x00" in target:
                raise _bad(digest, f"{path!r}: bad symlink target {target!r}")
        elif kind == "file":
            size, h = e.get("s"), e.get("h")
            if type(size) is not int or size < 0:
                raise _bad(digest, f"{path!r}: bad size {size!r}")
            if not isinstance(h, str):
                raise _bad(digest, f"{path!r}: file without a content digest")
            if _SHA256.fullmatch(h) is None:  # the usual case, checked fast; else the full parser
                try:
                    Digest.parse(h)
                except ClawstoreError:
                    raise _bad(digest, f"{path!r}: bad content digest {h!r}") from None
            if "k" in e:
                k, f, n, o = e.get("k"), e.get("f"), e.get("n"), e.get("o")
                if type(k) is not int or type(f) is not int or type(n) is not int or type(o) is not int:
                    raise _bad(digest, f"{path!r}: bad pack location")
                if not 0 <= k < len(packs):
                    raise _bad(digest, f"{path!r}: pack {k} is not in the pack table")
                if f < 0 or n <= 0 or o < 0 or f + n > packs[k].size:
                    raise _bad(digest, f"{path!r}: location {f}+{n} lies outside pack {packs[k].digest}")
            elif layer_sizes.get(h) != size:
                raise _bad(digest, f"{path!r}: blob {h} is not a layer of the manifest")
        seen[path] = kind
    return tuple(packs), tuple(raw_entries)


#: Checkpoints this process created or loaded lately, by manifest digest: the next checkpoint of
#: a session (a hub checkpoints the same sessions again and again) then neither downloads nor
#: decodes and validates its parent's index. Sound because the key is the digest of the
#: verified manifest bytes, which name the config and index blobs by digest: the same key always
#: means the same index. The manifest itself is still read from the store every time (the
#: permission check, a hub session's lease, proof that it is still stored).
RECENT_MAX: Final = 8
#: ... and at most this many index records in all (about 1 KB of memory each).
RECENT_MAX_RECORDS: Final = 100_000
_recent: dict[str, Checkpoint] = {}
_recent_lock = threading.Lock()


def remember(ck: Checkpoint) -> None:
    if len(ck.entries) > RECENT_MAX_RECORDS:
        return
    with _recent_lock:
        _recent.pop(str(ck.digest), None)
        _recent[str(ck.digest)] = ck
        records = sum(len(c.entries) for c in _recent.values())
        while len(_recent) > RECENT_MAX or records > RECENT_MAX_RECORDS:
            records -= len(_recent.pop(next(iter(_recent))).entries)


def forget_recent() -> None:
    """Drop the in-process cache of recent checkpoints (tests; memory)."""
    with _recent_lock:
        _recent.clear()


def load(store: ArtifactStore, ref: str | Digest) -> Checkpoint:
    """Read and validate a checkpoint by REPO:TAG, REPO@DIGEST or digest."""
    digest = resolve_ref(store, ref)
    data = store.get_manifest(digest)  # verified against the digest
    with _recent_lock:
        known = _recent.get(str(digest))
    if known is not None:
        return known
    ck = _load(digest, ref, store, parse_manifest(data))
    remember(ck)
    return ck


def _load(digest: Digest, ref: str | Digest, store: ArtifactStore, m: Any) -> Checkpoint:
    if not isinstance(m, ImageManifest) or m.artifact_type != ARTIFACT_TYPE:
        raise InvalidManifestError(
            f"{ref} is not a checkpoint (artifactType {getattr(m, 'artifact_type', None)})"
        )
    if m.config.media_type != CONFIG_TYPE:
        raise InvalidManifestError(f"checkpoint {digest}: config type {m.config.media_type} (old format?)")
    try:
        raw = _core.zstd_decompress(store.read_blob(m.config.digest), MAX_CONFIG_BYTES)
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifestError(f"checkpoint {digest}: config does not decode: {e}") from None
    if not isinstance(config, dict) or config.get("version") != FORMAT_VERSION:
        raise InvalidManifestError(f"checkpoint {digest}: unsupported config (format version 2 expected)")
    base = _read_base(store, digest, m, config)
    packs, entries = _validate(digest, m, config, _merge(digest, config, base))
    return Checkpoint(digest, m, config, packs, entries, base)


def _read_base(
    store: ArtifactStore, digest: Digest, manifest: ImageManifest, config: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The records of the shared index blob a delta config builds on, their pack numbers turned
    into this config's (by pack digest); {} when the config holds the whole index."""
    idx = config.get("index")
    if idx is None:
        return {}
    if not isinstance(idx, dict) or not isinstance(idx.get("digest"), str) or not is_int(idx.get("size")):
        raise _bad(digest, f"bad index descriptor {str(idx)[:80]!r}")
    d = Digest.parse(idx["digest"])
    if {str(x.digest): x.size for x in manifest.layers}.get(str(d)) != idx["size"]:
        raise _bad(digest, f"index blob {d} is not a layer of the manifest")
    try:
        base = json.loads(_core.zstd_decompress(store.read_blob(d), MAX_CONFIG_BYTES))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifestError(f"checkpoint {digest}: index blob does not decode: {e}") from None
    if (
        not isinstance(base, dict)
        or not isinstance(base.get("packs"), list)
        or not isinstance(base.get("entries"), list)
    ):
        raise _bad(digest, "index blob has no pack list or records")
    packs = config.get("packs")
    pos = (
        {p.get("digest"): i for i, p in enumerate(packs) if isinstance(p, dict)}
        if isinstance(packs, list)
        else {}
    )
    # The index blob's pack numbers -> this config's (-1: a pack it no longer lists; fine if the
    # config replaces the record, validation refuses it otherwise). Usually the same numbers:
    # then the records are taken as they are, not copied.
    remap = [pos.get(d, -1) if isinstance(d, str) else -1 for d in base["packs"]]
    same = all(k == i for i, k in enumerate(remap))
    npacks = len(remap)
    out: dict[str, dict[str, Any]] = {}
    for e in base["entries"]:
        if type(e) is not dict or type(e.get("p")) is not str:
            raise _bad(digest, f"index record is not an object with a path: {str(e)[:80]!r}")
        if e["p"] in out:
            raise _bad(digest, f"duplicate path in index: {e['p']!r}")
        k = e.get("k")
        if k is not None:
            if type(k) is not int or not 0 <= k < npacks:
                raise _bad(digest, f"{e['p']!r}: pack {k!r} is not in the index blob's pack list")
            if not same:
                e = {**e, "k": remap[k]}
        out[e["p"]] = e
    return out


def _merge(digest: Digest, config: dict[str, Any], base: dict[str, dict[str, Any]]) -> list[Any]:
    """The full index: the config's records, over the base's minus `removed`, in path order."""
    delta = config.get("entries")
    removed = config.get("removed", [])
    if not isinstance(delta, list) or not isinstance(removed, list):
        raise _bad(digest, "config has no index records")
    if config.get("index") is None:
        return delta
    merged = dict(base)
    for p in removed:
        if not isinstance(p, str) or merged.pop(p, None) is None:
            raise _bad(digest, f"removed path {p!r} is not in the index blob")
    seen: set[str] = set()
    for e in delta:
        if not isinstance(e, dict) or not isinstance(e.get("p"), str):
            raise _bad(digest, f"index record is not an object with a path: {str(e)[:80]!r}")
        if e["p"] in seen:
            raise _bad(digest, f"duplicate path in index: {e['p']!r}")
        seen.add(e["p"])
        merged[e["p"]] = e
    return sorted(merged.values(), key=lambda e: e["p"])


def read_checkpoint(store: ArtifactStore, ref: str | Digest) -> tuple[Digest, ImageManifest, dict[str, Any]]:
    """(digest, manifest, config) of a checkpoint (config["entries"] is its index)."""
    ck = load(store, ref)
    return ck.digest, ck.manifest, ck.config


def files_of(config: dict[str, Any]) -> Iterable[dict[str, Any]]:
    return (e for e in config["entries"] if e.get("t") == "file")
