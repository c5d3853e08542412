#!/usr/bin/env bash
# s7: push and pull of the s4 image (busybox + 20,000 small files + one 500 MiB
# incompressible file) to/from a loopback registry, kiln vs skopeo.
#
# Starts Debian's docker-registry on 127.0.0.1 (a free port; storage under $OUT), builds the
# s4 image with kiln (../shared/bench/scenarios/s4-big-copy), then compares with hyperfine:
#   1. push:  `kiln push` (gzip layers remembered from the first push: upload only)
#             vs `skopeo copy oci:DIR docker://...` (the same image as a gzip OCI layout,
#             written by `kiln save --format oci --compress gzip`: upload only)
#             + one cold `kiln push` (the compressed layers forgotten: gzip + upload)
#      The registry's storage is emptied before each run.
#   2. pull:  `kiln pull` into an empty store (decompresses, verifies, fsyncs the layers)
#             vs `skopeo copy docker://... oci:DIR` (stores the compressed blobs as they come)
# Medians in $OUT/summary.md. The machine is shared: numbers are noisy, compare within a run.
#
# Usage: KILN=target/release/kiln bench/s7-registry.sh     (needs hyperfine, skopeo,
#        docker-registry, busybox-static, curl; root for `kiln build`)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SHARED="${KILN_SHARED:-$HERE/../../shared}"
KILN="$(realpath "${KILN:-$HERE/../target/release/kiln}")"
OUT="${BENCH_OUT:-/var/tmp/kiln-bench}/s7-registry"
RUNS="${RUNS:-5}"
export KILN_ROOT="$OUT/root"
export DOCKER_CONFIG="$OUT/docker"   # no saved credentials: the registry is open

for t in hyperfine skopeo docker-registry curl; do
  command -v "$t" >/dev/null || { echo "need $t (see .ci/setup / apt-get install $t)" >&2; exit 1; }
done
mkdir -p "$OUT"

# ---- registry on a free port, killed on exit
R="$OUT/registry"; rm -rf "$R"; mkdir -p "$R/data"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$R/config.yml" <<YML
version: 0.1
log: { level: error }
storage:
  filesystem: { rootdirectory: $R/data }
  delete: { enabled: true }
http: { addr: 127.0.0.1:$PORT }
YML
docker-registry serve "$R/config.yml" > "$R/log" 2>&1 < /dev/null &
REG_PID=$!
trap 'kill $REG_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null
HOST="127.0.0.1:$PORT"
IMG="$HOST/bench/s4:latest"
echo "registry at $HOST (pid $REG_PID)"

# ---- the s4 image
if [ ! -f "$OUT/s4/ctx/big.bin" ]; then
  bash "$SHARED/bench/scenarios/s4-big-copy/gen.sh" "$OUT" >/dev/null
fi
if ! "$KILN" image inspect s4:latest >/dev/null 2>&1; then
  rm -rf "$KILN_ROOT"
  "$HERE/../testdata/make-busybox.sh" "$KILN" >/dev/null
  "$KILN" build --progress=plain --network=none --pull=never \
    -f "$SHARED/bench/scenarios/s4-big-copy/Dockerfile" -t s4:latest "$OUT/s4/ctx" >/dev/null
fi
"$KILN" tag s4:latest "$IMG"
# The same image as a gzip OCI layout for skopeo (this also makes kiln remember the gzip layers).
rm -rf "$OUT/layout" "$OUT/layout.tar"; mkdir -p "$OUT/layout"
"$KILN" save --format oci --compress gzip -o "$OUT/layout.tar" "$IMG"
tar -C "$OUT/layout" -xf "$OUT/layout.tar"; rm -f "$OUT/layout.tar"
LAYOUT_REF=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$OUT/layout/index.json")
empty_registry="rm -rf $R/data/docker; sync"
# The gzip layer blobs kiln made (and remembers), from the layout's manifest: deleting them
# makes the next push compress again.
python3 - "$OUT/layout" > "$OUT/gzip-layers" <<'PY'
import json, sys
root = sys.argv[1]
index = json.load(open(f"{root}/index.json"))
m = index["manifests"][0]["digest"].split(":")[1]
for l in json.load(open(f"{root}/blobs/sha256/{m}"))["layers"]:
    print(l["digest"].split(":")[1])
PY
drop_compressed="sed 's|^|$KILN_ROOT/blobs/sha256/|' $OUT/gzip-layers | xargs -r rm -f"

echo "== push (upload only; registry emptied before each run)"
hyperfine --warmup 1 --runs "$RUNS" --shell bash --prepare "$empty_registry" \
  --export-markdown "$OUT/push.md" --export-json "$OUT/push.json" \
  -n 'kiln push' "$KILN push -q $IMG" \
  -n 'skopeo copy oci: -> docker://' "skopeo copy -q --dest-tls-verify=false oci:$OUT/layout:$LAYOUT_REF docker://$IMG"

echo "== push, cold (kiln forgets its gzip layers: compress + upload)"
hyperfine --warmup 0 --runs 2 --shell bash \
  --export-markdown "$OUT/push-cold.md" \
  --prepare "$empty_registry; $drop_compressed; sync" \
  -n 'kiln push (cold: gzip + upload)' "$KILN push -q $IMG"

echo "== pull (into an empty store / an empty layout dir)"
"$KILN" push -q "$IMG" >/dev/null
hyperfine --warmup 1 --runs "$RUNS" --shell bash \
  --export-markdown "$OUT/pull.md" --export-json "$OUT/pull.json" \
  --prepare "rm -rf $OUT/pull-root $OUT/pull-layout; sync" \
  -n 'kiln pull' "KILN_ROOT=$OUT/pull-root $KILN pull -q $IMG" \
  -n 'skopeo copy docker:// -> oci:' "skopeo copy -q --src-tls-verify=false docker://$IMG oci:$OUT/pull-layout:latest"

echo "== machine load (other jobs share these cores)"
uptime | tee "$OUT/load.txt"
du -sh "$R/data" "$OUT/layout" | tee "$OUT/sizes.txt"
cat "$OUT/push.md" "$OUT/push-cold.md" "$OUT/pull.md" "$OUT/load.txt" 2>/dev/null | tee "$OUT/summary.md"
