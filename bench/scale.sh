#!/usr/bin/env bash
# Benchmark: one daemon with many VMs.
#
#   bench/scale.sh [RECORDS=100] [RUNNING=10] [STORM=20]
#
# Creates RECORDS VMs (256 MiB, 1 vCPU, 1 GiB work disk) STORM at a time while a probe runs
# `banger vm ls --json` back to back, then starts RUNNING of them 5 at a time, and reports:
#   - p50/p99/max `vm ls` latency during the create storm (goal: p99 <= 100 ms);
#   - the daemon's RSS with RECORDS records and RUNNING VMs running (goal: <= 30 MiB).
# Timings are reported, never asserted (crates/banger-e2e/tests/scale.rs holds the behaviour).

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RECORDS=${1:-$(pick 100 6)}
RUNNING=${2:-$(pick 10 1)}
STORM=${3:-$(pick 20 3)}

ensure_image
NAMES=()
for ((i = 0; i < RECORDS; i++)); do
    NAMES+=("sc$i")
done
BENCH_VMS+=("${NAMES[@]}")

# vm ls latencies (seconds, one per line) into FILE until the flag file is gone.
probe() {
    local file=$1 flag=$2 t0
    while [[ -e $flag ]]; do
        t0=$(now)
        banger vm ls --json >/dev/null
        sub "$(now)" "$t0" >>"$file"
    done
}

percentiles() { # FILE: p50 p99 max in ms
    python3 - "$1" <<'PY'
import sys
xs = sorted(float(l) for l in open(sys.argv[1]) if l.strip())
pick = lambda p: xs[round((len(xs) - 1) * p)] * 1000
print(f"{len(xs)} answers: p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {xs[-1] * 1000:.1f} ms")
PY
}

LAT=$BENCH_HOME/ls-latency
FLAG=$BENCH_HOME/storming
: >"$LAT"
touch "$FLAG"
probe "$LAT" "$FLAG" &
PROBE=$!
log "creating $RECORDS VMs, $STORM at a time"
t0=$(now)
printf '%s\n' "${NAMES[@]}" |
    xargs -P "$STORM" -I{} "$BANGER_BIN" vm create {} --memory 256M --cpus 1 --disk 1G >/dev/null
created=$(sub "$(now)" "$t0")
rm -f "$FLAG"
wait "$PROBE"
storm_line=$(percentiles "$LAT")

log "starting $RUNNING of them, 5 at a time"
printf '%s\n' "${NAMES[@]:0:RUNNING}" | xargs -P 5 -I{} "$BANGER_BIN" vm start {} >/dev/null
daemon=$(pgrep -f "^$(dirname "$BANGER_BIN")/bangerd" | while read -r pid; do
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "BANGER_HOME=$BENCH_HOME" && echo "$pid"
done | head -n 1)
rss_kib=$(awk '/^VmRSS:/{print $2}' "/proc/$daemon/status")

echo "scale: $RECORDS creates ($STORM at a time) in $created s"
echo "scale: vm ls during the create storm: $storm_line (goal p99 <= 100 ms)"
echo "scale: daemon RSS with $RECORDS records, $RUNNING running: $((rss_kib / 1024)) MiB (goal <= 30 MiB)"
