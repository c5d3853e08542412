#!/usr/bin/env bash
# s6, sandbox start latency: median start-to-exit of `true` in
#   kiln-overlay  kiln's sandbox over an overlay (busybox lower, fresh upper per run,
#                 network none: new mount/pid/uts/ipc/net namespaces, pivot_root,
#                 /proc /dev /sys, caps; the payload is PID 1) — what a RUN step costs
#   kiln-overlay-init  the same with `--init`: kiln-init is PID 1 and forks the
#                 payload (`docker run --init`)
#   kiln-overlay-tmpfs  the same with the fresh upper/work on tmpfs (/dev/shm): the
#                 sandbox's own cost without the upper file system's metadata writes
#   kiln-dir      the same sandbox with the rootfs bind-mounted (no overlay, no upper)
#   kiln-binary   kiln-overlay with the `kiln` binary ($KILN, if set) re-executed as the
#                 helper, as `kiln build`/`kiln run` do: adds the big binary's start-up
#   runc          `runc run` on an OCI bundle of the same rootfs (runc's default spec:
#                 its own network namespace too)
#   floor         `unshare -m -p -n -f --mount-proc chroot ROOTFS /bin/true`
# Needs root, busybox-static, runc, hyperfine. Results: $BENCH_OUT/s6-sandbox.{md,json}.
#
# RT=1 runs every peer at SCHED_FIFO priority 10 (`chrt -f 10`), so that other jobs
# on a shared machine do not decide the result (with 2 busy cores, scheduling delay
# dominates a 5 ms start). runc's spec then gives its cgroup an RT budget, which it
# needs to accept a SCHED_FIFO task.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-200}
BENCH_OUT=${BENCH_OUT:-/var/tmp/kiln-bench}
mkdir -p "$BENCH_OUT"
for tool in hyperfine runc busybox python3; do
  command -v "$tool" >/dev/null || { echo "s6-sandbox: needs $tool (apt-get install hyperfine runc busybox-static)" >&2; exit 1; }
done

cargo build --release --quiet -p kiln-executor --bin kiln-sandbox-run
RUNNER=$PWD/target/release/kiln-sandbox-run

work=$(mktemp -d /var/tmp/kiln-s6.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/bundle/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/proc" "$root/dev" "$root/sys" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in sh true; do ln -s busybox "$root/bin/$applet"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"

(cd "$work/bundle" && runc spec)
python3 - "$work/bundle/config.json" <<'PY'
import json, os, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["args"] = ["true"]
c["process"]["terminal"] = False
c["root"] = {"path": "rootfs", "readonly": True}
if os.environ.get("RT") == "1":
    c["linux"].setdefault("resources", {})["cpu"] = {"realtimeRuntime": 100000, "realtimePeriod": 1000000}
json.dump(c, open(p, "w"), indent=1)
PY

KILN_PEER=()
if [ -n "${KILN:-}" ]; then
  KILN_PEER=(-n kiln-binary "$RUNNER --helper $KILN --lower $root -- true")
fi
PRIO=()
[ "${RT:-0}" = 1 ] && PRIO=(chrt -f 10)
# IGNORE_FAILURES=1 keeps timing when a run fails (hyperfine -i) instead of aborting
# (failed runs are then counted in the timings; the JSON has their exit codes).
IGN=()
[ "${IGNORE_FAILURES:-0}" = 1 ] && IGN=(-i)
"${PRIO[@]}" hyperfine -N "${IGN[@]}" --warmup 10 --runs "$RUNS" \
  --export-markdown "$BENCH_OUT/s6-sandbox.md" --export-json "$BENCH_OUT/s6-sandbox.json" \
  -n kiln-overlay "$RUNNER --lower $root -- true" \
  -n kiln-overlay-init "$RUNNER --init --lower $root -- true" \
  -n kiln-overlay-tmpfs "env TMPDIR=/dev/shm $RUNNER --lower $root -- true" \
  -n kiln-dir "$RUNNER --dir $root -- true" \
  -n runc "runc run --bundle $work/bundle kiln-s6-bench" \
  "${KILN_PEER[@]}" \
  -n floor "unshare -m -p -n -f --mount-proc chroot $root /bin/true"

python3 - "$BENCH_OUT/s6-sandbox.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(f'{r["command"]:>18}: median {r["median"]*1000:6.2f} ms  (mean {r["mean"]*1000:6.2f} ± {r["stddev"]*1000:5.2f})')
PY
