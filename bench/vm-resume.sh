#!/usr/bin/env bash
# Benchmark: `banger vm start` of a suspended QEMU VM until `banger vm exec NAME true`
# succeeds, against a cold `banger vm start` of the same VM until `vm exec true` succeeds;
# also how long `vm suspend` of the idle VM takes and how big its state file is against the
# guest's used memory.
#
#   bench/vm-resume.sh [ROUNDS=3]
#
# Goals (issue 17, medians): resume / cold <= 0.15x under TCG (on KVM: resume <= 200 ms);
# `vm suspend` of an idle 1 GiB VM <= 1 s; state file <= 1.5x the guest's used memory.
# Each round, for one 1 GiB VM:
#   1. cold: `vm stop` (untimed), then time `vm start` + `vm exec true`.
#   2. settle (`systemctl is-system-running --wait`), read the guest's used memory
#      (/proc/meminfo: MemTotal - MemAvailable), time `vm suspend`, read the state file's size.
#   3. resume: time `vm start` (which must report `restored`) + `vm exec true`.
# Timings are reported, never asserted.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ROUNDS=${1:-3}
NAME=bresume

ensure_image
banger vm create "$NAME" --memory 1G >/dev/null
BENCH_VMS+=("$NAME")
if [[ $BENCH_QUICK != 1 ]]; then # quick mode: round 1's cold start is the first boot
    log "first boot of $NAME"
    banger vm start "$NAME" >/dev/null
fi
STATE=$BENCH_HOME/vms/$(vm_id "$NAME")/snapshot.state

# Times `vm start` + `vm exec true`; sets TOOK (seconds) and RESTORED (true/false).
start_exec() {
    local t0 out
    t0=$(now)
    out=$(banger vm start "$NAME" --json)
    banger vm exec "$NAME" -- true
    TOOK=$(sub "$(now)" "$t0")
    RESTORED=$(python3 -c 'import json,sys; print(str(json.load(sys.stdin).get("restored", False)).lower())' <<<"$out")
}

COLD=() RES=() RATIOS=() SUS=() SIZES=() USED=()
printf '\n%-7s %6s %9s | %10s %9s %9s %6s | %9s %8s\n' round load1 cold_s suspend_s state_mb used_mb x_used resume_s ratio
for ((r = 1; r <= ROUNDS; r++)); do
    load=$(cut -d' ' -f1 /proc/loadavg)
    [[ $(vm_field "$NAME" state) == created ]] || banger vm stop "$NAME" >/dev/null
    start_exec
    cold=$TOOK
    [[ $RESTORED == false ]] || log "round $r: the cold start restored?"

    settle "$NAME"
    used=$(banger vm exec "$NAME" -- sh -c \
        "awk '/^MemTotal:/{t=\$2} /^MemAvailable:/{a=\$2} END{print (t-a)*1024}' /proc/meminfo")
    t0=$(now)
    banger vm suspend "$NAME" >/dev/null
    suspend_s=$(sub "$(now)" "$t0")
    size=$(stat -c %s "$STATE")

    start_exec
    resume=$TOOK
    [[ $RESTORED == true ]] || log "round $r: the start of the suspended VM booted cold (see the daemon log)"

    COLD+=("$cold") RES+=("$resume") SUS+=("$suspend_s") SIZES+=("$size") USED+=("$used")
    RATIOS+=("$(ratio "$resume" "$cold")")
    printf '%-7s %6s %9s | %10s %9s %9s %6s | %9s %8s\n' "$r" "$load" "$cold" "$suspend_s" \
        "$((size / 1000000))" "$((used / 1000000))" "$(ratio "$size" "$used")" "$resume" "${RATIOS[-1]}"
done

MC=$(median "${COLD[@]}") MR=$(median "${RES[@]}") MS=$(median "${SUS[@]}")
MZ=$(median "${SIZES[@]}") MU=$(median "${USED[@]}")
printf '%-7s %6s %9s | %10s %9s %9s %6s | %9s %8s\n' median "" "$MC" "$MS" \
    "$(python3 -c "print(int($MZ / 1e6))")" "$(python3 -c "print(int($MU / 1e6))")" "$(ratio "$MZ" "$MU")" "$MR" "$(median "${RATIOS[@]}")"
echo
echo "resume / cold start (to vm exec true), median of per-round ratios: $(median "${RATIOS[@]}")x (goal <= 0.15x under TCG)"
echo "ratio of the medians: $(ratio "$MR" "$MC")x; vm suspend: $MS s (goal <= 1 s); state file / used memory: $(ratio "$MZ" "$MU")x (goal <= 1.5x)"
