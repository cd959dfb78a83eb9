#!/usr/bin/env bash
# The RVQ Sentinel-2 compressor behind weights/sentinel2/, resumable: the one model that
# serves 1-8 codebooks (codebook count drawn per sample), and the comparison model trained
# with 8 codebooks always. Both run at once, one thread each (2-core machine); a run cut
# short resumes from its last epoch, a finished one is skipped. Logs go to $RUNS/<run>.log.
#
#   nohup scripts/train_s2.sh > runs/train_s2.log 2>&1 &
#
# Settings (environment): DATA (the data folder), RUNS, EPOCHS, FIXED8_EPOCHS, CROPS
# (crops per epoch), MODEL.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
EPOCHS=${EPOCHS:-20}
FIXED8_EPOCHS=${FIXED8_EPOCHS:-8}
CROPS=${CROPS:-1536}
MODEL=${MODEL:-rvq_s2_small}
NEC=.venv/bin/nec-serve
SOURCES=("$DATA/ssl4eo_s12" "$DATA/eurosat_ms" "$DATA/bigearthnet")

run() {  # run <run folder> <epochs> <extra args...>
    local out=$1 epochs=$2
    shift 2
    if [ -f "$out/log.csv" ] && [ "$(($(wc -l < "$out/log.csv") - 1))" -ge "$epochs" ]; then
        echo "[$(date -u +%FT%TZ)] $out: done"
        return
    fi
    local resume=()
    [ -f "$out/checkpoint.pth" ] && resume=(--resume)
    echo "[$(date -u +%FT%TZ)] $out: training"
    $NEC train rvq --data "${SOURCES[@]}" --out "$out" --model "$MODEL" --epochs "$epochs" \
        --crops-per-epoch "$CROPS" --threads 1 "$@" "${resume[@]}" -q >> "$out.log" 2>&1
    echo "[$(date -u +%FT%TZ)] $out: finished"
}

mkdir -p "$RUNS"
run "$RUNS/rvq" "$EPOCHS" &
run "$RUNS/rvq8" "$FIXED8_EPOCHS" --train-codebooks 8 &
wait
