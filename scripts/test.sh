#!/usr/bin/env bash
# Run the whole test suite: Rust unit tests (cargo test), lint (cargo fmt/clippy, ruff), pytest
# (which starts its own moto S3 server on a loopback port and uses PostgreSQL on 127.0.0.1:5432
# when it answers), then the S3 suites again against a Ceph RGW started and stopped here. Every step runs even if an earlier one fails, so one lint error does not hide
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
pytest_step() {
  local name=$1
  shift
  echo "== $name" >&2
  local rc=0
  .venv/bin/python -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "test: $name collected no tests: that is a failure, not a pass" >&2
  fi
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}
pytest_step "pytest" "$@"

# The S3 suites again against Ceph RGW (a throwaway single-node cluster in a temp dir, started
# and stopped here; scripts/s3/ceph-rgw-up), with the fault-injection proxy in front of it too.
# Runs by default on a plain `test.sh`; with pytest arguments only if CLAWSTORE_TEST_RGW=1;
# never with CLAWSTORE_TEST_RGW=0.
S3_SUITES=(tests/test_s3.py tests/test_s3_faults.py tests/test_conformance.py tests/test_volumes.py
  tests/test_concurrency.py tests/test_checkpoints.py tests/hub/test_hub_checkpoints.py)
if [ "${CLAWSTORE_TEST_RGW:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
  rgw_dir=$(mktemp -d "${TMPDIR:-/tmp}/clawstore-rgw.XXXXXX")
  # shellcheck disable=SC2064
  trap "bash scripts/s3/ceph-rgw-down '$rgw_dir' >/dev/null 2>&1 || true; rm -rf '$rgw_dir'" EXIT
  if up=$(bash scripts/s3/ceph-rgw-up "$rgw_dir" 2>"$rgw_dir/up.log"); then
    endpoint=${up#endpoint=}
    endpoint=${endpoint%% *}
    echo "test: Ceph RGW at $endpoint" >&2
    CLAWSTORE_TEST_S3_ENDPOINT=$endpoint AWS_ACCESS_KEY_ID=clawtest AWS_SECRET_ACCESS_KEY=clawtestsecret \
      AWS_DEFAULT_REGION=us-east-1 CLAWSTORE_TEST_S3_RESTART="bash scripts/s3/ceph-rgw-restart $rgw_dir" \
      pytest_step "pytest on Ceph RGW" -k s3 "${S3_SUITES[@]}" "$@"
  else
    cat "$rgw_dir/up.log" >&2
    failed+=("Ceph RGW did not start")
  fi
  bash scripts/s3/ceph-rgw-down "$rgw_dir" >&2 || failed+=("Ceph RGW did not stop")
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "test: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test: all passed" >&2
