"""Content digests: the `Digest` value type and hashing helpers over the Rust core."""

from __future__ import annotations

import os
from typing import Final

from clawstore import _core
from clawstore._core import Hasher
from clawstore.errors import InvalidDigestError

ALGORITHMS: Final = ("sha256", "sha512", "blake3")
DEFAULT_ALGORITHM: Final = "sha256"


class Digest(str):
    """A validated `algorithm:hex` digest; it *is* its canonical string.

    Being a `str`, a Digest compares equal to its string form, serialises into JSON as itself and
    can be passed wherever a digest string is accepted.
    """

    __slots__ = ()

    def __new__(cls, value: str | Digest) -> Digest:
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str):
            raise InvalidDigestError(f"digest must be a string, not {type(value).__name__}")
        if not value.isascii():  # also keeps lone surrogates away from the Rust str conversion
            raise InvalidDigestError(f"invalid digest {value!r}: not ASCII")
        _core.validate_digest_str(value)
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, value: str | Digest) -> Digest:
        """Validate and return a Digest; InvalidDigestError for anything but `alg:lowercase-hex`."""
        return cls(value)

    @classmethod
    def from_hex(cls, algorithm: str, hexdigest: str) -> Digest:
        return cls(f"{algorithm}:{hexdigest}")

    @property
    def algorithm(self) -> str:
        return self.partition(":")[0]

    @property
    def encoded(self) -> str:
        return self.partition(":")[2]

    def __repr__(self) -> str:
        return f"Digest({str(self)!r})"


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise InvalidDigestError(f"unsupported digest algorithm {algorithm!r} (expected one of {ALGORITHMS})")
    return algorithm


def digest_bytes(data: bytes | bytearray | memoryview, algorithm: str = DEFAULT_ALGORITHM) -> Digest:
    """Digest of an in-memory buffer (hashed without copying, GIL released when large)."""
    return Digest.from_hex(algorithm, _core.digest_bytes(data, check_algorithm(algorithm)))


def digest_file(path: str | os.PathLike[str], algorithm: str = DEFAULT_ALGORITHM) -> Digest:
    """Digest of a file's contents, streamed by the Rust core (blake3 uses every core)."""
    hexdigest, _size = _core.digest_file(os.fspath(path), check_algorithm(algorithm))
    return Digest.from_hex(algorithm, hexdigest)


__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "Digest", "Hasher", "digest_bytes", "digest_file"]
