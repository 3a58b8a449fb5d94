"""The shared vocabulary: one list of errors, types below both the store and the backends, and
one atomic file writer."""

from __future__ import annotations

import os
from pathlib import Path

import clawstore
import pytest
from clawstore import _core, errors, types
from clawstore.atomic import atomic_file, write_atomic


def test_errors_are_listed_once_and_complete() -> None:
    rust = {n for n, v in vars(_core).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert rust <= set(errors.__all__), "an error class of the Rust core is missing from errors.__all__"
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, clawstore.ClawstoreError)
        assert getattr(clawstore, name) is cls
        assert name in clawstore.__all__
    # Errors only the hub raises are Python's, under the same base the Rust errors have.
    for cls in (errors.PermissionDeniedError, errors.LeaseConflictError):
        assert cls.__name__ not in rust
        assert cls.__mro__[1] is _core.ClawstoreError


def test_vocabulary_lives_in_types() -> None:
    from clawstore.backends import base

    for name in types.__all__:
        assert getattr(clawstore, name) is getattr(types, name)
        assert name not in vars(base) or getattr(base, name) is getattr(types, name)


def test_atomic_file_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(dest) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]  # no temp file left behind
    with atomic_file(dest) as f:
        f.write(b"new")
        assert dest.read_bytes() == b"old"  # not visible before the block ends
    assert dest.read_bytes() == b"new"
    write_atomic(tmp_path / "a" / "b", b"x", make_parents=True, sync_dir=True)
    assert (tmp_path / "a" / "b").read_bytes() == b"x"
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "a", b"x")
