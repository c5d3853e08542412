#!/usr/bin/env bash
# s5 by hand (until `kiln build` exists): export the s4 tree as an image.
#
# Makes the s4 context (20,000 small files + one 500 MiB incompressible file) with
# ../shared/bench/scenarios/s4-big-copy/gen.sh, `kiln import`s it as one layer, then compares:
#   1. `kiln save` (docker-archive, uncompressed)   vs  `tar -cf` of the same tree
#   2. `kiln save --format oci --compress gzip`     vs  `tar -cf - | gzip`
#      (cold: the remembered gzip blob is deleted before each run; plus one warm run, which
#       reuses it)
# with hyperfine, and peak RSS of each kiln run with /usr/bin/time -v.
#
# Usage: KILN=target/release/kiln bench/s5-store.sh      (needs hyperfine, GNU time)
# Output: $BENCH_OUT/s5-store/ (default /var/tmp/kiln-bench), summary in summary.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SHARED="${KILN_SHARED:-$HERE/../../shared}"
KILN="$(realpath "${KILN:-$HERE/../target/release/kiln}")"
OUT="${BENCH_OUT:-/var/tmp/kiln-bench}/s5-store"
RUNS="${RUNS:-5}"
export KILN_ROOT="$OUT/root"

command -v hyperfine >/dev/null || { echo "need hyperfine (apt-get install hyperfine)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "need GNU time (apt-get install time)" >&2; exit 1; }

mkdir -p "$OUT"
if [ ! -f "$OUT/s4/ctx/big.bin" ]; then
  bash "$SHARED/bench/scenarios/s4-big-copy/gen.sh" "$OUT" >/dev/null
fi
ctx="$OUT/s4/ctx"
rm -rf "$KILN_ROOT"
echo "== import"
/usr/bin/time -f '%e s, %M KiB max RSS' "$KILN" import "$ctx" s5:latest
ls "$KILN_ROOT/blobs/sha256" | sort > "$OUT/blobs-before"
# Deletes the blobs a gzip save added (the remembered compressed layer), so each run compresses.
drop_compressed="comm -13 $OUT/blobs-before <(ls $KILN_ROOT/blobs/sha256 | sort) | sed 's|^|$KILN_ROOT/blobs/sha256/|' | xargs -r rm -f"

echo "== uncompressed: kiln save vs tar -cf"
# `sync` before each run: no run pays for the previous one's dirty pages.
hyperfine --warmup 1 --runs "$RUNS" --export-markdown "$OUT/save-none.md" --export-json "$OUT/save-none.json" \
  --prepare sync \
  -n 'kiln save' "$KILN save -o $OUT/kiln.tar s5:latest" \
  -n 'tar -cf' "tar -C $ctx -cf $OUT/tar.tar ."

echo "== gzip: kiln save --format oci --compress gzip vs tar | gzip"
hyperfine --warmup 0 --runs "$RUNS" --export-markdown "$OUT/save-gzip.md" --export-json "$OUT/save-gzip.json" \
  --shell bash --prepare "$drop_compressed; sync" \
  -n 'kiln save oci gzip (cold)' "$KILN save --format oci --compress gzip -o $OUT/kiln-gz.tar s5:latest" \
  -n 'tar | gzip' "tar -C $ctx -cf - . | gzip > $OUT/tar.tar.gz"
hyperfine --warmup 1 --runs "$RUNS" --export-markdown "$OUT/save-gzip-warm.md" --prepare sync \
  -n 'kiln save oci gzip (warm, compressed blob remembered)' \
  "$KILN save --format oci --compress gzip -o $OUT/kiln-gz.tar s5:latest"

echo "== machine load (other jobs share these cores)"
uptime | tee "$OUT/load.txt"

echo "== peak memory"
{
  echo "| run | peak RSS |"
  echo "|---|---|"
  for args in "save -o $OUT/kiln.tar s5:latest" "save --format oci --compress gzip -o $OUT/kiln-gz.tar s5:latest"; do
    bash -c "$drop_compressed"
    rss=$(/usr/bin/time -f '%M' "$KILN" $args 2>&1 >/dev/null | tail -1)
    echo "| kiln $args | ${rss} KiB |"
  done
  rss=$(/usr/bin/time -f '%M' tar -C "$ctx" -cf "$OUT/tar.tar" . 2>&1 | tail -1)
  echo "| tar -cf | ${rss} KiB |"
} > "$OUT/rss.md"

ls -l "$OUT"/*.tar* > "$OUT/sizes.txt"
cat "$OUT/save-none.md" "$OUT/save-gzip.md" "$OUT/save-gzip-warm.md" "$OUT/rss.md" "$OUT/sizes.txt" | tee "$OUT/summary.md"
