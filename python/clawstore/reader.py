"""A reader that verifies content against its digest as it streams."""

from __future__ import annotations

import io
from typing import BinaryIO

from clawstore.digest import Digest, Hasher
from clawstore.errors import DigestMismatchError


class VerifyingReader(io.RawIOBase):
    """Streams `raw` and checks size and digest; raises DigestMismatchError *instead of* reporting
    end of data when the bytes differ, so a caller can never mistake corrupt content for whole.

    Use as a context manager; `read()`, `readinto()`, iteration and `shutil.copyfileobj` all work.
    `verify()` drains the rest and checks, for callers that stop early.
    """

    def __init__(self, raw: BinaryIO, digest: Digest, size: int | None = None) -> None:
        super().__init__()
        self._raw = raw
        self.digest = Digest.parse(digest)
        self.size = size
        self._hasher = Hasher(self.digest.algorithm)
        self._seen = 0
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._verified:
            return 0
        view = memoryview(buffer).cast("B")
        n = self._raw.readinto(view) if hasattr(self._raw, "readinto") else self._fallback(view)
        if n is None:
            raise BlockingIOError("non-blocking source not supported")
        if n == 0:
            self._finish()
            return 0
        self._hasher.update(view[:n])
        self._seen += n
        if self.size is not None and self._seen > self.size:
            raise DigestMismatchError(f"{self.digest}: more than the expected {self.size} bytes")
        return n

    def _fallback(self, view: memoryview) -> int:
        chunk = self._raw.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def _finish(self) -> None:
        if self.size is not None and self._seen != self.size:
            raise DigestMismatchError(f"{self.digest}: got {self._seen} bytes, expected {self.size}")
        actual = self._hasher.digest()
        if actual != self.digest:
            raise DigestMismatchError(f"content of {self.digest} hashes to {actual}")
        self._verified = True

    def verify(self) -> None:
        """Read whatever is left and raise DigestMismatchError unless the whole content matches."""
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass

    @property
    def verified(self) -> bool:
        return self._verified

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                super().close()

    def __enter__(self) -> VerifyingReader:
        return self
