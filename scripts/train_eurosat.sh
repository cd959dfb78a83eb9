#!/usr/bin/env bash
# The whole EuroSAT training chain behind the shipped weights (weights/eurosat/), resumable:
# MAE pretraining, NEC fine-tuning at each rate point, a classifier head on each, then the
# packing of the shipped set. Every stage that finished is skipped; one cut short resumes
# from its last epoch. Logs go to $RUNS/<stage>.log. Run it in the background:
#
#   nohup scripts/train_eurosat.sh > runs/train.log 2>&1 &
#
# Settings (environment): DATA, RUNS, MAE_EPOCHS, NEC_EPOCHS, LAMBDAS (space-separated),
# RATE_ON, CLS_EPOCHS, THREADS (0: PyTorch's default).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/eurosat_rgb}
RUNS=${RUNS:-runs}
MAE_EPOCHS=${MAE_EPOCHS:-24}
NEC_EPOCHS=${NEC_EPOCHS:-2}
LAMBDAS=${LAMBDAS:-"30000 300000 3000000"}
RATE_ON=${RATE_ON:-all}
CLS_EPOCHS=${CLS_EPOCHS:-15}
THREADS=${THREADS:-0}
NEC=.venv/bin/nec-serve

source scripts/stage.sh

mkdir -p "$RUNS"
stage "$RUNS/mae" "$MAE_EPOCHS" $NEC train mae --data "$DATA" --out "$RUNS/mae" \
    --epochs "$MAE_EPOCHS" --batch-size 128 --blr 1e-3 --warmup-epochs 3 --threads "$THREADS"
for L in $LAMBDAS; do
    stage "$RUNS/nec-$L" "$NEC_EPOCHS" $NEC train nec --init "$RUNS/mae/checkpoint.pth" \
        --out "$RUNS/nec-$L" --lmbda "$L" --rate-on "$RATE_ON" --epochs "$NEC_EPOCHS" \
        --threads "$THREADS"
done
for L in $LAMBDAS; do
    stage "$RUNS/cls-$L" "$CLS_EPOCHS" $NEC train classifier \
        --init "$RUNS/nec-$L/checkpoint.pth" --out "$RUNS/cls-$L" --epochs "$CLS_EPOCHS" \
        --threads "$THREADS"
done
echo "[$(date -u +%FT%TZ)] all stages done"
