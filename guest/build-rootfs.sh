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
#               tree size + ~30%
#
# No loop mounts: the image is populated with `mkfs.ext4 -d`.
# Must run as root (debootstrap/chroot). Idempotent.
set -euo pipefail

die() { echo "build-rootfs: error: $*" >&2; exit 1; }
log() { echo "build-rootfs: $*" >&2; }

[ $# -ge 3 ] && [ $# -le 4 ] || die "usage: $0 OUT_FILE MIRROR KERNEL_DIR [SIZE]"
OUT_FILE=$1 MIRROR=$2 KERNEL_DIR=$3 SIZE=${4:-}
[ "$(id -u)" -eq 0 ] || die "must run as root"
for t in debootstrap chroot mkfs.ext4 truncate du find sed; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH"
done
[ -d "$KERNEL_DIR/modules" ] && [ -f "$KERNEL_DIR/kernel.json" ] \
    || die "$KERNEL_DIR does not look like build-kernel.sh output (modules/, kernel.json)"
RELEASE=$(sed -n 's/.*"release": *"\([^"]*\)".*/\1/p' "$KERNEL_DIR/kernel.json")
[ -n "$RELEASE" ] || die "no release in $KERNEL_DIR/kernel.json"

HERE=$(cd "$(dirname "$0")" && pwd)
OVERLAY=$HERE/rootfs
[ -d "$OVERLAY" ] || die "overlay dir $OVERLAY missing"

SUITE=bookworm
PACKAGES=systemd-sysv,udev,dbus,openssh-server,iproute2,iputils-ping,git,ca-certificates,kmod,procps,rsync

WORK=$(mktemp -d /var/tmp/banger-rootfs.XXXXXX)
ROOT=$WORK/root
cleanup() {
    # debootstrap may leave proc/sys mounted on failure; unmount only ours.
    for m in "$ROOT/proc" "$ROOT/sys" "$ROOT/dev/pts" "$ROOT/dev"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m" || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------
# 1. debootstrap. Docs/man/locales are dropped after the fact (debootstrap
#    cannot apply dpkg path-excludes); the dpkg.cfg.d file from the overlay
#    keeps later installs inside the guest small too.
# ---------------------------------------------------------------------------
log "debootstrap $SUITE minbase from $MIRROR"
debootstrap --variant=minbase --include="$PACKAGES" --components=main \
    "$SUITE" "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

# ---------------------------------------------------------------------------
# 2. Kernel modules (+ kmod depmod for the .bin indexes).
# ---------------------------------------------------------------------------
rm -rf "$ROOT/lib/modules/$RELEASE"
mkdir -p "$ROOT/lib/modules"
cp -a "$KERNEL_DIR/modules" "$ROOT/lib/modules/$RELEASE"
in_root depmod -a "$RELEASE"

# ---------------------------------------------------------------------------
# 3. banger overlay + unit configuration.
# ---------------------------------------------------------------------------
cp -a "$OVERLAY/." "$ROOT/"
chmod 755 "$ROOT/usr/local/lib/banger/guest-setup"

in_root systemctl enable banger-guest-setup.service systemd-networkd.service ssh.service
# Work disk is mounted at /root: keep the image's /root empty (mountpoint).
find "$ROOT/root" -mindepth 1 -delete

# Units that are useless in a banger microVM (no VGA, no RTC sync, no apt
# maintenance, nobody logs in on a console: root's password is locked).
MASK="getty@.service serial-getty@.service console-getty.service
      systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer
      dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer
      systemd-pstore.service systemd-networkd-wait-online.service
      systemd-hwdb-update.service systemd-update-utmp-runlevel.service
      ssh.socket"
for u in $MASK; do ln -sf /dev/null "$ROOT/etc/systemd/system/$u"; done

# Never bake SSH host keys into the image, and make sure nothing regenerates
# them at boot (Debian generates them only in openssh-server's postinst, but
# mask any *keygen* unit a future package might add).
rm -f "$ROOT"/etc/ssh/ssh_host_*
for u in "$ROOT"/lib/systemd/system/*keygen*.service; do
    [ -e "$u" ] && ln -sf /dev/null "$ROOT/etc/systemd/system/${u##*/}"
done

# Locked root password (key-only SSH). Unique machine-id generated on first
# boot of each VM (empty file => systemd writes a fresh one, rw root).
in_root passwd -l root >/dev/null
: > "$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
ln -sf /etc/machine-id "$ROOT/var/lib/dbus/machine-id"

# Host leftovers from debootstrap; guest-setup writes these per VM.
echo banger > "$ROOT/etc/hostname"
rm -f "$ROOT/etc/resolv.conf"
: > "$ROOT/etc/resolv.conf"
cat > "$ROOT/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
HOSTS

# ---------------------------------------------------------------------------
# 4. Slim down and clean caches.
# ---------------------------------------------------------------------------
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin \
       "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old \
       "$ROOT"/var/log/* "$ROOT"/tmp/* "$ROOT"/var/tmp/*
find "$ROOT/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/lintian
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
    -exec rm -rf {} + 2>/dev/null || true

# ---------------------------------------------------------------------------
# 5. Raw ext4 image via mkfs.ext4 -d (no loop mount).
# ---------------------------------------------------------------------------
tree_kb=$(du -sk --apparent-size "$ROOT" | cut -f1)
nfiles=$(find "$ROOT" | wc -l)
if [ -z "$SIZE" ]; then
    # +30% headroom, plus room for ext4 metadata (journal, inode tables).
    SIZE=$(( (tree_kb * 13 / 10 + 64 * 1024) / 1024 ))M
fi
inodes=$(( nfiles * 2 + 8192 ))
log "tree ${tree_kb}K, $nfiles files -> image $SIZE, $inodes inodes"

TMP_IMG=$OUT_FILE.tmp.$$
rm -f "$TMP_IMG"
mkdir -p "$(dirname "$OUT_FILE")"
truncate -s "$SIZE" "$TMP_IMG"
mkfs.ext4 -q -F -L banger-root -N "$inodes" -m 0 -E root_owner=0:0 \
    -d "$ROOT" "$TMP_IMG" || { rm -f "$TMP_IMG"; die "mkfs.ext4 -d failed (SIZE too small?)"; }
mv -f "$TMP_IMG" "$OUT_FILE"
log "done: $OUT_FILE ($(du -h --apparent-size "$OUT_FILE" | cut -f1) apparent, $(du -h "$OUT_FILE" | cut -f1) allocated)"
