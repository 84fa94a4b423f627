# Shared setup for the banger benchmarks; sourced by bench/*.sh, not run directly.
#
# Gives each run an isolated banger instance (BANGER_HOME under /tmp, its own daemon and
# config), makes sure the default image exists (built or imported from BANGER_CACHE_DIR),
# and installs an EXIT trap that stops this instance's VMs and daemon, kills any QEMU the
# benchmark started itself, and removes the temporary home.
#
# Environment:
#   BANGER_BIN        the CLI (default target/release/banger, relative to the repo root);
#                     bangerd is found next to it
#   BANGER_CACHE_DIR  image build cache (default /var/tmp/banger-test-cache, as the e2e tests)
#   BENCH_KEEP=1      keep the temporary BANGER_HOME (logs, console output) after the run
#   BENCH_QUICK=1     quick mode: one round, small sizes (what bench/smoke runs; the numbers
#                     mean little, a script that fails means a rotten benchmark)

set -euo pipefail

BENCH_QUICK=${BENCH_QUICK:-0}
# pick NORMAL QUICK: the default for a parameter, by BENCH_QUICK.
pick() { if [[ $BENCH_QUICK == 1 ]]; then printf '%s' "$2"; else printf '%s' "$1"; fi; }

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")

BANGER_BIN=${BANGER_BIN:-target/release/banger}
case "$BANGER_BIN" in
    /*) ;;
    */*) BANGER_BIN="$REPO_DIR/$BANGER_BIN" ;;
    *) BANGER_BIN=$(command -v "$BANGER_BIN") ;;
esac
if [[ ! -x "$BANGER_BIN" ]]; then
    echo "bench: $BANGER_BIN is missing; build it with: cargo build --release --workspace --bins" >&2
    exit 1
fi
if [[ $EUID -ne 0 ]]; then
    echo "bench: run as root (image build needs it)" >&2
    exit 1
fi
for tool in ssh python3 qemu-system-x86_64; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is not installed" >&2; exit 1; }
done

BENCH_HOME=$(mktemp -d /tmp/banger-bench.XXXXXX)
export BANGER_HOME=$BENCH_HOME
export BANGER_CONFIG=$BENCH_HOME/config.toml # absent: all defaults, whatever ~/.config says
unset BANGER_RUNTIME_DIR BANGER_NO_AUTOSTART
export BANGER_CACHE_DIR=${BANGER_CACHE_DIR:-/var/tmp/banger-test-cache}

BENCH_VMS=()       # VMs created by this run (removed by the trap)
BENCH_QEMU_PIDS=() # QEMU processes this script launched itself (baselines)

banger() { "$BANGER_BIN" "$@"; }

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Current time in seconds with microseconds (bash builtin, no fork).
now() { printf '%s' "$EPOCHREALTIME"; }

# a - b, printed with 3 decimals.
sub() { python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.3f}')" "$1" "$2"; }

# Median of the arguments (3 decimals).
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }

# a / b with 2 decimals.
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }

# Whether pid is a live, non-zombie process (a daemonized QEMU is reaped by init, not by us).
alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# Background watcher: polls pid every 10 ms and writes the time it was first seen gone to
# FILE. Sets WATCHER to the watcher's pid (call it directly, not in $(...)).
watch_exit() {
    local pid=$1 file=$2
    (
        while alive "$pid"; do sleep 0.01; done
        printf '%s\n' "$EPOCHREALTIME" >"$file"
    ) </dev/null >/dev/null 2>&1 &
    WATCHER=$!
}

# `vm show --json` field by dotted path, e.g. runtime.pid.
vm_field() {
    banger vm show "$1" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = (v or {}).get(k)
print("" if v is None else v)' "$2"
}

vm_id() { vm_field "$1" id; }

# ssh options for VM NAME (banger's key and the VM's pinned host key) on PORT, into SSH_OPTS.
# The optional third argument, ConnectTimeout in seconds (default 10), bounds the TCP connect
# and the wait for the server's banner. QEMU's user-mode forwarding accepts a connection
# before the guest listens, so a readiness probe made too early hangs until this timeout:
# probes use 1 (banger's own probe waits 1 s for the banner); commands keep the default, as
# a guest on a loaded TCG host can take over a second to greet.
ssh_opts() {
    local name=$1 port=$2 connect=${3:-10} id
    id=$(vm_id "$name")
    SSH_OPTS=(-F /dev/null -i "$BANGER_HOME/keys/id_ed25519" -o IdentitiesOnly=yes
        -o BatchMode=yes -o "UserKnownHostsFile=$BANGER_HOME/vms/$id/known_hosts"
        -o StrictHostKeyChecking=yes -o "HostKeyAlias=$name.vm" -o LogLevel=ERROR
        -o "ConnectTimeout=$connect" -p "$port" root@127.0.0.1)
}

# Powers the guest off over SSH the plain way: `sync; systemctl poweroff`. Retried only when
# the connection was never made (timeout/refused on a loaded host); ssh's 255 from the
# connection closing during the power-off is success. Needs SSH_OPTS; $1 is the QEMU pid.
ssh_poweroff() {
    local i err
    for i in 1 2 3; do
        err=$(timeout 60 ssh "${SSH_OPTS[@]}" 'sync; systemctl poweroff' 2>&1 </dev/null >/dev/null) && return 0
        grep -Eqi 'timed out|refused|reset by peer|banner' <<<"$err" || return 0
        alive "$1" || return 0
        log "ssh poweroff failed to connect ($err); retrying"
    done
}

# Waits up to LIMIT seconds (default 120) for pid to be gone; SIGKILLs it after that.
# Returns 1 when it had to kill.
wait_gone_or_kill() {
    local pid=$1 limit=${2:-120} deadline
    deadline=$(( ${EPOCHREALTIME%.*} + limit ))
    while alive "$pid"; do
        if (( ${EPOCHREALTIME%.*} >= deadline )); then
            log "QEMU $pid still runs ${limit} s later; killing it"
            kill -9 "$pid" 2>/dev/null
            return 1
        fi
        sleep 0.01
    done
}

# Blocks until systemd in VM NAME has finished booting (so "idle" means idle).
settle() {
    banger vm exec "$1" -- systemctl is-system-running --wait >/dev/null 2>&1 || true
}

# A TCP port on 127.0.0.1 that is free right now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Imports or builds the default image (cached builds import in ~10 s).
ensure_image() {
    log "image build (cache: $BANGER_CACHE_DIR)"
    local t0
    t0=$(now)
    banger image build >/dev/null
    log "image ready in $(sub "$(now)" "$t0") s"
}

create_vm() {
    banger vm create "$1" >/dev/null
    BENCH_VMS+=("$1")
}

# The default image, then VM NAME created, started and settled; sets PORT (its SSH port) and
# SSH_OPTS (see ssh_opts).
running_vm() {
    ensure_image
    create_vm "$1"
    banger vm start "$1" >/dev/null
    settle "$1"
    PORT=$(vm_field "$1" runtime.ssh_port)
    ssh_opts "$1" "$PORT"
}

# generate_tree DIR FILES MIB SEED SIZES DIRS SUBDIRS BIG: FILES files of random content under
# DIR, spread over DIRS directories of SUBDIRS subdirectories each; each file takes a size
# from the comma-separated SIZES (seeded by SEED), and one file in BIG is enlarged so the tree
# holds ~MIB MiB in total.
generate_tree() {
    python3 - "$@" <<'PY'
import os, random, sys
root, n, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
choices = [int(x) for x in sys.argv[5].split(",")]
spread, subdirs, big_every = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
random.seed(seed)
sizes = [random.choice(choices) for _ in range(n)]
big = max(1, n // big_every)
rest = mib * 2**20 - sum(sizes)
for i in range(big):
    sizes[i] += max(0, rest // big)
for i, size in enumerate(sizes):
    d = os.path.join(root, f"d{i % spread:02d}", f"s{i % subdirs}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}.dat"), "wb") as f:
        f.write(os.urandom(size))
PY
}

bench_cleanup() {
    local rc=$? pid name
    trap - EXIT INT TERM
    set +e
    for pid in "${BENCH_QEMU_PIDS[@]}"; do
        if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$BENCH_HOME"; then
            kill -9 "$pid" 2>/dev/null
        fi
    done
    local hung=0
    for name in "${BENCH_VMS[@]}"; do
        timeout 60 "$BANGER_BIN" vm stop "$name" >/dev/null 2>&1
        if (($? == 124)); then
            # The daemon does not answer (see the deadlock in bench/README.md): kill below.
            log "vm stop $name hung; killing this instance's QEMU and daemon"
            hung=1
            break
        fi
        timeout 30 "$BANGER_BIN" vm rm "$name" >/dev/null 2>&1
    done
    ((hung)) || timeout 30 "$BANGER_BIN" daemon stop >/dev/null 2>&1
    # Anything still running under this home (a QEMU banger lost track of): ours, kill it.
    for pid in $(pgrep -f "qemu-system.*$BENCH_HOME" 2>/dev/null); do
        kill -9 "$pid" 2>/dev/null
    done
    # This instance's daemon, if `daemon stop` did not end it: TERM, then KILL after 5 s.
    local daemons=() i
    for pid in $(pgrep -f "^$(dirname "$BANGER_BIN")/bangerd" 2>/dev/null); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "BANGER_HOME=$BENCH_HOME"; then
            kill "$pid" 2>/dev/null && daemons+=("$pid")
        fi
    done
    for pid in "${daemons[@]}"; do
        for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && kill -9 "$pid" 2>/dev/null
    done
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "kept $BENCH_HOME"
    else
        rm -rf "$BENCH_HOME"
    fi
    exit "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# TCG guests are CPU-bound, so other load on the host skews every number: print it.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

log "banger: $BANGER_BIN; BANGER_HOME=$BENCH_HOME; $(nproc) cores; load average $(loadavg)"
