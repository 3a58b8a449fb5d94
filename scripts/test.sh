#!/usr/bin/env bash
# Run the whole test suite: Rust unit tests (cargo test), lint (ruff), and pytest (which starts
# its own moto S3 server on a loopback port and uses PostgreSQL on 127.0.0.1:5432 when it
# answers). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k fsck -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export PYO3_PYTHON="${PYO3_PYTHON:-$(.venv/bin/python -c 'import sys; print(sys.executable)')}"

echo "== cargo test" >&2
cargo test --quiet
echo "== ruff" >&2
.venv/bin/python -m ruff check python tests benches
.venv/bin/python -m ruff format --check python tests benches
echo "== pytest" >&2
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure, not a pass" >&2
fi
exit "$rc"
