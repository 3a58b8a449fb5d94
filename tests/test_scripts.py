"""scripts/test.sh, the command CI runs: every check runs and any failure fails the run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the repo's .venv")
def test_test_sh_runs_every_step_and_fails_if_any_failed(tmp_path: Path) -> None:
    # A `cargo` that always fails: the Rust steps fail, yet ruff and pytest must still run.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cargo").write_text("#!/bin/sh\necho fake cargo fails >&2\nexit 1\n")
    (fake / "cargo").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PYO3_PYTHON": "python3"}
    one = "tests/test_scripts.py::test_test_sh_runs_every_step_and_fails_if_any_failed"
    r = subprocess.run(
        ["bash", "scripts/test.sh", "--collect-only", "-q", one],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    for step in ("== cargo test", "== cargo fmt", "== cargo clippy", "== ruff check", "== pytest"):
        assert step in r.stderr, (step, r.stderr)
    assert "test: FAILED: cargo test cargo fmt cargo clippy" in r.stderr
    assert "ruff" not in r.stderr.rpartition("FAILED:")[2]  # the tree is lint-clean
