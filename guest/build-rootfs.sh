#!/usr/bin/env bash
# build-rootfs.sh OUT_FILE MIRROR KERNEL_DIR [SIZE]
#
# Build the banger guest system disk: a raw ext4 image (label banger-root)
# containing a minimal Debian bookworm with systemd, sshd and the banger guest
# contract from guest/rootfs/ (see docs/guest-image.md).
#
#   OUT_FILE    raw ext4 image to write (replaced atomically)
#   MIRROR      Debian mirror URL, e.g. http://<mirror>/debian
#   KERNEL_DIR  output of build-kernel.sh (modules/ and kernel.json are used)
#   SIZE        optional image size for truncate(1) (e.g. 2G); default is the
#               tree size + ~30% (the system disk grows at boot, see growfs)
#
# Runs as any user: `mmdebstrap --mode=unshare` bootstraps inside a user
# namespace (a non-root user needs an /etc/subuid and /etc/subgid range and
# newuidmap/newgidmap from the uidmap package; as root no user namespace is
# made) and writes a tarball whose owners are the guest's. The tarball becomes
# the ext4 image without root and without a loop mount: `mkfs.ext4 -d TARBALL`
# where e2fsprogs >= 1.47.1 reads tarballs (with libarchive13), else `fakeroot`
# unpacks it and `mkfs.ext4 -d DIR` reads the faked owners (measured on a 342 MiB
# tree, 2 loaded cores: 6-8 s against 22-79 s, and no second copy of the tree).
# Every file in the image is owned as in the guest (root), whoever builds it.
# Idempotent.
#
# Progress: one `build-rootfs: step N/4: ...` line per step, with sizes.
set -euo pipefail

die() { echo "build-rootfs: error: $*" >&2; exit 1; }
log() { echo "build-rootfs: $*" >&2; }
step() { log "step $1/4: $2 (${SECONDS}s)"; }

[ $# -ge 3 ] && [ $# -le 4 ] || die "usage: $0 OUT_FILE MIRROR KERNEL_DIR [SIZE]"
OUT_FILE=$1 MIRROR=$2 KERNEL_DIR=$3 SIZE=${4:-}
export PATH=$PATH:/usr/sbin:/sbin
for t in mmdebstrap mkfs.ext4 tar truncate du find sed; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH (run scripts/install-deps)"
done
if [ "$(id -u)" -ne 0 ]; then
    user=$(id -un)
    for t in newuidmap newgidmap; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found: install the uidmap package (scripts/install-deps)"
    done
    for f in /etc/subuid /etc/subgid; do
        grep -qE "^($user|$(id -u)):" "$f" 2>/dev/null \
            || die "no $f range for $user: sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $user"
    done
fi
[ -d "$KERNEL_DIR/modules" ] && [ -f "$KERNEL_DIR/kernel.json" ] \
    || die "$KERNEL_DIR does not look like build-kernel.sh output (modules/, kernel.json)"
RELEASE=$(sed -n 's/.*"release": *"\([^"]*\)".*/\1/p' "$KERNEL_DIR/kernel.json")
[ -n "$RELEASE" ] || die "no release in $KERNEL_DIR/kernel.json"

HERE=$(cd "$(dirname "$0")" && pwd)
OVERLAY=$HERE/rootfs
[ -d "$OVERLAY" ] || die "overlay dir $OVERLAY missing"

SUITE=bookworm
PACKAGES=systemd-sysv,udev,dbus,openssh-server,iproute2,iputils-ping,git,ca-certificates,kmod,procps,rsync,e2fsprogs

# The bootstrap's scratch chroot lives in TMPDIR; in unshare mode it is made by
# the namespace's root (a subordinate uid), so it must be a directory anyone
# may create in (/var/tmp: on disk, unlike a tmpfs /tmp).
export TMPDIR=${BANGER_BUILD_TMPDIR:-/var/tmp}
WORK=$(mktemp -d "$TMPDIR/banger-rootfs.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

size_of() { du -sh --apparent-size "$1" | cut -f1; }

# Kernel modules and the overlay enter the chroot as tarballs owned by root:
# whoever runs the build, they are root's files in the guest.
tar -C "$KERNEL_DIR" --owner=0 --group=0 --numeric-owner \
    --transform "s,^modules,$RELEASE," -cf "$WORK/modules.tar" modules
tar -C "$OVERLAY" --owner=0 --group=0 --numeric-owner -cf "$WORK/overlay.tar" .

# ---------------------------------------------------------------------------
# 1. Bootstrap + customize, into a tarball. Docs/man/locales are never
#    unpacked (the overlay's dpkg excludes apply from the first package on).
# ---------------------------------------------------------------------------
step 1 "mmdebstrap $SUITE minbase from $MIRROR (a few minutes)"
TARBALL=$WORK/root.tar
# The excludes go as options, not as a file name: mmdebstrap tests for a file from
# inside the namespace, which cannot see into the caller's private directories.
dpkgopts=()
while read -r line; do
    case "$line" in ''|'#'*) ;; *) dpkgopts+=("--dpkgopt=$line") ;; esac
done < "$OVERLAY/etc/dpkg/dpkg.cfg.d/01-banger-nodoc"
mmdebstrap --mode=unshare --variant=minbase --components=main \
    --include="$PACKAGES" "${dpkgopts[@]}" \
    --customize-hook='mkdir -p "$1/lib/modules"' \
    --customize-hook="tar-in $WORK/modules.tar /lib/modules" \
    --customize-hook="tar-in $WORK/overlay.tar /" \
    --customize-hook="upload $HERE/customize-rootfs.sh /tmp/banger-customize.sh" \
    --customize-hook="chroot \"\$1\" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh /tmp/banger-customize.sh $RELEASE" \
    "$SUITE" "$TARBALL" "$MIRROR" > "$WORK/mmdebstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
rm -f "$WORK/modules.tar" "$WORK/overlay.tar"
log "root filesystem tarball: $(size_of "$TARBALL")"

# ---------------------------------------------------------------------------
# 2. Size the image from the tarball's listing.
# ---------------------------------------------------------------------------
step 2 "sizing"
read -r tree_kb nfiles < <(tar -tvf "$TARBALL" | awk '{ kb += $3 / 1024; n++ } END { printf "%d %d\n", kb, n }')
if [ -z "$SIZE" ]; then
    # +30% headroom, plus room for ext4 metadata (journal, inode tables).
    SIZE=$(( (tree_kb * 13 / 10 + 64 * 1024) / 1024 ))M
fi
inodes=$(( nfiles * 2 + 8192 ))
log "tree ${tree_kb}K, $nfiles files -> image $SIZE, $inodes inodes"

# ---------------------------------------------------------------------------
# 3. ext4 image, owners from the tarball.
# ---------------------------------------------------------------------------
TMP_IMG=$OUT_FILE.tmp.$$
rm -f "$TMP_IMG"
mkdir -p "$(dirname "$OUT_FILE")"
truncate -s "$SIZE" "$TMP_IMG"
# 4 KiB blocks whatever the image size: the filesystem grows to the system disk at boot
# (mke2fs would pick 1 KiB blocks for a small image, slow to grow and to use at 8 GiB).
MKFS=(mkfs.ext4 -q -F -L banger-root -b 4096 -N "$inodes" -m 0 -E root_owner=0:0)
mke2fs_version=$(mkfs.ext4 -V 2>&1 | sed -n 's/^mke2fs \([0-9.]*\).*/\1/p')
if printf '1.47.1\n%s\n' "$mke2fs_version" | sort -V -C \
    && { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q 'libarchive\.so\.13'; then
    step 3 "mkfs.ext4 -d tarball (e2fsprogs $mke2fs_version)"
    "${MKFS[@]}" -d "$TARBALL" "$TMP_IMG" \
        || { rm -f "$TMP_IMG"; die "mkfs.ext4 -d failed (SIZE too small?)"; }
else
    command -v fakeroot >/dev/null 2>&1 \
        || die "e2fsprogs $mke2fs_version reads no tarballs and fakeroot is missing (run scripts/install-deps)"
    step 3 "fakeroot: unpack + mkfs.ext4 -d (e2fsprogs $mke2fs_version)"
    mkdir "$WORK/root"
    fakeroot -- sh -c 'tar -C "$1" --numeric-owner -xpf "$2" && rm -f "$2" && shift 2 && exec "$@"' \
        sh "$WORK/root" "$TARBALL" "${MKFS[@]}" -d "$WORK/root" "$TMP_IMG" \
        || { rm -f "$TMP_IMG"; die "mkfs.ext4 -d failed (SIZE too small?)"; }
fi

# ---------------------------------------------------------------------------
# 4. Into place.
# ---------------------------------------------------------------------------
step 4 "install $OUT_FILE"
mv -f "$TMP_IMG" "$OUT_FILE"
log "done: $OUT_FILE ($(size_of "$OUT_FILE") apparent, $(du -h "$OUT_FILE" | cut -f1) allocated)"
