"""Helpers for volume tests: build trees with every file kind and describe trees independently
of clawstore (os.lstat + reading bytes), so that a restored tree can be compared exactly."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

NS = 1_000_000_000


def set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def make_every_kind(root: Path, *, big: int = 3 * 1024 * 1024 + 17) -> None:
    """Regular files (empty, small, large, unicode and space names), empty and nested dirs,
    absolute/relative/dangling symlinks and a symlink to a dir, hardlinks, odd modes, ns mtimes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty dir").mkdir()
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "nested" / "deeper" / "deepest" / "leaf.txt").write_text("leaf\n")
    (root / "empty-file").write_bytes(b"")
    (root / "héllo wörld ✓.txt").write_text("unicode and spaces\n" * 50)
    (root / "big.bin").write_bytes(os.urandom(big))
    (root / "text.py").write_text("def f():\n    return 1\n" * 2000)
    (root / ("long-" + "n" * 120)).mkdir()
    (root / ("long-" + "n" * 120) / ("name-" + "x" * 150 + ".txt")).write_text("long path")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("text.py", root / "rel-link")
    os.symlink("../nowhere/at/all", root / "nested" / "dangling")
    os.symlink("nested/deeper", root / "dir-link")
    os.symlink("x" * 200, root / "long-target-link")
    os.link(root / "big.bin", root / "nested" / "big-hardlink")
    os.link(root / "text.py", root / "text-hardlink.py")
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o755)
    (root / "private").write_text("secret")
    os.chmod(root / "private", 0o600)
    (root / "setuid").write_text("s")
    os.chmod(root / "setuid", 0o4755)
    os.chmod(root / "nested" / "deeper", 0o750)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "readonly-dir").mkdir()
    (root / "readonly-dir" / "inside").write_text("ro")
    os.chmod(root / "readonly-dir", 0o555)
    # nanosecond mtimes, including before the epoch, on files, links and directories
    set_mtime(root / "text.py", 1_700_000_000 * NS + 123_456_789)
    set_mtime(root / "empty-file", -5 * NS - 1)
    set_mtime(root / "rel-link", 1_600_000_000 * NS + 987_654_321)
    for d in ("nested/deeper/deepest", "nested/deeper", "nested", "empty dir", "."):
        set_mtime(root / d, 1_650_000_000 * NS + 111_111_111)


def describe(root: Path, *, content: bool = True) -> dict[str, tuple[Any, ...]]:
    """path -> (type, mode, mtime_ns, size, sha256 or link target, hardlink group) for the whole
    tree including the root itself. Hardlink groups are named by the first path of each inode."""
    out: dict[str, tuple[Any, ...]] = {}
    first_by_inode: dict[tuple[int, int], str] = {}
    entries: list[tuple[str, os.stat_result]] = [(".", os.lstat(root))]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            entries.append((os.path.relpath(full, root), os.lstat(full)))
    for rel, st in sorted(entries):
        kind = stat.S_IFMT(st.st_mode)
        extra: Any = None
        group = None
        if stat.S_ISREG(kind):
            if content:
                extra = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            if st.st_nlink > 1:
                group = first_by_inode.setdefault((st.st_dev, st.st_ino), rel)
        elif stat.S_ISLNK(kind):
            extra = os.readlink(root / rel)
        size = st.st_size if stat.S_ISREG(kind) else 0
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_mtime_ns, size, extra, group)
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    da, db = describe(a), describe(b)
    assert sorted(da) == sorted(db), (
        f"paths differ: only in a {set(da) - set(db)}, only in b {set(db) - set(da)}"
    )
    for p in da:
        assert da[p] == db[p], f"{p}: {da[p]} != {db[p]}"


def make_writable(root: Path) -> None:
    """So that pytest can remove trees with read-only directories."""
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
