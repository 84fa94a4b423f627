#!/usr/bin/env bash
# build-kernel.sh OUT_DIR
#
# Produce the guest kernel assets for banger microVMs from Debian's
# linux-image-cloud-amd64 package, without installing anything on the host:
#
#   OUT_DIR/vmlinux       uncompressed ELF kernel (QEMU microvm / Firecracker)
#   OUT_DIR/initrd.img    gzip'd newc cpio: busybox + virtio modules + /init
#   OUT_DIR/modules/      full /lib/modules/<release> tree (with depmod output)
#   OUT_DIR/kernel.json   {"release": "<uname -r>", "package_version": "..."}
#
# Runs as any user: `apt-get download` reads the host's package lists, `dpkg-deb -x`
# unpacks without root, the initrd's cpio records root as every file's owner
# (-R 0:0) and the modules become root's when build-rootfs.sh packs them.
# Idempotent: everything is built in a temp dir and then moved into OUT_DIR.
set -euo pipefail

die() { echo "build-kernel: error: $*" >&2; exit 1; }
log() { echo "build-kernel: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
OUT_DIR=$1
export PATH=$PATH:/usr/sbin:/sbin

# Tools we rely on. busybox must be the *static* build (it is copied into
# the initrd and must run without a libc there).
for t in apt-get apt-cache dpkg-deb cpio gzip grep od find sort busybox file; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found in PATH"
done
BUSYBOX=$(command -v busybox)
if ! file -L "$BUSYBOX" | grep -q 'statically linked'; then
    # Debian's busybox-static installs /bin/busybox statically linked.
    [ -x /bin/busybox ] && file -L /bin/busybox | grep -q 'statically linked' \
        && BUSYBOX=/bin/busybox \
        || die "busybox at $BUSYBOX is not statically linked (install busybox-static)"
fi

# Modules the initrd loads (dependencies are resolved from modules.dep).
INITRD_MODULES="virtio virtio_ring virtio_mmio virtio_blk virtio_net"

WORK=$(mktemp -d /tmp/banger-kernel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------
# 1. Resolve metapackage -> real image package and download it.
# ---------------------------------------------------------------------------
META=linux-image-cloud-amd64
resolve_pkg() {
    apt-cache depends "$META" 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}
PKG=$(resolve_pkg)
if [ -z "$PKG" ]; then
    # A fresh machine (or container) may have no package lists yet; only root can
    # fetch them.
    if [ "$(id -u)" -eq 0 ]; then
        log "refreshing apt package lists"
        apt-get update -qq >/dev/null 2>&1 || true
        PKG=$(resolve_pkg)
    fi
fi
[ -n "$PKG" ] || die "could not resolve $META via apt-cache depends (the host has no package lists: sudo apt-get update)"
log "metapackage $META -> $PKG"

cd "$WORK"
# As root, apt-get download runs as _apt; make the dir accessible.
chmod 755 "$WORK"
apt-get download -q "$PKG" >/dev/null 2>&1 \
    || apt-get download "$PKG" || die "apt-get download $PKG failed"
DEB=$(ls "$WORK"/"$PKG"_*.deb 2>/dev/null | head -n1)
[ -f "$DEB" ] || die "downloaded .deb not found"
PKG_VERSION=$(dpkg-deb -f "$DEB" Version)
log "downloaded $(basename "$DEB") ($(du -h "$DEB" | cut -f1))"

dpkg-deb -x "$DEB" "$WORK/pkg"
VMLINUZ=$(ls "$WORK"/pkg/boot/vmlinuz-* | head -n1)
CONFIG=$(ls "$WORK"/pkg/boot/config-* | head -n1)
RELEASE=${VMLINUZ##*/vmlinuz-}
MODSRC=$WORK/pkg/lib/modules/$RELEASE
[ -d "$MODSRC" ] || die "modules dir for $RELEASE missing in package"
log "kernel release $RELEASE (package version $PKG_VERSION)"

# ---------------------------------------------------------------------------
# 2. Extract ELF vmlinux from the bzImage.
#    Same idea as the kernel's scripts/extract-vmlinux: look for the magic of
#    each supported compressor inside the image, decompress from that offset
#    (ignoring trailing garbage errors) and keep the first result that is ELF.
# ---------------------------------------------------------------------------
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; }

# try_decomp MAGIC_REGEX DECOMPRESS_CMD...
try_decomp() {
    local magic=$1; shift
    command -v "$1" >/dev/null 2>&1 || return 1
    local off
    # grep -obUaP prints byte offsets of binary matches.
    for off in $(LC_ALL=C grep -obUaP "$magic" "$VMLINUZ" 2>/dev/null | cut -d: -f1); do
        tail -c +"$((off + 1))" "$VMLINUZ" | "$@" > "$WORK/vmlinux" 2>/dev/null || true
        if [ -s "$WORK/vmlinux" ] && is_elf "$WORK/vmlinux"; then
            log "found $1 payload at offset $off"
            return 0
        fi
    done
    return 1
}

if is_elf "$VMLINUZ"; then
    cp "$VMLINUZ" "$WORK/vmlinux"
else
    try_decomp '\x1f\x8b\x08'              gzip -dc ||
    try_decomp '\xfd\x37\x7a\x58\x5a\x00'  xz -dc ||
    try_decomp '\x28\xb5\x2f\xfd'          zstd -dcq ||
    try_decomp '\x02\x21\x4c\x18'          lz4 -dc ||
    try_decomp '\x5d\x00\x00\x00'          lzma -dc ||
    try_decomp 'BZh'                       bzip2 -dc ||
    try_decomp '\x89\x4c\x5a'              lzop -dc ||
    die "could not extract an ELF vmlinux from $VMLINUZ (missing decompressor?)"
fi

# ---------------------------------------------------------------------------
# 3. Modules: generate modules.dep & co (the .deb ships none; depmod runs in
#    postinst). Host kmod's depmod if present, else busybox's. The rootfs
#    build re-runs kmod's depmod inside the chroot for the .bin indexes.
# ---------------------------------------------------------------------------
mkdir -p "$WORK/modroot/lib/modules"
cp -a "$MODSRC" "$WORK/modroot/lib/modules/$RELEASE"
if command -v depmod >/dev/null 2>&1; then
    depmod -b "$WORK/modroot" "$RELEASE"
else
    "$BUSYBOX" depmod -b "$WORK/modroot" "$RELEASE"
fi
MODDIR=$WORK/modroot/lib/modules/$RELEASE
[ -s "$MODDIR/modules.dep" ] || die "depmod produced no modules.dep"

# Is something we need built in? Then it needs no module.
builtin() { grep -q "^CONFIG_$1=y" "$CONFIG"; }
builtin EXT4_FS || INITRD_MODULES="$INITRD_MODULES ext4 crc32c_generic"

# Resolve each wanted module + deps into a load order (deps first).
declare -A DEP SEEN
while IFS= read -r line; do
    DEP[${line%%:*}]=${line#*:}
done < "$MODDIR/modules.dep"

ORDER=()
visit() {  # visit PATH_RELATIVE_TO_MODDIR
    local m=$1 d
    [ -n "${SEEN[$m]:-}" ] && return 0
    SEEN[$m]=1
    for d in ${DEP[$m]}; do visit "$d"; done
    ORDER+=("$m")
}
for name in $INITRD_MODULES; do
    # modules.dep keys are paths; match on basename with - / _ equivalence.
    want=$(echo "$name" | tr - _)
    path=""
    for k in "${!DEP[@]}"; do
        b=${k##*/}; b=${b%%.ko*}; b=$(echo "$b" | tr - _)
        [ "$b" = "$want" ] && { path=$k; break; }
    done
    if [ -z "$path" ]; then
        if grep -q "/$name.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $name is built in"; continue
        fi
        die "module $name not found in $RELEASE"
    fi
    visit "$path"
done
log "initrd module load order: $(for m in "${ORDER[@]}"; do basename "${m%%.ko*}"; done | tr '\n' ' ')"

# ---------------------------------------------------------------------------
# 4. initrd: busybox-static + modules (decompressed) + /init.
# ---------------------------------------------------------------------------
IR=$WORK/initrd
mkdir -p "$IR"/{bin,sbin,dev,proc,sys,newroot,etc,lib/modules}
cp "$BUSYBOX" "$IR/bin/busybox"
# Only the applets /init uses; symlinks keep the image tiny.
for a in sh mount umount insmod switch_root poweroff sleep cat echo mkdir \
         findfs blkid grep sed ls dmesg; do
    ln -sf busybox "$IR/bin/$a"
done
: > "$IR/etc/modules.load"
for m in "${ORDER[@]}"; do
    base=$(basename "$m"); base=${base%%.ko*}.ko
    case "$m" in
        *.ko.xz)  xz -dc "$MODDIR/$m" > "$IR/lib/modules/$base" ;;
        *.ko.zst) zstd -dcq "$MODDIR/$m" > "$IR/lib/modules/$base" ;;
        *.ko.gz)  gzip -dc "$MODDIR/$m" > "$IR/lib/modules/$base" ;;
        *)        cp "$MODDIR/$m" "$IR/lib/modules/$base" ;;
    esac
    echo "$base" >> "$IR/etc/modules.load"
done

cat > "$IR/init" <<'EOF'
#!/bin/sh
# banger initrd: load virtio modules, wait for root=, switch_root to /sbin/init.
export PATH=/bin:/sbin

fail() {
    echo "banger-initrd: FATAL: $*" >&2
    echo "banger-initrd: powering off" >&2
    sync
    poweroff -f
    # poweroff -f should not return; keep PID 1 alive to avoid a panic loop.
    while :; do sleep 3600; done
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

root="" rootfstype="" rootflags="" mode=ro timeout=300
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*)           root=${arg#root=} ;;
        rootfstype=*)     rootfstype=${arg#rootfstype=} ;;
        rootflags=*)      rootflags=${arg#rootflags=} ;;
        banger.roottimeout=*) timeout=${arg#*=} ;;
        rw)               mode=rw ;;
        ro)               mode=ro ;;
    esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"

# insmod does not read /proc/cmdline: forward "module.param=value" args.
while read -r m; do
    name=${m%.ko} params=""
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "$name".*=*) params="$params ${arg#"$name".}" ;; esac
    done
    # shellcheck disable=SC2086
    insmod "/lib/modules/$m" $params 2>/dev/null || \
        grep -q "^$name " /proc/modules || fail "insmod $m failed"
done < /etc/modules.load

# Poll for the root device with a deadline (uptime based, no fixed sleep).
read -r up _ < /proc/uptime
deadline=$(( ${up%.*} + timeout ))
dev=""
while :; do
    case "$root" in
        /dev/*) [ -b "$root" ] && dev=$root ;;
        LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) || dev="" ;;
        *) fail "unsupported root=$root" ;;
    esac
    [ -n "$dev" ] && break
    read -r up _ < /proc/uptime
    [ "${up%.*}" -lt "$deadline" ] || fail "root device $root did not appear within ${timeout}s"
    sleep 0.02
done

opts=$mode
[ -n "$rootflags" ] && opts="$opts,$rootflags"
if [ -n "$rootfstype" ]; then
    mount -t "$rootfstype" -o "$opts" "$dev" /newroot || fail "mount $dev ($rootfstype) on /newroot"
else
    mount -o "$opts" "$dev" /newroot || fail "mount $dev on /newroot"
fi
[ -x /newroot/sbin/init ] || [ -L /newroot/sbin/init ] || fail "/sbin/init missing on $dev"

# Hand /dev over to the real root (systemd reuses a mounted devtmpfs).
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
umount /sys /proc
exec switch_root /newroot /sbin/init
fail "switch_root failed"
EOF
chmod 755 "$IR/init"

# Reproducible-ish cpio: sorted names, fixed mtimes, root ownership.
find "$IR" -exec touch -h -d @0 {} +
( cd "$IR" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet ) \
    | gzip -9n > "$WORK/initrd.img"

# ---------------------------------------------------------------------------
# 5. Install into OUT_DIR (replace previous outputs).
# ---------------------------------------------------------------------------
mkdir -p "$OUT_DIR"
rm -rf "$OUT_DIR/modules.new"
cp -a "$MODDIR" "$OUT_DIR/modules.new"
rm -rf "$OUT_DIR/modules"
mv "$OUT_DIR/modules.new" "$OUT_DIR/modules"
install -m 644 "$WORK/vmlinux" "$OUT_DIR/vmlinux"
install -m 644 "$WORK/initrd.img" "$OUT_DIR/initrd.img"
install -m 644 "$CONFIG" "$OUT_DIR/config"
printf '{"release": "%s", "package_version": "%s"}\n' "$RELEASE" "$PKG_VERSION" \
    > "$OUT_DIR/kernel.json"

log "done: $OUT_DIR (vmlinux $(du -h "$OUT_DIR/vmlinux" | cut -f1), initrd $(du -h "$OUT_DIR/initrd.img" | cut -f1))"
