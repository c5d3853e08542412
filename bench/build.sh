#!/usr/bin/env bash
# kiln build alone on the shared scenarios s1 (cold 3-stage), s2 (s1 fully
# cached) and s3 (edit one file of 5,000, rebuild), in a private store, with
# hyperfine. The side-by-side numbers come from ../shared/bench/run-peers.sh.
# Usage: bench/build.sh [KILN]   (root; busybox-static, hyperfine)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kiln=${1:-$here/target/release/kiln}
scen=${KILN_SHARED:-$here/../shared}/bench/scenarios
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KILN_ROOT=$work/store
fresh="rm -rf $KILN_ROOT && $here/testdata/make-busybox.sh $kiln >/dev/null"
mkdir -p "$work/s1ctx"
build() { echo "$kiln build --progress=plain --network=none -f $1 -t $2 $3"; }

echo "== s1: cold 3-stage build"
hyperfine -w 0 -r "${RUNS_COLD:-5}" --prepare "$fresh" "$(build "$scen/s1-multistage/Dockerfile" s1 "$work/s1ctx")"
echo "== s2: s1 again, fully cached"
hyperfine -w 1 -r "${RUNS_WARM:-10}" "$(build "$scen/s1-multistage/Dockerfile" s1 "$work/s1ctx")"
echo "== s3: edit one file of 5,000, rebuild"
ctx=$(bash "$scen/s3-edit-one/gen.sh" "$work")
eval "$(build "$scen/s3-edit-one/Dockerfile" s3 "$ctx")" >/dev/null 2>&1
hyperfine -w 1 -r "${RUNS_WARM:-10}" --prepare "bash $scen/s3-edit-one/edit.sh $ctx" "$(build "$scen/s3-edit-one/Dockerfile" s3 "$ctx")"
