"""Agent session checkpoints: a directory as an OCI artifact of framed packs, one file readable at
a time, a few requests plus the changed bytes per checkpoint.

    r = checkpoints.create(store, "checkpoints/alice:latest", "/srv/sessions/alice")
    checkpoints.restore(store, "checkpoints/alice:latest", "/tmp/alice")
    data = checkpoints.cat(store, "checkpoints/alice:latest", "notes/todo.md")

Format (an OCI image manifest, artifactType `application/vnd.elasticclaw.checkpoint.v1+json`):

- `layers`: the **packs** the checkpoint's files live in (`...checkpoint.pack.v1.tar+zstd`), then
  the **large files** (`...checkpoint.file.v1`, one blob per distinct content, raw bytes, shared
  by every checkpoint in the store that has that content). Every blob a checkpoint needs is a
  layer, so GC keeps it and `export` / a registry carries it like any image.
- `config` (`...checkpoint.config.v1+json+zstd`): zstd-compressed JSON with the session metadata,
  the parent checkpoint, the pack table and the **index**: one record per path,
  `{"p": path, "t": "file"|"dir"|"symlink", "m": mode, "mt": mtime_ns, ...}`; files add `"s"`
  size, `"h"` content digest (sha256), `"ct"`/`"i"` ctime and inode (change detection), and a
  location: `"k"` pack number, `"f"`/`"n"` offset and length of its zstd frame in that pack,
  `"o"` offset of its body in the decompressed frame; a large file has no `"k"`: its blob is
  `"h"`. Symlinks have `"l"`, the target. The index is in the config (not a layer of its own) so
  that a checkpoint costs one blob write fewer and a reader one GET fewer.
- The manifest's annotations repeat the summary (`created`, file count, bytes, parent, session)
  so that `ls` reads manifests only.

Packs (rust/checkpoint.rs): files below `threshold` (1 MiB) are packed as a tar stream cut at
member boundaries into groups of ~`group_bytes` (256 KiB), each compressed as its own zstd frame.
Concatenated frames are one valid zstd stream and the groups one valid tar, so a pack is an
ordinary tar+zstd layer; yet one file comes back with one ranged read of its frame (`cat`,
`restore --path`), verified by its content digest. A checkpoint writes new packs (split past
`pack_limit`, 64 MiB) only for files that changed; unchanged files keep pointing into their
parent's packs and cost nothing.

Change detection: a file is unchanged when its size, mtime, ctime and inode equal its parent
record and its mtime/ctime are older than the parent's creation by more than `RACY_NS` (a file
rewritten within the same clock tick as the previous checkpoint is re-read, as git does). ctime
and inode catch `cp -p`, `rsync -a` and `touch -d`, which keep size and mtime.

Compaction: when the file bytes still referenced in the parent's packs fall below
`compact_below` (half) of those packs' file bytes, the checkpoint repacks every small file from
the directory into fresh packs (as restic's prune does), so the old packs drop out of the
manifest and GC can reclaim them once older checkpoints go.

Restore: the index is validated first (canonical relative paths, no duplicates, every entry's
parent a directory of the index — so nothing below a symlink —, locations inside their packs;
UnsafeArchiveError otherwise). The frames needed are fetched with coalesced ranged reads,
`store.read_concurrency` at once; the Rust core slices each body out and checks its digest, and
the layer unpacker (rust/layer/unpack.rs, with its path and limit rules) writes everything into a
fresh temporary directory beside the target, renamed into place at the end: a failed or killed
restore leaves no target (and the next restore removes the leftovers). setuid, setgid and sticky
bits are dropped unless asked for.

Built only on `ArtifactStore` (a hub session is one): uploads pass their digest, so a session
leases them without a catalog transaction per blob.

Requests: `create` runs as one `store.operation()`, in which the store does not ask again about
what it has just written or read (the parent's packs, the index blob, the new config, the
manifest before its tag). On S3 a first checkpoint is GET tag, HEAD + PUT pack (small packs: one
conditional PUT), PUT index blob, config, manifest and tag; a later one GET tag, manifest, config
and index blob, PUT pack, config, manifest and tag (If-Match with the ETag of the GET). A process
remembers the checkpoints it created or loaded lately (`load`, by manifest digest), so the next
checkpoint of a session it made skips the config and index GETs and their decoding.
"""

from __future__ import annotations

from clawstore.checkpoints.format import (
    ARTIFACT_TYPE,
    DEFAULT_COMPACT_BELOW,
    DEFAULT_GROUP_BYTES,
    DEFAULT_PACK_LIMIT,
    DEFAULT_THRESHOLD,
    VOLUME_ANNOTATION,
    Checkpoint,
    CheckpointDiff,
    CheckpointInfo,
    CheckpointResult,
    RestoreResult,
)
from clawstore.checkpoints.index import files_of, forget_recent, load, read_checkpoint, resolve_ref
from clawstore.checkpoints.reader import cat, diff, history, ls, open_file
from clawstore.checkpoints.restorer import restore
from clawstore.checkpoints.writer import create

__all__ = [
    "ARTIFACT_TYPE",
    "DEFAULT_COMPACT_BELOW",
    "DEFAULT_GROUP_BYTES",
    "DEFAULT_PACK_LIMIT",
    "DEFAULT_THRESHOLD",
    "VOLUME_ANNOTATION",
    "Checkpoint",
    "CheckpointDiff",
    "CheckpointInfo",
    "CheckpointResult",
    "RestoreResult",
    "cat",
    "create",
    "diff",
    "files_of",
    "forget_recent",
    "history",
    "load",
    "ls",
    "open_file",
    "read_checkpoint",
    "resolve_ref",
    "restore",
]
