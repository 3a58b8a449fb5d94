"""A restore's temporary directory, held by descriptor from creation to the final rename.

A restore writes a tree into a fresh directory beside its target and renames it into place at
the end. The target's parent may be writable by someone else (a shared work area): whoever can
rename entries there can swap a symlink in at the temporary directory's name at any moment, so
nothing may reach that directory by path after it is made. `RestoreDir`:

- opens the parent once (`O_DIRECTORY`; the caller's own path may contain symlinks, as in any
  `cd`), and does everything else relative to that handle: `mkdir` of a random name (0700),
  `open(O_DIRECTORY|O_NOFOLLOW)` of it, a check that the opened inode is a private directory of
  ours (not a look-alike swapped in between), an exclusive `flock` (a restore that dies drops it,
  even on SIGKILL, and the next restore into the same target removes what it left);
- gives writers its descriptor (`fd`): `clawstore._core.Unpacker(fd)` and `openat`-style calls
  write relative to it and so into the inode we made, whatever its name points to meanwhile;
- `commit()` renames it over the target (relative to the parent's handle) and then checks that
  the target now *is* our inode. If someone replaced the name in between, what landed at the
  target is theirs: a symlink is unlinked (never followed), the previous tree is put back, and
  `UnsafeRestoreError` says so. Nothing is reported as restored that was not.

Limits: the parent directory itself is trusted as opened (its path is resolved once, at the
start); someone who can write to it can always replace the target after the restore ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
from pathlib import Path

from clawstore.errors import ClawstoreError


class UnsafeRestoreError(ClawstoreError):
    """The restore's temporary directory or target was replaced by someone else while it ran."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _non_empty_at(parent_fd: int, name: str) -> bool:
    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        return bool(os.listdir(fd))
    finally:
        os.close(fd)


def check_target(directory: str | os.PathLike[str], *, force: bool) -> Path:
    """The absolute path of a restore's target, refused before any work if it is not a directory
    (a symlink included) or, unless `force`, not empty; its parent is created. (`commit` checks
    again at the end, through the parent's handle.)"""
    target = Path(directory).absolute()
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise NotADirectoryError(f"restore target is not a directory: {target}")
    if not force and target.exists():
        with os.scandir(target) as it:
            if any(True for _ in it):
                raise ClawstoreError(f"restore target {target} is not empty (use force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def remove_abandoned(parent_fd: int, name: str) -> int:
    """Remove the `.NAME.restore-*` directories under `parent_fd` whose restore died (nobody holds
    their lock). The `.NAME.old-*` of an interrupted swap are left alone: they hold the previous
    tree. Returns how many were removed."""
    prefix = f".{name}.restore-"
    removed = 0
    for entry in os.listdir(parent_fd):
        if not entry.startswith(prefix):
            continue
        try:
            fd = os.open(entry, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a restore in progress
            # rmtree with dir_fd works through descriptors and never follows a symlink
            shutil.rmtree(entry, ignore_errors=True, dir_fd=parent_fd)
            removed += 1
        finally:
            os.close(fd)
    return removed


class RestoreDir:
    """A locked, private temporary directory beside `target` (see the module docstring)."""

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target).absolute()
        self.name = self.target.name
        self.parent_fd = os.open(self.target.parent, _DIR_FLAGS)
        self.fd = -1
        self.tmpname = ""
        try:
            remove_abandoned(self.parent_fd, self.name)
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        for _ in range(100):
            fresh = f".{self.name}.restoring-{os.urandom(6).hex()}"
            try:
                os.mkdir(fresh, 0o700, dir_fd=self.parent_fd)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - 100 collisions of 48 random bits
            raise ClawstoreError(f"cannot create a temporary directory beside {self.target}")
        try:
            fd = os.open(fresh, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=self.parent_fd)
        except OSError as e:
            raise UnsafeRestoreError(
                f"{self.target.parent}: the restore's temporary directory {fresh} was replaced "
                f"as it was made ({e.strerror}); someone else can write to that directory"
            ) from None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077 or st.st_nlink != 2:
            os.close(fd)
            raise UnsafeRestoreError(
                f"{self.target.parent}: the restore's temporary directory {fresh} was replaced "
                "as it was made; someone else can write to that directory"
            )
        self.fd = fd
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Its final name only once locked, so a concurrent clean-up never sees it unlocked.
        tmpname = fresh.replace(".restoring-", ".restore-", 1)
        os.rename(fresh, tmpname, src_dir_fd=self.parent_fd, dst_dir_fd=self.parent_fd)
        self.tmpname = tmpname
        self._expect_ours(tmpname, "its temporary directory")

    def _expect_ours(self, name: str, what: str) -> None:
        try:
            now = os.stat(name, dir_fd=self.parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or not _same(now, os.fstat(self.fd)):
            raise UnsafeRestoreError(
                f"{self.target}: {what} was replaced during the restore (someone else can write "
                f"to {self.target.parent}); nothing restored"
            )

    @property
    def path(self) -> Path:
        """Where the directory is meant to be (for messages; never reach it by this path)."""
        return self.target.parent / self.tmpname

    def commit(self, *, replace: bool = False) -> None:
        """Rename the directory over the target (an empty or missing one; a non-empty one only
        with `replace`, which moves it aside first and removes it after), then check that the
        target is our directory."""
        pfd = self.parent_fd
        try:
            t = os.stat(self.name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            t = None
        if t is not None and not stat.S_ISDIR(t.st_mode):
            raise NotADirectoryError(f"restore target is not a directory: {self.target}")
        old_fd = -1
        old_name = ""
        if t is not None and _non_empty_at(pfd, self.name):
            if not replace:
                raise ClawstoreError(f"restore target {self.target} is not empty (use force to replace it)")
            old_name = f".{self.name}.old-{os.urandom(6).hex()}"
            os.mkdir(old_name, 0o700, dir_fd=pfd)
            old_fd = os.open(old_name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
            os.rename(self.name, "tree", src_dir_fd=pfd, dst_dir_fd=old_fd)
        try:
            try:
                os.rename(self.tmpname, self.name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                if old_fd >= 0:
                    os.rename("tree", self.name, src_dir_fd=old_fd, dst_dir_fd=pfd)
                raise
            now = os.stat(self.name, dir_fd=pfd, follow_symlinks=False)
            if not _same(now, os.fstat(self.fd)):
                # Not ours: someone renamed something over our temporary name before the swap.
                if stat.S_ISLNK(now.st_mode):
                    with contextlib.suppress(OSError):
                        os.unlink(self.name, dir_fd=pfd)  # the link itself, never its target
                if old_fd >= 0:
                    with contextlib.suppress(OSError):
                        os.rename("tree", self.name, src_dir_fd=old_fd, dst_dir_fd=pfd)
                raise UnsafeRestoreError(
                    f"{self.target}: the restore's temporary directory was replaced before it was "
                    f"renamed into place (someone else can write to {self.target.parent}); "
                    "nothing restored"
                )
            self.tmpname = ""
            if old_fd >= 0:
                shutil.rmtree("tree", ignore_errors=True, dir_fd=old_fd)
        finally:
            if old_fd >= 0:
                os.close(old_fd)
                with contextlib.suppress(OSError):
                    os.rmdir(old_name, dir_fd=pfd)

    def abort(self) -> None:
        """Remove the directory (only if its name still names it) and release it."""
        if self.tmpname and self.fd >= 0:
            try:
                self._expect_ours(self.tmpname, "its temporary directory")
            except UnsafeRestoreError:
                pass  # not ours any more: leave whatever is there alone
            else:
                shutil.rmtree(self.tmpname, ignore_errors=True, dir_fd=self.parent_fd)
        self.tmpname = ""
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.parent_fd >= 0:
            os.close(self.parent_fd)
            self.parent_fd = -1

    def __enter__(self) -> RestoreDir:
        return self

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        if et is not None:
            self.abort()
        else:
            self.close()


__all__ = ["RestoreDir", "UnsafeRestoreError", "remove_abandoned"]
