# Sourced by the training scripts: one resumable training stage.
#
# stage <run folder> <epochs> <command...>: skip when its log.csv has <epochs> rows, else run
# <command> (with --resume when a checkpoint is there, and -q), appending to <run folder>.log.
stage() {
    local out=$1 epochs=$2
    shift 2
    if [ -f "$out/log.csv" ] && [ "$(($(wc -l < "$out/log.csv") - 1))" -ge "$epochs" ]; then
        echo "[$(date -u +%FT%TZ)] $out: done"
        return
    fi
    local resume=()
    [ -f "$out/checkpoint.pth" ] && resume=(--resume)
    echo "[$(date -u +%FT%TZ)] $out: $*"
    "$@" "${resume[@]}" -q >> "$out.log" 2>&1
}
