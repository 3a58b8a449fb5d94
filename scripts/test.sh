#!/usr/bin/env bash
# Run the whole test suite: Rust unit tests (cargo test), lint, and pytest (which starts its own
# moto S3 server on a loopback port and uses PostgreSQL on 127.0.0.1:5432 when it answers).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export PYO3_PYTHON="${PYO3_PYTHON:-$(.venv/bin/python -c 'import sys; print(sys.executable)')}"

echo "== cargo test" >&2
cargo test --quiet
echo "== pytest" >&2
.venv/bin/python -m pytest "$@"
