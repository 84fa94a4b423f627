#!/usr/bin/env bash
# Benchmark: `banger vm start` (stopped VM -> command returns, i.e. SSH answers) against the
# same QEMU command line launched by hand and polled with `ssh ... true`.
#
#   bench/vm-start.sh [ROUNDS=3]
#
# Each round:
#   1. banger: time `banger vm start NAME` of the stopped VM.
#   2. Read the QEMU command line banger used from /proc/<pid>/cmdline, then `banger vm stop`.
#   3. baseline: relaunch that exact command line (only the hostfwd port, pidfile, QMP socket
#      and serial log path changed; the same disks, which are now closed, so both boots start
#      from the same on-disk state and the same page cache) and time it until
#      `ssh ... true` succeeds, polling every 50 ms; then power it off over SSH.
# The VM's first boot is timed too but left out of the medians.
# Prints per-round times, medians and the ratio banger/baseline (goal <= 1.05x).
# Timings are reported, never asserted.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS=${1:-3}
NAME=bstart
POLL=0.05        # seconds between ssh attempts in the baseline
BOOT_LIMIT=180   # seconds before a baseline boot counts as failed

ensure_image
create_vm "$NAME"
ID=$(vm_id "$NAME")
BASE_DIR=$BENCH_HOME/baseline
mkdir -p "$BASE_DIR"

# Times `banger vm start`; leaves the VM running. Prints seconds.
banger_start() {
    local t0 t1
    t0=$(now)
    banger vm start "$NAME" >/dev/null
    t1=$(now)
    sub "$t1" "$t0"
}

# The running VM's QEMU argv (NUL-separated in /proc) into QEMU_ARGV.
capture_cmdline() {
    local pid
    pid=$(vm_field "$NAME" runtime.pid)
    readarray -d '' QEMU_ARGV <"/proc/$pid/cmdline"
}

# Rewrites QEMU_ARGV for an independent launch on PORT into BASE_ARGV.
baseline_argv() {
    local port=$1 i arg prev=""
    BASE_ARGV=()
    for ((i = 0; i < ${#QEMU_ARGV[@]}; i++)); do
        arg=${QEMU_ARGV[i]}
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
    rm -f "$BASE_DIR/qemu.pid" "$BASE_DIR/qmp.sock"
    ssh_opts "$NAME" "$BASE_PORT"
    t0=$(now)
    "${BASE_ARGV[@]}" </dev/null >/dev/null
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
}

# Powers the baseline VM off cleanly (so the next boot finds clean filesystems).
baseline_stop() {
    ssh "${SSH_OPTS[@]}" 'sync; systemctl poweroff' </dev/null >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 6000; i++)); do
        alive "$BASE_PID" || return 0
        sleep 0.01
    done
    log "baseline QEMU $BASE_PID did not power off within 60 s; killing it"
    kill -9 "$BASE_PID" 2>/dev/null || true
}

log "first boot of $NAME (excluded from the medians)"
FIRST=$(banger_start)
log "first start: $FIRST s"
banger vm stop "$NAME" >/dev/null

B=() Q=()
printf '\n%-7s %12s %12s %8s\n' round banger_s baseline_s ratio
for ((r = 1; r <= ROUNDS; r++)); do
    b=$(banger_start)
    capture_cmdline
    banger vm stop "$NAME" >/dev/null
    baseline_start
    q=$ELAPSED
    baseline_stop
    B+=("$b") Q+=("$q")
    printf '%-7s %12s %12s %7sx\n' "$r" "$b" "$q" "$(ratio "$b" "$q")"
done

MB=$(median "${B[@]}") MQ=$(median "${Q[@]}")
printf '%-7s %12s %12s %7sx\n' median "$MB" "$MQ" "$(ratio "$MB" "$MQ")"
echo
echo "first start (not in medians): $FIRST s"
echo "vm start: banger median $MB s, baseline median $MQ s, ratio $(ratio "$MB" "$MQ")x (goal <= 1.05x)"
echo "baseline = banger's own QEMU command line (VM $ID), launched directly, ssh polled every ${POLL}s"
