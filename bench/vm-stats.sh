#!/usr/bin/env bash
# Benchmark: `banger vm stats --json` with VMS VMs recorded (RUNNING of them running), against
# `banger vm ls --json` of the same VMs (the same CLI start and daemon round trip, no figures),
# and the daemon's CPU cost while a `vm stats --watch` refreshes.
#
#   bench/vm-stats.sh [VMS=20] [RUNNING=2] [ROUNDS=20] [WATCH_SECS=20]
#
# Goals (issue "Resize and observe"): stats of 20 VMs (2 running) in <= 50 ms; --watch costs
# the daemon <= 1 % of one core. Timings are reported, never asserted.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VMS=${1:-$(pick 20 3)}
RUNNING=${2:-$(pick 2 1)}
ROUNDS=${3:-$(pick 20 3)}
WATCH_SECS=${4:-$(pick 20 4)}

ensure_image
log "creating $VMS VMs, starting $RUNNING"
for ((i = 0; i < VMS; i++)); do
    create_vm "st$i"
done
for ((i = 0; i < RUNNING; i++)); do
    banger vm start "st$i" >/dev/null
done

# Median wall time of ROUNDS runs of the command, in ms.
time_ms() {
    local samples=() t0 i
    for ((i = 0; i < ROUNDS; i++)); do
        t0=$(now)
        "$@" >/dev/null
        samples+=("$(sub "$(now)" "$t0")")
    done
    python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])) * 1000:.1f}')" "${samples[@]}"
}

stats_ms=$(time_ms banger vm stats --json)
ls_ms=$(time_ms banger vm ls --json)

# The daemon's CPU ticks over WATCH_SECS of `vm stats --watch --json`.
daemon_pid=$(banger daemon status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
ticks() { awk '{print $14 + $15}' "/proc/$daemon_pid/stat"; }
hz=$(getconf CLK_TCK)
t_before=$(ticks)
timeout "$WATCH_SECS" "$BANGER_BIN" vm stats --watch --json >/dev/null || true
t_after=$(ticks)
watch_cpu=$(python3 -c "print(f'{($t_after - $t_before) / $hz / $WATCH_SECS * 100:.2f}')")
rss=$(banger daemon status --json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("rss_bytes", 0) // 1048576)')

printf '\n%-44s %10s\n' "vm stats --json, $VMS VMs ($RUNNING running)" "${stats_ms} ms"
printf '%-44s %10s\n' "vm ls --json (baseline)" "${ls_ms} ms"
printf '%-44s %10s\n' "ratio stats/ls" "$(ratio "$stats_ms" "$ls_ms")x"
printf '%-44s %10s\n' "daemon CPU during --watch (one core)" "${watch_cpu} %"
printf '%-44s %10s\n' "daemon RSS" "${rss} MiB"
