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

source scripts/stage.sh

mkdir -p "$RUNS"
COMMON=(--data "${SOURCES[@]}" --model "$MODEL" --crops-per-epoch "$CROPS" --threads 1)
stage "$RUNS/rvq" "$EPOCHS" $NEC train rvq --out "$RUNS/rvq" --epochs "$EPOCHS" "${COMMON[@]}" &
stage "$RUNS/rvq8" "$FIXED8_EPOCHS" $NEC train rvq --out "$RUNS/rvq8" --epochs "$FIXED8_EPOCHS" \
    --train-codebooks 8 "${COMMON[@]}" &
wait
echo "[$(date -u +%FT%TZ)] all runs done"
