#!/usr/bin/env bash
# Benchmark: workspace transfer and exec against plain OpenSSH over the same SSH path.
#
#   bench/workspace.sh [FILES=10000] [MIB=100]
#
# 1. A generated git repo: FILES files of mixed sizes (~MIB MiB in total), committed.
#    full:     `banger vm workspace prepare` (first prepare, into an emptied /root/repo)
#    baselines: `tar -c . | ssh VM 'tar -x -C /root/tar-copy'` and
#              `rsync -a -e ssh ./ VM:/root/rsync-copy/` (Debian's rsync on both sides) of the
#              same directory, each into an emptied directory, over the same SSH path with
#              OpenSSH's default cipher (chacha20-poly1305). banger prefers AES-GCM (cheaper
#              for the guest to decrypt), so `tar | ssh -c aes128-gcm` is printed too: the
#              ratio against it is the cost of banger's own protocol.
# 2. resync after a 1-file change vs one `ssh VM true` round trip (fresh connection), and vs
#    `rsync -a --delete` of the same change into the rsync copy.
# 3. `banger vm exec VM true` (connection reuse via ControlMaster, workspace check included)
#    vs `ssh VM true`.
# Also: the prepare right after a prepare that deleted the previous tree (rounds 1.. of 1.)
# against the first prepare (round 0), goal <= 1.2x (issue 18).
# Prints times (medians of ROUNDS) and ratios; timings are reported, never asserted.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FILES=${1:-$(pick 10000 200)}
MIB=${2:-$(pick 100 4)}
ROUNDS=${ROUNDS:-$(pick 5 1)}
FULL_ROUNDS=${FULL_ROUNDS:-$(pick 3 1)}
NAME=bws

command -v rsync >/dev/null || { echo "bench: rsync is not installed (apt-get install rsync)" >&2; exit 1; }
running_vm "$NAME"

REPO=$BENCH_HOME/repo
log "generating $FILES files (~$MIB MiB) in $REPO"
# Mostly small files, a few large ones, ~MIB MiB in total.
generate_tree "$REPO" "$FILES" "$MIB" 7 200,1000,4000,12000 100 7 200
git -C "$REPO" init -q
git -C "$REPO" add -A
# No background auto-gc: it would repack .git while the benchmark reads it.
git -C "$REPO" -c gc.auto=0 -c user.name=bench -c user.email=bench@localhost commit -qm gen
log "repo: $(du -sh "$REPO" | cut -f1) with .git"

# rsync's remote shell: the SSH options without the destination.
RSYNC_SSH="ssh ${SSH_OPTS[*]:0:${#SSH_OPTS[@]}-1}"

# Writes back what earlier steps left dirty, in the guest and on the host, so a step is not
# charged for its predecessor's writeback (seen: one step of a round taking 3x its usual time).
quiesce() {
    ssh "${SSH_OPTS[@]}" sync
    sync
}

rsync_copy() { # [fresh]: empty the copy first
    [[ ${1:-} == fresh ]] && ssh "${SSH_OPTS[@]}" 'rm -rf /root/rsync-copy && mkdir -p /root/rsync-copy'
    quiesce
    local t0
    t0=$(now)
    rsync -a --delete -e "$RSYNC_SSH" "$REPO/" root@127.0.0.1:/root/rsync-copy/
    sub "$(now)" "$t0"
}

tar_copy() { # [ssh options...]
    ssh "${SSH_OPTS[@]}" 'rm -rf /root/tar-copy && mkdir -p /root/tar-copy'
    quiesce
    local t0
    t0=$(now)
    tar -C "$REPO" -cf - . | ssh "$@" "${SSH_OPTS[@]}" 'tar -x -C /root/tar-copy -f -'
    sub "$(now)" "$t0"
}

# The first prepare (no manifest) is the full-transfer number; later full runs need the
# manifest reset, which a prepare from an empty --no-git dir does (it deletes everything).
EMPTY=$BENCH_HOME/empty
mkdir -p "$EMPTY"
full=() tarc=() targ=() rsyncc=()
for ((r = 0; r < FULL_ROUNDS; r++)); do
    banger vm workspace prepare "$NAME" "$EMPTY" --no-git >/dev/null
    quiesce
    t0=$(now)
    banger vm workspace prepare "$NAME" "$REPO" >/dev/null
    full+=("$(sub "$(now)" "$t0")")
    tarc+=("$(tar_copy)")
    targ+=("$(tar_copy -c aes128-gcm@openssh.com)")
    rsyncc+=("$(rsync_copy fresh)")
    log "round $r: prepare ${full[-1]} s, tar|ssh ${tarc[-1]} s (aes-gcm ${targ[-1]} s), rsync ${rsyncc[-1]} s"
done

resync=() rtt=() rsyncr=()
for ((r = 0; r < ROUNDS; r++)); do
    echo "change $r" >"$REPO/d00/s0/f0.dat"
    quiesce
    t0=$(now)
    banger vm workspace prepare "$NAME" "$REPO" >/dev/null
    resync+=("$(sub "$(now)" "$t0")")
    t0=$(now)
    ssh "${SSH_OPTS[@]}" true
    rtt+=("$(sub "$(now)" "$t0")")
    rsyncr+=("$(rsync_copy)")
    log "round $r: resync ${resync[-1]} s, ssh true ${rtt[-1]} s, rsync ${rsyncr[-1]} s"
done

exect=() sshx=()
banger vm exec "$NAME" -- true >/dev/null # opens the shared connection
for ((r = 0; r < ROUNDS; r++)); do
    t0=$(now)
    banger vm exec "$NAME" -- true >/dev/null
    exect+=("$(sub "$(now)" "$t0")")
    t0=$(now)
    ssh "${SSH_OPTS[@]}" true
    sshx+=("$(sub "$(now)" "$t0")")
done

mf=$(median "${full[@]}") mt=$(median "${tarc[@]}") mtg=$(median "${targ[@]}") mrs=$(median "${rsyncc[@]}")
mr=$(median "${resync[@]}") mrt=$(median "${rtt[@]}") mrr=$(median "${rsyncr[@]}")
me=$(median "${exect[@]}") ms=$(median "${sshx[@]}")
echo "workspace benchmark: $FILES files, ~$MIB MiB"
if ((FULL_ROUNDS > 1)); then
    # Round 0's prepare is a first one (the empty prepare before it deleted nothing); every
    # later round's comes right after a prepare that deleted the previous tree in the guest.
    mafter=$(median "${full[@]:1}")
    echo "prepare right after deleting the previous tree ${mafter}s (median of rounds 1-$((FULL_ROUNDS - 1)))   first prepare ${full[0]}s   ratio $(ratio "$mafter" "${full[0]}")x  (goal <= 1.2x)"
fi
echo "full prepare      ${mf}s   tar|ssh ${mt}s   ratio $(ratio "$mf" "$mt")x  (goal <= 1.1x)"
echo "full prepare      ${mf}s   tar|ssh -c aes128-gcm ${mtg}s   ratio $(ratio "$mf" "$mtg")x  (same cipher)"
echo "full prepare      ${mf}s   rsync -a ${mrs}s  ratio $(ratio "$mf" "$mrs")x  (goal <= 0.5x)"
echo "1-file resync     ${mr}s   ssh true ${mrt}s  ratio $(ratio "$mr" "$mrt")x  (goal <= 2x)"
echo "1-file resync     ${mr}s   rsync -a ${mrr}s  ratio $(ratio "$mr" "$mrr")x  (goal <= 0.5x)"
echo "vm exec true      ${me}s   ssh true ${ms}s  ratio $(ratio "$me" "$ms")x  (goal <= 0.5x)"
