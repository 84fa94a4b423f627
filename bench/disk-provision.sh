#!/usr/bin/env bash
# System-disk provisioning time vs image size, for banger's three file-based strategies:
#   qcow2    qemu-img create -f qcow2 -b IMAGE (what banger does for QEMU VMs)
#   reflink  FICLONE clone (cp --reflink=always issues the same ioctl as banger's disk::reflink)
#   copy     full sparse copy (cp --sparse=always, banger's last resort)
# Images are filled with non-zero data (a sparse image would flatter the copy). Everything
# runs on a loop-mounted xfs (reflink=1) made here, so the three share one file system.
# Needs root, mkfs.xfs (xfsprogs), qemu-img. Prints a table and the copy/X ratios.
#
#   bench/disk-provision.sh [SIZES...]      default: 256M 1G 4G (BENCH_QUICK=1: 64M)
set -euo pipefail

sizes=("$@")
if [[ ${#sizes[@]} -eq 0 ]]; then
    # BENCH_QUICK=1 (bench/smoke): one small size.
    if [[ ${BENCH_QUICK:-0} == 1 ]]; then sizes=(64M); else sizes=(256M 1G 4G); fi
fi
[[ $EUID -eq 0 ]] || { echo "disk-provision: run as root (loop mount)" >&2; exit 1; }
for tool in mkfs.xfs qemu-img losetup python3; do
    command -v "$tool" >/dev/null || { echo "disk-provision: $tool is missing (scripts/install-deps)" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/banger-bench-disk.XXXXXX)
mnt=$work/mnt
dev=""
cleanup() {
    mountpoint -q "$mnt" && umount "$mnt"
    [[ -n $dev ]] && losetup --detach "$dev"
    rm -rf "$work"
}
trap cleanup EXIT

bytes() { numfmt --from=iec "$1"; }
total=0
for s in "${sizes[@]}"; do total=$((total + $(bytes "$s"))); done
# Room for each image, its copy, and metadata.
truncate -s $((total * 2 + (1 << 30))) "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
dev=$(losetup --find --show "$work/xfs.img")
mkdir -p "$mnt"
mount "$dev" "$mnt"

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.4f}')" "$1" "$2"; }

printf '%-6s %10s %10s %10s %12s %12s\n' size qcow2_s reflink_s copy_s copy/qcow2 copy/reflink
for s in "${sizes[@]}"; do
    img=$mnt/image-$s.ext4
    python3 - "$img" "$(bytes "$s")" <<'PY'
import sys
path, size = sys.argv[1], int(sys.argv[2])
chunk = bytes((i * 7 + 1) % 251 + 1 for i in range(1 << 20))
with open(path, "wb") as f:
    for _ in range(size >> 20):
        f.write(chunk)
PY
    sync
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true

    t0=$(now); qemu-img create -q -f qcow2 -F raw -b "$img" "$mnt/vm-$s.qcow2"; t1=$(now)
    q=$(elapsed "$t0" "$t1")
    t0=$(now); cp --reflink=always "$img" "$mnt/vm-$s.reflink"; t1=$(now)
    r=$(elapsed "$t0" "$t1")
    t0=$(now); cp --reflink=never --sparse=always "$img" "$mnt/vm-$s.copy"; sync "$mnt/vm-$s.copy"; t1=$(now)
    c=$(elapsed "$t0" "$t1")
    python3 - "$s" "$q" "$r" "$c" <<'PY'
import sys
s, q, r, c = sys.argv[1], *map(float, sys.argv[2:])
print(f"{s:<6} {q:10.4f} {r:10.4f} {c:10.4f} {c / max(q, 1e-6):11.0f}x {c / max(r, 1e-6):11.0f}x")
PY
    rm -f "$img" "$mnt/vm-$s".*
done
