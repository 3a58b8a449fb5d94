#!/usr/bin/env bash
# Run the whole test suite: Rust unit tests (cargo test), lint (cargo fmt/clippy, ruff), and pytest
# (which starts its own moto S3 server on a loopback port and uses PostgreSQL on 127.0.0.1:5432
# when it answers). Every step runs even if an earlier one fails, so one lint error does not hide
# the test results; the exit status is non-zero if any step failed. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -k fsck -x`.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh || exit 1
export PYO3_PYTHON="${PYO3_PYTHON:-$(.venv/bin/python -c 'import sys; print(sys.executable)')}"

failed=()
step() {
  local name=$1
  shift
  echo "== $name" >&2
  "$@" || failed+=("$name")
}

step "cargo test" cargo test --quiet
step "cargo fmt" cargo fmt --check
step "cargo clippy" cargo clippy --quiet --all-targets -- -D warnings
step "ruff check" .venv/bin/python -m ruff check python tests benches
step "ruff format" .venv/bin/python -m ruff format --check python tests benches
echo "== pytest" >&2
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure, not a pass" >&2
fi
[ "$rc" -eq 0 ] || failed+=("pytest (exit $rc)")
if [ ${#failed[@]} -gt 0 ]; then
  echo "test: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test: all passed" >&2
