#!/usr/bin/env bash
# build.sh OUT_DIR
#
# Builds banger's microVM kernel from Debian's linux-source-6.1 package (the tarball in
# /usr/src, or $BANGER_KERNEL_SOURCE) with microvm.config applied to `make allnoconfig`.
# Needs no root: only make, a C compiler, flex, bison, bc and libelf's headers (objtool).
#
#   OUT_DIR/vmlinux      ELF kernel with a PVH entry (QEMU -kernel, Firecracker)
#   OUT_DIR/config       its final .config (banger reads its capabilities from it)
#   OUT_DIR/kernel.json  {"release": "<uname -r>", "source": "<tarball name>"}
#
# Progress goes to stdout as lines "progress PERCENT WHAT"; everything else to stderr.
# Everything is built in a temp dir and moved into OUT_DIR at the end.
set -euo pipefail

die() { echo "build-kernel: error: $*" >&2; exit 1; }
log() { echo "build-kernel: $*" >&2; }
progress() { echo "progress $1 $2"; }

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
OUT_DIR=$1
HERE=$(cd "$(dirname "$0")" && pwd)
FRAGMENT=$HERE/microvm.config
SOURCE=${BANGER_KERNEL_SOURCE:-/usr/src/linux-source-6.1.tar.xz}

[ -f "$SOURCE" ] || die "$SOURCE is missing: install Debian's linux-source-6.1 package (scripts/install-deps)"
for t in make gcc ld flex bison bc tar xz perl; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found (scripts/install-deps)"
done
[ -f /usr/include/libelf.h ] || die "libelf headers are missing (package libelf-dev; scripts/install-deps)"

# Roughly how many build steps `make vmlinux` prints for this config (for the percentage).
EXPECTED_STEPS=1900
JOBS=${BANGER_KERNEL_JOBS:-$(nproc)}

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/banger-kernel-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

progress 1 "unpacking $(basename "$SOURCE")"
tar -xf "$SOURCE" -C "$WORK"
SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d | head -n 1)
[ -f "$SRC/Makefile" ] || die "$SOURCE holds no kernel source tree"

# Reproducible: no build host, user or time in the image.
export KBUILD_BUILD_TIMESTAMP=@0 KBUILD_BUILD_USER=banger KBUILD_BUILD_HOST=banger
MAKE=(make -C "$SRC" ARCH=x86_64 LOCALVERSION=-banger)

progress 5 "configuring (allnoconfig + microvm.config)"
"${MAKE[@]}" -s KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >&2
# Kconfig drops a symbol whose dependencies are unmet without a word: check each one.
missing=""
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) grep -qxF "$line" "$SRC/.config" || missing="$missing $line" ;; esac
done < "$FRAGMENT"
[ -z "$missing" ] || die "microvm.config lines not in the final .config (unmet dependencies?):$missing"

progress 6 "compiling with $JOBS jobs"
steps=0
set +o pipefail
"${MAKE[@]}" -j"$JOBS" vmlinux 2>&1 | while IFS= read -r line; do
    echo "$line" >&2
    case "$line" in
        "  "[A-Z]*)
            steps=$((steps + 1))
            if [ $((steps % 20)) -eq 0 ]; then
                pct=$((6 + steps * 92 / EXPECTED_STEPS))
                [ "$pct" -le 98 ] || pct=98
                progress "$pct" "compiling ($steps steps)"
            fi
            ;;
    esac
done
status=${PIPESTATUS[0]}
set -o pipefail
[ "$status" -eq 0 ] || die "make vmlinux failed (exit $status)"

RELEASE=$("${MAKE[@]}" -s kernelrelease)
mkdir -p "$OUT_DIR"
install -m 644 "$SRC/vmlinux" "$OUT_DIR/vmlinux.new"
install -m 644 "$SRC/.config" "$OUT_DIR/config"
printf '{"release": "%s", "source": "%s"}\n' "$RELEASE" "$(basename "$SOURCE")" > "$OUT_DIR/kernel.json"
mv -f "$OUT_DIR/vmlinux.new" "$OUT_DIR/vmlinux"
progress 100 "built $RELEASE"
log "done: $OUT_DIR/vmlinux ($(du -h "$OUT_DIR/vmlinux" | cut -f1), release $RELEASE)"
