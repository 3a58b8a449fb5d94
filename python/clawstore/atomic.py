"""One way to write a file that appears whole or not at all.

    with atomic_file(dest) as f:      # a temp file beside dest, opened "xb"
        f.write(...)                  # raise anywhere: the temp file goes, dest is untouched
    # here: flushed, fsynced, renamed onto dest (and, with sync_dir, the directory fsynced)

The temp name is `.<name>.clawstore-<pid>-<random>.partial` in dest's directory (the same
filesystem, so the rename is atomic; the random part keeps a file left by a killed run with the
same pid from blocking a new one). Used by the store's downloads, the CLI's `-o FILE`, OCI
layout export, and anything else that writes a user-visible file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def temp_path_beside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.clawstore-{os.getpid()}-{os.urandom(4).hex()}.partial")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    dest: str | os.PathLike[str], *, make_parents: bool = False, sync_dir: bool = False
) -> Iterator[BinaryIO]:
    """Yield a binary file that takes the name `dest` only if the block completes (see module)."""
    target = Path(dest)
    if target.is_dir():
        raise IsADirectoryError(f"is a directory: {target}")
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(target)
    try:
        with open(tmp, "xb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # durable before it takes the name: no empty file after a crash
        os.replace(tmp, target)
        if sync_dir:
            fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(dest: str | os.PathLike[str], data: bytes, **kw: bool) -> None:
    """`atomic_file` for bytes already in memory."""
    with atomic_file(dest, **kw) as f:
        f.write(data)


__all__ = ["atomic_file", "fsync_dir", "temp_path_beside", "write_atomic"]
