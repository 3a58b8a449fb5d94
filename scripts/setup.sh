#!/usr/bin/env bash
# Set up a development/run environment from a fresh clone: system tools, a virtualenv in .venv,
# and clawstore built in release mode (maturin) with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in zstd tar openssl; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
command -v skopeo >/dev/null 2>&1 || need_apt+=(skopeo)
# The registry client tests (tests/registry_clients) push and pull with real clients: podman and
# buildah run as root on `--storage-driver vfs` (no overlay mounts, no runtime: the images are
# built with copy + commit only), and Debian's docker-registry (CNCF distribution 2.8) is the
# reference server the tests and benches/bench_registry.py compare against; wrk is the load client.
# docker.io gives dockerd and its CLI: tests/registry_clients/test_docker.py runs a private dockerd
# (vfs, no bridge, no iptables) that pushes and pulls but never starts a container.
for pair in podman:podman buildah:buildah docker-registry:docker-registry wrk:wrk dockerd:docker.io; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
# maturin and `cargo test` need a Rust toolchain; Debian's is the fallback when none is installed.
command -v cargo >/dev/null 2>&1 || need_apt+=(cargo rustc)
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing ${need_apt[*]} from Debian" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1 \
    || echo "setup: warning: could not install ${need_apt[*]} (tests needing them will skip)" >&2
fi

# Ceph RGW for the S3 suites on a real server: scripts/test.sh starts a throwaway single-node
# cluster with scripts/s3/ceph-rgw-up (Debian 12: Ceph 16.2 "Pacific").
need_ceph=()
for pair in radosgw:radosgw ceph-mon:ceph-mon ceph-osd:ceph-osd ceph:ceph-common uuidgen:uuid-runtime \
  curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_ceph+=("${pair#*:}")
done
if [ ${#need_ceph[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing ${need_ceph[*]} from Debian" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_ceph[@]}" \
    >/dev/null 2>&1 || {
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_ceph[@]}" \
      >/dev/null 2>&1
  } || echo "setup: warning: could not install ${need_ceph[*]} (scripts/test.sh needs them for RGW)" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q maturin
# Release build of the Rust core, installed editable so python/ edits take effect at once.
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup: ready: $(.venv/bin/python -c 'import clawstore; print("clawstore", clawstore.__version__)')" >&2
