#!/usr/bin/env bash
# Benchmark: download throughput of a user-mode VM (QEMU's user networking, the default
# without the root helper) against the same download on the host.
#
#   bench/net-download.sh [MIB=64]
#
# A python3 http.server on the host's loopback serves a MIB MiB file. Each round:
#   host:  bash's /dev/tcp to 127.0.0.1, an HTTP/1.0 GET, the body read to /dev/null;
#   guest: the same bash command in the VM to 10.0.2.2 (QEMU's address for the host's
#          loopback), timed inside the guest so `vm exec`'s own cost is left out.
# Prints MiB/s (medians of ROUNDS) and the ratio guest / host. No goal under TCG: a number to
# track. Traffic stays on the host's loopback.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MIB=${1:-$(pick 64 4)}
ROUNDS=${ROUNDS:-$(pick 3 1)}
NAME=bnet

printf '[network]\nmode = "user"\n' >"$BANGER_CONFIG"
SERVE_DIR=$BENCH_HOME/serve
mkdir -p "$SERVE_DIR"
head -c "$((MIB << 20))" /dev/urandom >"$SERVE_DIR/blob"
HTTP_PORT=$(free_port)
python3 -m http.server --bind 127.0.0.1 --directory "$SERVE_DIR" "$HTTP_PORT" \
    </dev/null >/dev/null 2>&1 &
HTTP_PID=$!
trap 'kill "$HTTP_PID" 2>/dev/null; bench_cleanup' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null && break
    sleep 0.1
done

ensure_image
create_vm "$NAME"
banger vm start "$NAME" >/dev/null
settle "$NAME"

# Prints "start end" (seconds) around one download from HOST:PORT.
DOWNLOAD='s=$(date +%s.%N); exec 3<>/dev/tcp/$0/$1 && printf "GET /blob HTTP/1.0\r\n\r\n" >&3 && cat <&3 >/dev/null; e=$(date +%s.%N); echo $s $e'

mibps() { python3 -c "import sys; s, e = map(float, sys.argv[2:4]); print(f'{float(sys.argv[1]) / (e - s):.1f}')" "$MIB" "$1" "$2"; }

host=() guest=()
for ((round = 1; round <= ROUNDS; round++)); do
    read -r s e < <(bash -c "$DOWNLOAD" 127.0.0.1 "$HTTP_PORT")
    host+=("$(mibps "$s" "$e")")
    read -r s e < <(banger vm exec "$NAME" -- bash -c "$DOWNLOAD" 10.0.2.2 "$HTTP_PORT")
    guest+=("$(mibps "$s" "$e")")
    log "round $round: host ${host[-1]} MiB/s, guest ${guest[-1]} MiB/s"
done
H=$(median "${host[@]}")
G=$(median "${guest[@]}")
echo "download of $MIB MiB from the host's loopback (medians of $ROUNDS; load average $(loadavg))"
echo "  host (bash /dev/tcp → 127.0.0.1):           $H MiB/s"
echo "  guest, user mode (bash /dev/tcp → 10.0.2.2): $G MiB/s"
echo "  ratio guest / host: $(ratio "$G" "$H")"
