#!/usr/bin/env bash
# Benchmark: a clone's first start against a new VM's first start, and `vm snapshot create`
# of a stopped VM by disk size.
#
#   bench/vm-clone.sh [ROUNDS=3] [BIG=8G] [SMALL=1G]     (BENCH_QUICK=1: 1 round, 2G / 1G)
#
# Goals (issue 17, medians): `vm clone SRC NEW --snapshot S` + `vm start NEW` -> `vm exec NEW
# true` <= 1.05x `vm create NEW` + `vm start NEW` -> `vm exec NEW true`; `vm snapshot create`
# of a stopped VM with BIG disks <= 0.5 s and flat in disk size (against SMALL disks).
# 1. clone vs create. A source VM (default sizes) boots once (not in quick mode), stops, and
#    gets snapshot `base`.
#    Each round, in alternating order: clone: time `vm clone` + `vm start` + `vm exec true`;
#    create: time `vm create` + `vm start` + `vm exec true` (the same default image and
#    sizes); each VM is stopped and removed afterwards (untimed). Per-round ratio
#    clone / create; the headline is the median of those ratios.
# 2. snapshot create. Two VMs, one with BIG system and work disks, one with SMALL ones, boot
#    once (not in quick mode: there they are never started) and stop. Each round, time
#    `vm snapshot create` of each (a new snapshot each round, so later rounds snapshot a VM
#    that already has some).
# Timings are reported, never asserted.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS=${1:-$(pick 3 1)}
BIG=${2:-$(pick 8G 2G)}
SMALL=${3:-$(pick 1G 1G)}
SRC=bsrc

ensure_image

# --- 1. clone + first start vs create + first start ----------------------------------------
create_vm "$SRC"
if [[ $BENCH_QUICK != 1 ]]; then # quick mode: the source is never started (cheaper)
    log "first boot of $SRC"
    banger vm start "$SRC" >/dev/null
    settle "$SRC"
    banger vm stop "$SRC" >/dev/null
fi
banger vm snapshot create "$SRC" base >/dev/null

# One VM's life: KIND (clone|create) NAME. Times the make (clone or create), the first start
# and the first `vm exec true`; sets MAKE START EXEC TOTAL (seconds). Then stops and removes
# the VM, untimed.
first_start() {
    local kind=$1 name=$2 t0 t1 t2 t3
    t0=$(now)
    if [[ $kind == clone ]]; then
        banger vm clone "$SRC" "$name" --snapshot base >/dev/null
    else
        banger vm create "$name" >/dev/null
    fi
    BENCH_VMS=("$name" "${BENCH_VMS[@]}") # before SRC: SRC cannot go while a clone exists
    t1=$(now)
    banger vm start "$name" >/dev/null
    t2=$(now)
    banger vm exec "$name" -- true
    t3=$(now)
    MAKE=$(sub "$t1" "$t0") START=$(sub "$t2" "$t1") EXEC=$(sub "$t3" "$t2") TOTAL=$(sub "$t3" "$t0")
    if [[ $kind == clone ]]; then
        # Untimed check on a fresh connection (no shared one): the guest serves the host key
        # the daemon pinned for the clone, which is not the source's.
        ssh_opts "$name" "$(vm_field "$name" runtime.ssh_port)"
        ssh "${SSH_OPTS[@]}" true </dev/null || { log "$name: ssh with its pinned host key failed"; exit 1; }
        key() { awk '{print $2, $3}' "$BENCH_HOME/vms/$(vm_id "$1")/known_hosts"; }
        if [[ $(key "$name") == "$(key "$SRC")" ]]; then
            log "$name: pinned the source's host key"
            exit 1
        fi
    fi
    banger vm stop "$name" >/dev/null
    banger vm rm "$name" >/dev/null
    BENCH_VMS=("${BENCH_VMS[@]:1}")
}

CLONE=() CREATE=() RATIOS=() CMAKE=() CSTART=() NMAKE=() NSTART=()
FMT='%-7s %6s | %8s %8s %8s %8s | %8s %8s %8s %8s | %6s\n'
printf "\n$FMT" round load1 clone_mk start exec total create_mk start exec total ratio
for ((r = 1; r <= ROUNDS; r++)); do
    load=$(cut -d' ' -f1 /proc/loadavg)
    # Alternate which goes first so that load drift within a round cancels over rounds.
    if ((r % 2)); then order=(clone create); else order=(create clone); fi
    for kind in "${order[@]}"; do
        first_start "$kind" "b$kind$r"
        if [[ $kind == clone ]]; then
            c=("$MAKE" "$START" "$EXEC" "$TOTAL")
        else
            n=("$MAKE" "$START" "$EXEC" "$TOTAL")
        fi
    done
    CLONE+=("${c[3]}") CREATE+=("${n[3]}") CMAKE+=("${c[0]}") CSTART+=("${c[1]}")
    NMAKE+=("${n[0]}") NSTART+=("${n[1]}")
    RATIOS+=("$(ratio "${c[3]}" "${n[3]}")")
    printf "$FMT" "$r" "$load" "${c[@]}" "${n[@]}" "${RATIOS[-1]}"
done
MC=$(median "${CLONE[@]}") MN=$(median "${CREATE[@]}")
printf "$FMT" median "" "$(median "${CMAKE[@]}")" "$(median "${CSTART[@]}")" "" "$MC" \
    "$(median "${NMAKE[@]}")" "$(median "${NSTART[@]}")" "" "$MN" "$(median "${RATIOS[@]}")"

# --- 2. snapshot create by disk size ---------------------------------------------------------
# The system disk's size comes from the config (at least the image's); the daemon restarts
# to read it.
banger daemon stop >/dev/null
printf '[defaults]\nsystem_disk_size = "%s"\n' "$SMALL" >"$BANGER_CONFIG"
banger vm create bsmall --disk "$SMALL" >/dev/null && BENCH_VMS+=(bsmall)
banger vm create bbig --disk "$BIG" >/dev/null && BENCH_VMS+=(bbig)
banger vm set bbig --system-disk "$BIG" >/dev/null
log "disks (virtual bytes): $(for vm in bbig bsmall; do printf '%s ' "$vm" \
    "$(vm_field "$vm" spec.system_disk_size_bytes)" "$(vm_field "$vm" spec.disk_size_bytes)"; done)"
if [[ $BENCH_QUICK != 1 ]]; then
    for vm in bbig bsmall; do
        log "first boot of $vm"
        banger vm start "$vm" >/dev/null
        settle "$vm"
        banger vm stop "$vm" >/dev/null
    done
fi
SBIG=() SSMALL=()
FMT2='%-7s %6s | %10s %10s\n'
printf "\n$FMT2" round load1 "snap_$BIG" "snap_$SMALL"
for ((r = 1; r <= ROUNDS; r++)); do
    load=$(cut -d' ' -f1 /proc/loadavg)
    for vm in bbig bsmall; do
        t0=$(now)
        banger vm snapshot create "$vm" "s$r" >/dev/null
        took=$(sub "$(now)" "$t0")
        if [[ $vm == bbig ]]; then SBIG+=("$took"); else SSMALL+=("$took"); fi
    done
    printf "$FMT2" "$r" "$load" "${SBIG[-1]}" "${SSMALL[-1]}"
done
MB=$(median "${SBIG[@]}") MS=$(median "${SSMALL[@]}")
printf "$FMT2" median "" "$MB" "$MS"

echo
echo "clone + first start -> vm exec true: $MC s; create + first start: $MN s"
echo "clone / create, median of per-round ratios: $(median "${RATIOS[@]}")x (goal <= 1.05x); ratio of the medians: $(ratio "$MC" "$MN")x"
echo "vm snapshot create, stopped VM: $BIG disks $MB s (goal <= 0.5 s), $SMALL disks $MS s; $BIG / $SMALL: $(ratio "$MB" "$MS")x (goal: flat)"
echo "load average at the end: $(loadavg)"
