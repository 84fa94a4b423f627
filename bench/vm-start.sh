#!/usr/bin/env bash
# Benchmark: `banger vm start` (stopped VM -> command returns, i.e. SSH answers) against the
# same QEMU command line launched by hand and polled with `ssh ... true`.
#
#   bench/vm-start.sh [ROUNDS=3]          (BENCH_QUICK=1: one round)
#
# Each round:
#   1. banger: time `banger vm start NAME` of the stopped VM.
#   2. Read the QEMU command line banger used from /proc/<pid>/cmdline, then `banger vm stop`.
#   3. baseline: relaunch that exact command line (only the hostfwd port, pidfile, QMP socket
#      and serial log path changed; the same disks, which are now closed, so both boots start
#      from the same on-disk state and the same page cache) and time it until
#      `ssh ... true` succeeds, polling every 50 ms; then power it off over SSH.
# The VM's first boot is timed too but left out of the medians.
# Prints per-round times and ratios, medians, and the median of the per-round ratios
# banger/baseline (goal <= 1.05x).
# Timings are reported, never asserted.

#
#   bench/vm-start.sh --kernels [ROUNDS=3]
#
# Cold `banger vm start` -> SSH side by side, interleaved in each round: Debian's cloud kernel
# + initrd (ACPI, `image build --kernel debian`'s) and banger's microVM kernel (the default
# image's, no initrd) with `qemu.devices = "auto"` (the discovery its capabilities choose)
# and `"cmdline"` (forced, Firecracker's way), each under single- and
# multi-threaded TCG (qemu.tcg_threads; the daemon restarts between settings). The kernel
# build is cached (BANGER_CACHE_DIR).

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ ${1:-} == --kernels ]]; then
    ROUNDS=${2:-$(pick 3 1)}
    ensure_image
    digest=$(banger image show default --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["digest"])')
    banger image import cloud --rootfs "$BANGER_HOME/images/$digest/rootfs.ext4" --kernel debian >/dev/null
    # configure THREADS DEVICES: restarts the daemon with that TCG threading and discovery.
    configure() {
        banger daemon stop >/dev/null 2>&1 || true
        printf '[qemu]\ntcg_threads = "%s"\ndevices = "%s"\n' "$1" "$2" >"$BANGER_CONFIG"
    }
    cold_start() { # NAME -> ELAPSED
        local t0
        t0=$(now)
        banger vm start "$1" >/dev/null
        ELAPSED=$(sub "$(now)" "$t0")
        banger vm stop "$1" >/dev/null
    }
    configure single auto
    banger vm create cloud --image cloud --vmm qemu >/dev/null && BENCH_VMS+=(cloud)
    banger vm create micro --vmm qemu >/dev/null && BENCH_VMS+=(micro)
    # First boots (host keys, first-boot setup) are not measured.
    for vm in cloud micro; do banger vm start "$vm" >/dev/null; banger vm stop "$vm" >/dev/null; done
    declare -A T=()
    FMT='%-7s %6s | %9s %9s %9s | %9s %9s %9s\n'
    printf "\n$FMT" round load1 cloud_1 auto_1 cmdline_1 cloud_m auto_m cmdline_m
    for ((r = 1; r <= ROUNDS; r++)); do
        load1=$(cut -d' ' -f1 /proc/loadavg)
        row=()
        for threads in single multi; do
            for case in cloud:auto micro:auto micro:cmdline; do
                vm=${case%%:*} devices=${case#*:}
                [[ $vm == cloud && $devices == cmdline ]] && continue
                configure "$threads" "$devices"
                cold_start "$vm"
                T[$vm-$devices-$threads]+="$ELAPSED "
                row+=("$ELAPSED")
            done
        done
        printf "$FMT" "$r" "$load1" "${row[@]}"
    done
    med=()
    for threads in single multi; do
        for key in cloud-auto micro-auto micro-cmdline; do
            # shellcheck disable=SC2086
            med+=("$(median ${T[$key-$threads]})")
        done
    done
    printf "$FMT" median "" "${med[@]}"
    echo
    echo "cold vm start -> SSH (_1: single-thread TCG, _m: multi): cloud = Debian cloud kernel + initrd (ACPI); auto / cmdline = banger's microVM kernel with qemu.devices auto / cmdline"
    echo "load average at the end: $(loadavg)"
    exit 0
fi

ROUNDS=${1:-$(pick 3 1)}
NAME=bstart
POLL=0.05        # seconds between ssh attempts in the baseline
BOOT_LIMIT=180   # seconds before a baseline boot counts as failed

ensure_image
create_vm "$NAME"
ID=$(vm_id "$NAME")
BASE_DIR=$BENCH_HOME/baseline
mkdir -p "$BASE_DIR"

# Times `banger vm start`; leaves the VM running. Sets ELAPSED, and LAUNCHED: when the
# daemon logged "VMM launched" (QEMU daemonized), relative to the start of the command.
banger_start() {
    local t0 t1 line
    t0=$(now)
    banger vm start "$NAME" >/dev/null
    t1=$(now)
    ELAPSED=$(sub "$t1" "$t0")
    line=$(grep 'VMM launched' "$BANGER_HOME/logs/bangerd.log" | tail -n 1)
    LAUNCHED=$(python3 -c '
import datetime, sys
ts = sys.argv[1].split()[0].rstrip("Z")[:26]
t = datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()
print(f"{t - float(sys.argv[2]):.3f}")' "$line" "$t0" 2>/dev/null || echo "?")
}

# The running VM's QEMU argv (NUL-separated in /proc) into QEMU_ARGV.
capture_cmdline() {
    local pid
    pid=$(vm_field "$NAME" runtime.pid)
    readarray -d '' QEMU_ARGV <"/proc/$pid/cmdline"
}

# Rewrites QEMU_ARGV for an independent launch on PORT into BASE_ARGV. Every path in the VM's
# runtime dir (the pid file's dir: sockets such as the workspace channel's) moves to BASE_DIR:
# `banger vm stop` deleted that dir.
baseline_argv() {
    local port=$1 i arg prev="" runtime=""
    BASE_ARGV=()
    for ((i = 1; i < ${#QEMU_ARGV[@]}; i++)); do
        [[ ${QEMU_ARGV[i - 1]} == -pidfile ]] && runtime=$(dirname "${QEMU_ARGV[i]}")
    done
    for ((i = 0; i < ${#QEMU_ARGV[@]}; i++)); do
        arg=${QEMU_ARGV[i]}
        [[ -n $runtime ]] && arg=${arg//"$runtime/"/"$BASE_DIR/"}
        case "$prev" in
            -pidfile) arg=$BASE_DIR/qemu.pid ;;
            -qmp) arg="unix:$BASE_DIR/qmp.sock,server=on,wait=off" ;;
            -serial) arg="file:$BASE_DIR/console.log" ;;
            -netdev) arg=$(sed -E "s/hostfwd=tcp:127\.0\.0\.1:[0-9]+-:22/hostfwd=tcp:127.0.0.1:$port-:22/" <<<"$arg") ;;
        esac
        BASE_ARGV+=("$arg")
        prev=$arg
    done
}

# Launches BASE_ARGV and polls ssh until `true` runs; sets ELAPSED (seconds), BASE_PID, BASE_PORT.
baseline_start() {
    local t0 t1 deadline
    BASE_PORT=$(free_port)
    baseline_argv "$BASE_PORT"
    rm -f "$BASE_DIR"/*.pid "$BASE_DIR"/*.sock
    ssh_opts "$NAME" "$BASE_PORT" 1
    [[ ${BENCH_VERBOSE:-0} == 1 ]] && log "baseline: ${BASE_ARGV[*]}"
    t0=$(now)
    "${BASE_ARGV[@]}" </dev/null >/dev/null
    LAUNCHED=$(sub "$(now)" "$t0")
    BASE_PID=$(<"$BASE_DIR/qemu.pid")
    BENCH_QEMU_PIDS+=("$BASE_PID")
    deadline=$(( ${t0%.*} + BOOT_LIMIT ))
    until ssh "${SSH_OPTS[@]}" true </dev/null >/dev/null 2>&1; do
        if ! alive "$BASE_PID" || (( ${EPOCHREALTIME%.*} > deadline )); then
            log "baseline boot failed; console tail:"; tail -n 5 "$BASE_DIR/console.log" >&2
            return 1
        fi
        sleep "$POLL"
    done
    t1=$(now)
    ELAPSED=$(sub "$t1" "$t0")
    # For reading the ratio: one more SSH round trip on a fresh connection, the price of any
    # SSH call banger makes after readiness (it copies the host's git identity with one).
    t0=$(now)
    ssh "${SSH_OPTS[@]}" true </dev/null >/dev/null 2>&1 || true
    RTT=$(sub "$(now)" "$t0")
}

# Powers the baseline VM off cleanly (so the next boot finds clean filesystems).
baseline_stop() {
    ssh_opts "$NAME" "$BASE_PORT" 10
    ssh_poweroff "$BASE_PID"
    wait_gone_or_kill "$BASE_PID" 120 || true
}

FIRST="- (quick mode: round 1 is the first boot)"
if [[ $BENCH_QUICK != 1 ]]; then
    log "first boot of $NAME (excluded from the medians)"
    banger_start
    FIRST=$ELAPSED
    log "first start: $FIRST s"
    banger vm stop "$NAME" >/dev/null
fi

# *_launch: when QEMU had daemonized (banger: the daemon's "VMM launched" log line; baseline:
# the qemu command returned), relative to the start of the measurement.
# load1: the host's 1-minute load average when the round began.
B=() Q=() BL=() QL=() RT=() RR=()
FMT='%-7s %6s | %10s %14s | %10s %14s | %7s\n'
printf "\n$FMT" round load1 banger_s banger_launch baseline_s baseline_launch ratio
for ((r = 1; r <= ROUNDS; r++)); do
    load1=$(cut -d' ' -f1 /proc/loadavg)
    banger_start
    b=$ELAPSED bl=$LAUNCHED
    capture_cmdline
    banger vm stop "$NAME" >/dev/null
    baseline_start
    q=$ELAPSED ql=$LAUNCHED
    RT+=("$RTT") RR+=("$(ratio "$b" "$q")")
    baseline_stop
    B+=("$b") Q+=("$q") BL+=("$bl") QL+=("$ql")
    printf "$FMT" "$r" "$load1" "$b" "$bl" "$q" "$ql" "${RR[-1]}x"
done

MB=$(median "${B[@]}") MQ=$(median "${Q[@]}")
MBL=$(median "${BL[@]}" 2>/dev/null || echo "?") MQL=$(median "${QL[@]}")
MR=$(median "${RR[@]}")
printf "$FMT" median "" "$MB" "$MBL" "$MQ" "$MQL" "${MR}x"
echo
echo "first start (not in medians): $FIRST s"
echo "one extra ssh round trip (fresh connection) after boot: median $(median "${RT[@]}") s"
echo "vm start: banger median $MB s, baseline median $MQ s"
echo "  ratio banger/baseline: median of per-round ratios ${MR}x, of medians $(ratio "$MB" "$MQ")x (goal <= 1.05x)"
echo "load average at the end: $(loadavg)"
echo "baseline = banger's own QEMU command line (VM $ID), launched directly, ssh polled every ${POLL}s"
