"""Restore against a racer in a shared parent directory (issue 16, item 4).

The target's parent is writable by someone else, who renames a symlink over the restore's
temporary directory (`.NAME.restore-*`) again and again while the restore runs: a volume
restore and a checkpoint restore, which share `clawstore.restoredir`. Whatever the
racer manages, nothing may be written outside, and the target is either our restored tree or
the restore fails (UnsafeRestoreError); it is never a symlink reported as success.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import clawstore
import pytest
from clawstore import checkpoints, volumes
from clawstore.restoredir import RestoreDir, UnsafeRestoreError
from volume_trees import assert_same_tree

REF = "vol/race:latest"

# The racer: moves each `.tgt.restore-*` directory away and renames a symlink to OUTSIDE in at
# its name, for as long as STOP does not exist (and at most a bounded number of rounds).
RACER = r"""
import os, sys
parent, outside, stop = sys.argv[1:4]
swaps = 0
for rounds in range(2_000_000):
    if os.path.exists(stop):
        break
    for name in os.listdir(parent):
        if not name.startswith(".tgt.restore-"):
            continue
        p = os.path.join(parent, name)
        if os.path.islink(p):
            continue
        stash = os.path.join(parent, f"stash-{swaps}")
        link = os.path.join(parent, f"link-{swaps}")
        try:
            os.rename(p, stash)
            os.symlink(outside, link)
            os.rename(link, p)
            swaps += 1
        except OSError:
            pass
print(swaps)
"""


def _tree(root: Path, n: int) -> None:
    """Mostly flat (as in the reported reproduction), plus a few directories."""
    root.mkdir(parents=True)
    for i in range(n):
        d = root / f"z{i % 3}" if i % 10 == 0 else root  # (sorted after the flat files)
        d.mkdir(exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(b"x" * (i % 97))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["volume", "checkpoint"])
def test_symlink_swapped_over_temp_dir_writes_nothing_outside(
    local_store: clawstore.ArtifactStore, tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "src"
    _tree(src, 3000)
    if kind == "volume":
        volumes.snapshot(local_store, src, REF)
    else:
        checkpoints.create(local_store, REF, src)
    restore = volumes.restore if kind == "volume" else checkpoints.restore
    shared = tmp_path / "shared"
    shared.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    total_swaps = 0
    outcomes = []
    for attempt in range(6):
        stop = tmp_path / f"stop-{attempt}"
        racer = subprocess.Popen(
            [sys.executable, "-c", RACER, str(shared), str(outside), str(stop)],
            stdout=subprocess.PIPE,
            text=True,
        )
        target = shared / "tgt"
        try:
            restore(local_store, REF, target, force=True)
            outcomes.append("restored")
        except UnsafeRestoreError:
            outcomes.append("refused")
        except Exception as e:  # checked below, after what matters most: nothing outside
            outcomes.append(f"error: {e!r}")
        finally:
            stop.touch()
            out, _ = racer.communicate(timeout=120)
        total_swaps += int(out.strip() or 0)
        assert list(outside.iterdir()) == [], f"attempt {attempt}: files written outside"
        assert not target.is_symlink(), f"attempt {attempt}: target is a symlink"
        if outcomes[-1] == "restored":
            assert_same_tree(src, target)
        for p in shared.iterdir():  # the racer's leftovers, for the next attempt
            if p.name != "tgt":
                if p.is_symlink():
                    p.unlink()
                else:
                    shutil.rmtree(p)
    assert all(o in ("restored", "refused") for o in outcomes), outcomes
    # The test means something only if the racer did get in.
    assert total_swaps > 0, outcomes


def test_commit_refuses_a_swapped_temp_dir(tmp_path: Path) -> None:
    """Deterministic: the temp directory replaced by a symlink before commit."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "tgt"
    with pytest.raises(UnsafeRestoreError), RestoreDir(target) as rd:
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=rd.fd)
        os.close(fd)
        os.rename(rd.path, tmp_path / "stash")
        os.symlink(outside, rd.path)
        rd.commit()
    assert not target.exists() and not target.is_symlink()
    assert list(outside.iterdir()) == []
    assert (tmp_path / "stash" / "f").exists()  # the write went where we made it


def test_commit_keeps_previous_tree_when_swapped(tmp_path: Path) -> None:
    target = tmp_path / "tgt"
    target.mkdir()
    (target / "old").write_text("previous")
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(UnsafeRestoreError), RestoreDir(target) as rd:
        os.rename(rd.path, tmp_path / "stash")
        os.symlink(outside, rd.path)
        rd.commit(replace=True)
    assert (target / "old").read_text() == "previous"
    assert not target.is_symlink()


def test_abandoned_temp_dirs_removed_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("k")
    os.symlink(victim, tmp_path / ".tgt.restore-evil")
    dead = tmp_path / ".tgt.restore-dead"
    dead.mkdir()
    (dead / "x").write_text("x")
    with RestoreDir(tmp_path / "tgt") as rd:
        rd.commit()
    assert (victim / "keep").exists()
    assert not dead.exists()
    assert (tmp_path / "tgt").is_dir()
