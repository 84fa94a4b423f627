#!/usr/bin/env bash
# from-image/build.sh TREE_TAR OUT_FILE MIRROR SUITE COMPONENTS KERNEL_DIR RELEASE
#
# Make a container image's root filesystem a bootable banger system disk (`banger image
# build NAME --from REF`): TREE_TAR is the container image's layers already applied into
# one tar (owners as in the image; banger judged every entry). Without root:
# `mmdebstrap --mode=unshare --variant=custom` only provides the user namespace, the
# chroot and its mounts; the image's own apt-get, inside the chroot, installs what the
# guest contract needs (see docs/guest-image.md) from MIRROR (the host's apt mirror for
# the image's distribution) for SUITE and COMPONENTS, through a temporary source list
# under /tmp: the image's own apt sources stay as they were and the mirror's name is
# written nowhere in the image (apt's lists are removed). Then the banger overlay
# (../rootfs), the kernel's modules and ../customize-rootfs.sh, as for the default image,
# and `mkfs.ext4 -d` of the result (owners from the tarball).
#
#   TREE_TAR    the applied layers (a tar)
#   OUT_FILE    raw ext4 image to write (replaced atomically)
#   MIRROR      apt mirror URL for the image's distribution
#   SUITE       the image's suite (VERSION_CODENAME)
#   COMPONENTS  apt components, comma-separated (main)
#   KERNEL_DIR  a kernel store directory with modules/ (the default image's kernel)
#   RELEASE     that kernel's release (uname -r)
#
# Progress: one `build-rootfs: step N/4: ...` line per step (the CLI shows them).
set -euo pipefail

die() { echo "build-rootfs: error: $*" >&2; exit 1; }
log() { echo "build-rootfs: $*" >&2; }
step() { log "step $1/4: $2 (${SECONDS}s)"; }

[ $# -eq 7 ] || die "usage: $0 TREE_TAR OUT_FILE MIRROR SUITE COMPONENTS KERNEL_DIR RELEASE"
TREE_TAR=$1 OUT_FILE=$2 MIRROR=$3 SUITE=$4 COMPONENTS=$5 KERNEL_DIR=$6 RELEASE=$7
export PATH=$PATH:/usr/sbin:/sbin
for t in mmdebstrap mkfs.ext4 tar truncate du awk; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH (run scripts/install-deps)"
done
[ -d "$KERNEL_DIR/modules" ] || die "$KERNEL_DIR has no modules/"

HERE=$(cd "$(dirname "$0")" && pwd)
OVERLAY=$HERE/../rootfs
[ -d "$OVERLAY" ] || die "overlay dir $OVERLAY missing"
PACKAGES="systemd-sysv udev dbus openssh-server iproute2 kmod procps e2fsprogs"

export TMPDIR=${BANGER_BUILD_TMPDIR:-/var/tmp}
WORK=$(mktemp -d "$TMPDIR/banger-from.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

tar -C "$KERNEL_DIR" --owner=0 --group=0 --numeric-owner \
    --transform "s,^modules,$RELEASE," -cf "$WORK/modules.tar" modules
tar -C "$OVERLAY" --owner=0 --group=0 --numeric-owner -cf "$WORK/overlay.tar" .
# The apt source goes in as an argument (inside the namespace, into /tmp only).
printf 'deb %s %s %s\n' "$MIRROR" "$SUITE" "${COMPONENTS//,/ }" > "$WORK/sources.list"

step 1 "apt-get install $PACKAGES inside the image (a few minutes)"
TARBALL=$WORK/root.tar
mmdebstrap --mode=unshare --variant=custom --skip=setup,update,cleanup \
    --skip=check/empty --skip=output/dev --skip=output/mknod \
    --setup-hook="tar-in $TREE_TAR /" \
    --setup-hook='mkdir -p "$1/tmp" "$1/lib/modules" && chmod 1777 "$1/tmp"' \
    --customize-hook="upload $WORK/sources.list /tmp/banger-sources.list" \
    --customize-hook="upload $HERE/install.sh /tmp/banger-install.sh" \
    --customize-hook="upload /etc/resolv.conf /tmp/banger-resolv.conf" \
    --customize-hook="chroot \"\$1\" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh /tmp/banger-install.sh $PACKAGES" \
    --customize-hook="tar-in $WORK/modules.tar /lib/modules" \
    --customize-hook="tar-in $WORK/overlay.tar /" \
    --customize-hook="upload $HERE/../customize-rootfs.sh /tmp/banger-customize.sh" \
    --customize-hook="chroot \"\$1\" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh /tmp/banger-customize.sh $RELEASE" \
    --customize-hook='rm -rf "$1"/tmp/banger-* "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" "$TARBALL" > "$WORK/mmdebstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
log "root filesystem tarball: $(du -sh --apparent-size "$TARBALL" | cut -f1)"

step 2 "sizing"
read -r tree_kb nfiles < <(tar -tvf "$TARBALL" | awk '{ kb += $3 / 1024; n++ } END { printf "%d %d\n", kb, n }')
SIZE=$(( (tree_kb * 13 / 10 + 64 * 1024) / 1024 ))M
inodes=$(( nfiles * 2 + 8192 ))
log "tree ${tree_kb}K, $nfiles files -> image $SIZE, $inodes inodes"

step 3 "mkfs.ext4 -d tarball"
TMP_IMG=$OUT_FILE.tmp.$$
rm -f "$TMP_IMG"
mkdir -p "$(dirname "$OUT_FILE")"
truncate -s "$SIZE" "$TMP_IMG"
mkfs.ext4 -q -F -L banger-root -b 4096 -N "$inodes" -m 0 -E root_owner=0:0 -d "$TARBALL" "$TMP_IMG" \
    || { rm -f "$TMP_IMG"; die "mkfs.ext4 -d failed (e2fsprogs >= 1.47.1 with libarchive reads tarballs)"; }

step 4 "install $OUT_FILE"
mv -f "$TMP_IMG" "$OUT_FILE"
log "done: $OUT_FILE"
