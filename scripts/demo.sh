#!/usr/bin/env bash
# The main job, end to end, on a local store: set up if needed, then put a blob, put a manifest
# that references it, tag it, resolve the tag, fetch and compare the blob; snapshot, change and
# restore a workspace volume; checkpoint a session; gc; and fsck the store.
#
#   bash scripts/demo.sh [STORE]     STORE: a path or file:// URL; default $CLAWSTORE_URL, else
#                                    the local store under the user's data directory
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/clawstore ] || bash scripts/setup.sh
if [ $# -ge 1 ]; then
  case "$1" in
    *://*) export CLAWSTORE_URL="$1" ;;
    *) mkdir -p "$1"; export CLAWSTORE_URL="file://$(cd "$1" && pwd)" ;;
  esac
fi
cs() { .venv/bin/clawstore "$@"; }
step() { printf '\n== %s\n' "$*"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "store: $(.venv/bin/python -c 'import clawstore; print(clawstore.open().url)')"

step "blob put: a file and standard input"
printf 'hello from clawstore\n' >"$work/hello.txt"
layer=$(cs blob put "$work/hello.txt" --repo demo/hello)
echo "layer  $layer"
config=$(printf '{}' | cs blob put - --repo demo/hello)
echo "config $config"

step "manifest put: an OCI v1.1 artifact manifest referencing the blob"
size=$(wc -c <"$work/hello.txt" | tr -d ' ')
cat >"$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.example.demo.v1","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"$config","size":2},"layers":[{"mediaType":"text/plain","digest":"$layer","size":$size,"annotations":{"org.opencontainers.image.title":"hello.txt"}}]}
JSON
manifest=$(cs manifest put "$work/manifest.json" --repo demo/hello)
echo "manifest $manifest"

step "tag demo/hello:latest, resolve it, list tags and repositories"
cs tag demo/hello:latest "$manifest"
resolved=$(cs resolve demo/hello:latest)
echo "demo/hello:latest -> $resolved"
[ "$resolved" = "$manifest" ] || { echo "demo: resolve returned $resolved" >&2; exit 1; }
cs tags demo/hello
cs repos

step "blob get: stream back, verified against the digest"
cs blob get "$layer" -o "$work/back.txt"
cmp "$work/hello.txt" "$work/back.txt" && echo "round trip ok ($(cs blob stat "$layer") bytes)"

step "compare-and-swap: --create on an existing tag is refused"
if cs tag demo/hello:latest "$manifest" --create 2>"$work/err"; then
  echo "demo: --create should have failed" >&2; exit 1
fi
echo "refused as expected: $(cat "$work/err")"

step "volume snapshot: a small workspace (file, empty dir, symlink, hardlink), then an incremental"
mkdir -p "$work/ws/src" "$work/ws/empty"
printf 'print("hi")\n' >"$work/ws/src/main.py"
head -c 200000 /dev/urandom >"$work/ws/data.bin"
ln -s src/main.py "$work/ws/link"
ln "$work/ws/data.bin" "$work/ws/data-hardlink.bin"
cs volume snapshot "$work/ws" demo/workspace:latest
printf 'print("changed")\n' >"$work/ws/src/main.py"
rm "$work/ws/data-hardlink.bin"
cs volume snapshot "$work/ws" demo/workspace:latest
cs volume history demo/workspace:latest

step "volume restore into a fresh directory; compare with the source tree"
cs volume restore demo/workspace:latest "$work/restored"
diff -r --no-dereference "$work/ws" "$work/restored" && echo "restored tree identical"
[ "$(readlink "$work/restored/link")" = "src/main.py" ] && echo "symlink kept: link -> src/main.py"

step "checkpoint: an agent session's files, deduplicated per file"
mkdir -p "$work/session"
printf '{"turn": 1}\n' >"$work/session/state.json"
cs checkpoint create "$work/session" demo/agent:ckpt --meta session=demo-1 --volume demo/workspace:latest
cs checkpoint restore demo/agent:ckpt "$work/session-back"
cmp "$work/session/state.json" "$work/session-back/state.json" && echo "checkpoint round trip ok"

step "gc: untag the hello artifact, then sweep what no tag, pin or lease reaches"
cs untag demo/hello:latest
cs gc --grace 0s


step "fsck: re-hash every blob and manifest, follow every reference and tag"
cs fsck
step "demo done"
