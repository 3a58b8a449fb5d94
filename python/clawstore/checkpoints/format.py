"""Checkpoint format: media types, annotations, tunables, and the values the API returns
(the loaded `Checkpoint`, results of create, restore, listing and diff)."""

from __future__ import annotations

import functools
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from clawstore import mediatypes as mt
from clawstore.digest import Digest
from clawstore.manifest import Descriptor, ImageManifest

ARTIFACT_TYPE: Final = mt.CHECKPOINT
CONFIG_TYPE: Final = mt.CHECKPOINT_CONFIG_ZSTD
PACK_TYPE: Final = mt.CHECKPOINT_PACK
INDEX_TYPE: Final = mt.CHECKPOINT_INDEX_ZSTD
FILE_TYPE: Final = mt.CHECKPOINT_FILE
FORMAT_VERSION: Final = 2

VOLUME_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.volume"
CREATED_ANNOTATION: Final = "org.opencontainers.image.created"
FILES_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.files"
BYTES_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.bytes"
PARENT_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.parent"
SESSION_ANNOTATION: Final = "vnd.elasticclaw.checkpoint.session"

#: Files smaller than this go into packs; the rest are blobs of their own.
DEFAULT_THRESHOLD: Final = 1 << 20
#: A new pack is started past this many file bytes.
DEFAULT_PACK_LIMIT: Final = 64 << 20
#: Uncompressed bytes per zstd frame of a pack (the unit of a ranged read).
DEFAULT_GROUP_BYTES: Final = 256 << 10
#: Repack when the live bytes of the parent's packs fall below this fraction.
DEFAULT_COMPACT_BELOW: Final = 0.5
#: Largest decompressed checkpoint config we accept.
MAX_CONFIG_BYTES: Final = 1 << 30
SPECIAL_BITS: Final = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


@dataclass
class CheckpointResult:
    descriptor: Descriptor
    config: dict[str, Any]
    files: int = 0
    bytes: int = 0
    #: files read from disk (changed, new, racy or repacked) and their bytes
    hashed_files: int = 0
    hashed_bytes: int = 0
    #: blobs written (packs, large files, config) and bytes sent to the store
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    reused_files: int = 0
    packs: int = 0
    compacted: bool = False
    #: files that vanished or were swapped for something else between scan and read
    skipped: list[str] = field(default_factory=list)

    @property
    def digest(self) -> Digest:
        return self.descriptor.digest


@dataclass
class CheckpointInfo:
    tag: str | None
    digest: Digest
    created: str
    parent: str | None
    files: int
    bytes: int
    session: dict[str, Any]


@dataclass
class CheckpointDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.modified)


@dataclass
class RestoreResult:
    digest: Digest
    dest: Path
    files: int
    bytes: int
    entries: int
    #: ranged reads of packs and whole large-file blobs fetched
    reads: int
    seconds: float


@dataclass(frozen=True)
class Checkpoint:
    """A stored checkpoint: manifest, decoded config and its validated index."""

    digest: Digest
    manifest: ImageManifest
    config: dict[str, Any]
    packs: tuple[Descriptor, ...]
    entries: tuple[dict[str, Any], ...]
    #: the shared index blob's records (pack numbers of this config), when the config is a delta
    base: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def parent(self) -> str | None:
        p = self.config.get("parent")
        return p if isinstance(p, str) else None

    @property
    def created_ns(self) -> int:
        v = self.config.get("created_ns", 0)
        return v if isinstance(v, int) else 0

    def files(self) -> Iterator[dict[str, Any]]:
        return (e for e in self.entries if e["t"] == "file")

    @functools.cached_property
    def by_path(self) -> dict[str, dict[str, Any]]:
        """Every record by its path (built once per checkpoint)."""
        return {e["p"]: e for e in self.entries}
