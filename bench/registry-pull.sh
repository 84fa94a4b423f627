#!/usr/bin/env bash
# Pulling the default image from a loopback registry (Debian's docker-registry, started here on
# 127.0.0.1 with its own storage), against baselines measured in the same run:
#   1. first pull:  `banger image pull` into an instance without it, vs
#                   `skopeo copy docker://… dir:` of the same artifact plus `zstd -d` of its
#                   layers (goal ≤ 1.2×);
#   2. second pull: the same pull again (goal ≤ 0.05 s beyond one manifest request; the
#                   registry's access log gives the requests it served);
#   3. vm create:   `banger vm create` right after the pull vs of the locally built image
#                   (goal ≤ 1.1×; no extra copy).
# Needs root, docker-registry, skopeo, zstd (scripts/install-deps).
#
#   bench/registry-pull.sh [ROUNDS=3]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS=${1:-$(pick 3 1)}

for tool in docker-registry skopeo zstd; do
    command -v "$tool" >/dev/null || { echo "registry-pull: $tool is missing (scripts/install-deps)" >&2; exit 1; }
done

REG_DIR=$BENCH_HOME/registry
mkdir -p "$REG_DIR"
PORT=$(free_port)
cat >"$REG_DIR/config.yml" <<YML
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $REG_DIR/storage
http:
  addr: 127.0.0.1:$PORT
YML
docker-registry serve "$REG_DIR/config.yml" >"$REG_DIR/log" 2>&1 &
REG_PID=$!
stop_registry() { kill "$REG_PID" 2>/dev/null || true; }
trap 'stop_registry; bench_cleanup' EXIT
for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$PORT/v2/" >/dev/null 2>&1 && break
    sleep 0.1
done
REF=127.0.0.1:$PORT/banger/dev:1

ensure_image
banger image push default "$REF" >/dev/null
log "pushed default to $REF"

# A second instance of banger that pulls (its own home, its own daemon).
PULL_HOME=$BENCH_HOME/puller
mkdir -p "$PULL_HOME"
pull() { BANGER_HOME=$PULL_HOME "$BANGER_BIN" "$@"; }
requests() { grep -c '"GET /v2/\|"HEAD /v2/' "$REG_DIR/log" || true; }

first=() base=() second=() second_req=()
for ((r = 1; r <= ROUNDS; r++)); do
    pull image rm dev >/dev/null 2>&1 || true
    pull kernel rm dev >/dev/null 2>&1 || true
    pull daemon stop >/dev/null 2>&1 || true
    rm -rf "$PULL_HOME"/images "$PULL_HOME"/kernels
    pull daemon start >/dev/null
    sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now); pull image pull "$REF" dev >/dev/null; t1=$(now)
    first+=("$(sub "$t1" "$t0")")

    req0=$(requests)
    t0=$(now); pull image pull "$REF" dev >/dev/null; t1=$(now)
    second+=("$(sub "$t1" "$t0")")
    second_req+=("$(( $(requests) - req0 ))")

    out=$BENCH_HOME/skopeo
    rm -rf "$out"; sync; echo 3 >/proc/sys/vm/drop_caches
    t0=$(now)
    skopeo copy -q --src-tls-verify=false "docker://$REF" "dir:$out"
    for f in "$out"/*; do
        case $(basename "$f") in manifest.json|version) continue ;; esac
        zstd -q -d --sparse -c "$f" >"$f.raw" 2>/dev/null || true
    done
    t1=$(now)
    base+=("$(sub "$t1" "$t0")")
    rm -rf "$out"
    log "round $r: pull ${first[-1]} s, skopeo+zstd ${base[-1]} s, second pull ${second[-1]} s (${second_req[-1]} requests)"
done

# vm create after the pull vs of the locally built image (same daemon for fairness: import
# the pulled one into the bench instance too).
banger image pull "$REF" pulled >/dev/null
local_c=() pulled_c=()
for ((r = 1; r <= ROUNDS; r++)); do
    t0=$(now); banger vm create "l$r" >/dev/null; t1=$(now); BENCH_VMS+=("l$r")
    local_c+=("$(sub "$t1" "$t0")")
    t0=$(now); banger vm create "p$r" --image pulled >/dev/null; t1=$(now); BENCH_VMS+=("p$r")
    pulled_c+=("$(sub "$t1" "$t0")")
done
pull daemon stop >/dev/null 2>&1 || true

m_first=$(median "${first[@]}") m_base=$(median "${base[@]}") m_second=$(median "${second[@]}")
m_local=$(median "${local_c[@]}") m_pulled=$(median "${pulled_c[@]}")
size=$(du -sh --apparent-size "$REG_DIR/storage" | cut -f1)
printf '\nregistry storage %s; medians of %d rounds\n' "$size" "$ROUNDS"
printf '%-34s %8s\n' "banger image pull (first)" "$m_first"
printf '%-34s %8s\n' "skopeo copy + zstd -d" "$m_base"
printf '%-34s %8s   goal <= 1.20\n' "ratio pull / baseline" "$(ratio "$m_first" "$m_base")"
printf '%-34s %8s   requests: %s\n' "banger image pull (second)" "$m_second" "${second_req[*]}"
printf '%-34s %8s\n' "vm create (local image)" "$m_local"
printf '%-34s %8s\n' "vm create (pulled image)" "$m_pulled"
printf '%-34s %8s   goal <= 1.10\n' "ratio pulled / local" "$(ratio "$m_pulled" "$m_local")"
