#!/bin/sh
# Make the `busybox:local` base image from the busybox-static package's
# /bin/busybox: a rootfs with the binary, its applet links, /etc/passwd and
# /etc/group, imported with `kiln import`.
# Usage: testdata/make-busybox.sh [KILN] [NAME]   (env KILN_ROOT picks the store)
set -eu
kiln=${1:-kiln}
name=${2:-busybox:local}
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "error: \`$busybox\` not found (apt-get install busybox-static)" >&2; exit 1; }
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root" "$rootfs/usr/bin" "$rootfs/sbin" "$rootfs/usr/sbin"
chmod 1777 "$rootfs/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list-full); do
  [ "$applet" = bin/busybox ] && continue
  mkdir -p "$rootfs/$(dirname "$applet")"
  ln -sf /bin/busybox "$rootfs/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0} "$kiln" import -c 'CMD ["sh"]' "$rootfs" "$name"
