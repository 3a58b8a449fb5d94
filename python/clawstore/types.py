"""The vocabulary shared by the store, the backends and everything above them.

    ANY, MISSING      tag compare-and-swap expectations (`store.tag(..., expect=MISSING)`)
    Expectation       what a backend's swap_tag receives: ANY, MISSING or the current digest
    BlobSource        what put_blob / write_blob accept
    CleanupReport     what a backend's cleanup removed

It sits below `clawstore.store` and `clawstore.backends` (both import it) and imports only
`clawstore.digest`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, TypeAlias

from clawstore.digest import Digest


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"clawstore.{self.name}"

    def __reduce__(self) -> str:
        return self.name


#: `expect=ANY`: set or remove the tag whatever it points at now.
ANY = _Sentinel("ANY")
#: `expect=MISSING`: only create the tag; TagConflictError if it exists.
MISSING = _Sentinel("MISSING")

Expectation: TypeAlias = _Sentinel | Digest

#: What put_blob accepts: bytes-like, a filesystem path, or a readable binary file object.
BlobSource: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What a backend's cleanup removed: temp files, staging objects, stale multipart uploads."""

    removed: int = 0
    bytes: int = 0


__all__ = ["ANY", "MISSING", "BlobSource", "CleanupReport", "Expectation"]
