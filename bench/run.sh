#!/usr/bin/env bash
# kiln run start latency (the shared scenario s6): median of
#   `kiln run --rm --network none busybox:local true`
# in a private store (store open, image resolve, container record, overlay over the
# shared snapshot with a fresh upper, namespaces, exec, exit recorded, container
# removed), with hyperfine -N. The side-by-side numbers (runc, podman, docker) come
# from ../shared/bench/run-peers.sh s6.
# Usage: bench/run.sh [KILN]   (root; busybox-static, hyperfine)
# RT=1 runs kiln at SCHED_FIFO priority 10 (`chrt -f 10`), so that other jobs on a
# shared machine do not decide the result.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kiln=${1:-$here/target/release/kiln}
work=$(mktemp -d /var/tmp/kiln-run-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
export KILN_ROOT=$work/store
"$here/testdata/make-busybox.sh" "$kiln" >/dev/null
prefix=""
[ "${RT:-0}" = 1 ] && prefix="chrt -f 10 "
echo "== s6: kiln run --rm --network none busybox:local true"
hyperfine -N -w 20 -r "${RUNS:-200}" --export-json "$work/s6.json" \
  "${prefix}$kiln run --rm --network none busybox:local true"
python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print('median %.1f ms (target <= 15 ms)' % (r['median']*1000))" "$work/s6.json"
