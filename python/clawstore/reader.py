"""A reader that verifies content against its digest as it streams."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

from clawstore.digest import Digest, Hasher
from clawstore.errors import DigestMismatchError

CHUNK = 1 << 20


class VerifyingReader(io.RawIOBase):
    """Streams `raw` and checks size and digest; raises DigestMismatchError *instead of* handing
    out the last bytes (when the size is known) or reporting end of data, so a caller can never
    mistake corrupt content for whole.

    When the size is known the reader hands out exactly `size` bytes, and the digest is checked
    on the read that reaches it: a caller that reads exactly `size` bytes and stops has still had
    the whole content verified. A stream that ends short of `size` is a mismatch too.

    Use as a context manager; `read()`, `readinto()`, `chunks()`, `shutil.copyfileobj` and
    `io.BufferedReader` all work. `verify()` drains the rest and checks, for callers that stop early.
    """

    def __init__(self, raw: BinaryIO, digest: Digest | str, size: int | None = None) -> None:
        super().__init__()
        self._raw = raw
        self.digest = Digest.parse(digest)
        self.size = size
        self._hasher = Hasher(self.digest.algorithm)
        self._seen = 0
        self._verified = False

    def readable(self) -> bool:
        return True

    def _room(self, want: int) -> int:
        """How much of `want` may be read now (never past a known size); 0 once verified.
        Reaching the size with nothing left checks the digest (size 0: even read(0) does)."""
        if self._verified:
            return 0
        if self.size is not None:
            if self._seen >= self.size:  # (past it only after a mismatch was raised: again)
                self._finish()
                return 0
            return min(want, self.size - self._seen)
        return want

    def _took(self, chunk: bytes | memoryview) -> None:
        """Account for bytes read from the source, before the caller may hand them out."""
        self._hasher.update(chunk)
        self._seen += len(chunk)
        if self.size is not None:
            if self._seen > self.size:
                raise DigestMismatchError(f"{self.digest}: more than the expected {self.size} bytes")
            if self._seen == self.size:
                self._finish()  # raises before these last bytes are handed out

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = self._room(len(view))
        if not n:
            return 0
        view = view[:n]
        got = self._raw.readinto(view) if hasattr(self._raw, "readinto") else self._fallback(view)
        if got is None:
            raise BlockingIOError("non-blocking source not supported")
        if got == 0:
            self._finish()
            return 0
        self._took(view[:got])
        return got

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes, read straight from the source: RawIOBase's default reads into a
        zero-filled buffer and copies it into a new bytes object, two passes over every byte
        a registry streams out."""
        if size is None or size < 0:
            return self.readall()
        n = self._room(size)
        if not n:
            return b""
        chunk = self._raw.read(n)
        if chunk is None:
            raise BlockingIOError("non-blocking source not supported")
        if not chunk:
            self._finish()
            return b""
        self._took(chunk)
        return bytes(chunk)

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

    def readall(self) -> bytes:
        """The rest of the content, read in large pieces (RawIOBase's default grows 8 KiB at a time)."""
        parts = []
        if self.size is not None and self.size > self._seen:
            first = bytearray(self.size - self._seen)
            n = self.readinto(first)  # a regular file fills it at once, and the digest is checked
            del first[n:]
            parts.append(first)
        buf = bytearray(CHUNK)
        while n := self.readinto(buf):
            parts.append(buf[:n])
        return b"".join(parts)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """Yield the content in pieces of at most `size` bytes; the last one only once verified."""
        if size <= 0:
            raise ValueError("chunk size must be positive")
        while chunk := self.read(size):
            yield chunk

    def verify(self) -> None:
        """Read whatever is left and raise DigestMismatchError unless the whole content matches."""
        buf = bytearray(CHUNK)
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
