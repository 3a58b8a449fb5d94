"""The README's main command (`bash scripts/demo.sh`) keeps working as areas extend it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import clawstore
import pytest
from clawstore.fsck import fsck

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "clawstore").exists(), reason="needs scripts/setup.sh's .venv"
)
def test_demo_script_runs_end_to_end(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), str(store_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fsck ok:" in r.stdout and "demo done" in r.stdout
    store = clawstore.open(store_dir)
    # demo/hello was untagged and swept by gc; the volume and the checkpoint stay tagged
    assert store.list_repos() == ["demo/agent", "demo/workspace"]
    hello = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("manifest sha256:"))
    assert not store.has_manifest(hello)
    assert store.has_manifest(store.resolve("demo/workspace", "latest"))
    # the demo left a consistent store behind
    assert fsck(store).ok
