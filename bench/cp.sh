#!/usr/bin/env bash
# Benchmark: `banger vm cp` of a directory tree into the guest against plain OpenSSH tools.
#
#   bench/cp.sh [MIB=200] [FILES=2000]
#
# A generated tree of FILES files of mixed sizes (~MIB MiB in total), copied into an emptied
# directory in the guest by
#   - `banger vm cp TREE NAME:/root/cp-copy` (the workspace channel for 1 MiB or more),
#   - `tar -c . | ssh VM 'tar -x -C /root/tar-copy'` (OpenSSH's default cipher),
#   - `scp -r TREE VM:/root/scp-copy` (SFTP protocol, OpenSSH 9),
# each over the same SSH path, after a `sync` in the guest and on the host. Prints medians of
# ROUNDS (default 3) and the ratios; the goal is vm cp ≤ 0.8× tar|ssh. Timings are reported,
# never asserted.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MIB=${1:-$(pick 200 4)}
FILES=${2:-$(pick 2000 50)}
ROUNDS=${ROUNDS:-$(pick 3 1)}
NAME=bcp

running_vm "$NAME"

TREE=$BENCH_HOME/tree
log "generating $FILES files (~$MIB MiB) in $TREE"
generate_tree "$TREE" "$FILES" "$MIB" 11 500,4000,16000,64000 50 5 100
log "tree: $(du -sh "$TREE" | cut -f1)"

# scp takes -P for the port; the rest of the ssh options as they are, without the target.
SCP_OPTS=()
for ((i = 0; i < ${#SSH_OPTS[@]} - 1; i++)); do
    if [[ ${SSH_OPTS[i]} == -p ]]; then
        SCP_OPTS+=(-P "${SSH_OPTS[i + 1]}")
        ((i++))
    else
        SCP_OPTS+=("${SSH_OPTS[i]}")
    fi
done

fresh() { # DIR: gone in the guest, then both sides' writeback done
    ssh "${SSH_OPTS[@]}" "rm -rf $1; sync"
    sync
}

cpt=() tart=() scpt=()
for ((r = 0; r < ROUNDS; r++)); do
    fresh /root/cp-copy
    t0=$(now)
    banger vm cp "$TREE" "$NAME:/root/cp-copy" >/dev/null 2>&1
    cpt+=("$(sub "$(now)" "$t0")")
    fresh /root/tar-copy
    ssh "${SSH_OPTS[@]}" 'mkdir -p /root/tar-copy'
    t0=$(now)
    tar -C "$TREE" -cf - . | ssh "${SSH_OPTS[@]}" 'tar -x -C /root/tar-copy -f -'
    tart+=("$(sub "$(now)" "$t0")")
    fresh /root/scp-copy
    t0=$(now)
    scp -q -r "${SCP_OPTS[@]}" "$TREE" root@127.0.0.1:/root/scp-copy
    scpt+=("$(sub "$(now)" "$t0")")
    log "round $r: vm cp ${cpt[-1]} s, tar|ssh ${tart[-1]} s, scp -r ${scpt[-1]} s"
done
# The copies are the same tree.
same=$(ssh "${SSH_OPTS[@]}" 'cd /root && for d in cp-copy tar-copy scp-copy; do (cd $d && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum); done | uniq | wc -l')
[[ $same == 1 ]] || { echo "bench: the three copies differ" >&2; exit 1; }

mc=$(median "${cpt[@]}") mt=$(median "${tart[@]}") ms=$(median "${scpt[@]}")
echo "vm cp benchmark: $FILES files, ~$MIB MiB, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "vm cp   ${mc}s   tar|ssh ${mt}s   ratio $(ratio "$mc" "$mt")x  (goal <= 0.8x)"
echo "vm cp   ${mc}s   scp -r  ${ms}s   ratio $(ratio "$mc" "$ms")x"
