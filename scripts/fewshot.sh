#!/usr/bin/env bash
# Few-shot setting: train on SHOTS images of every class, evaluate on all classes.
# Usage: DATA=/path/to/data scripts/fewshot.sh DATASET SEED SHOTS [METHOD] [KEY VALUE ...]   (SHOTS: 1 2 4 8 16)
# Writes $OUTPUT/fewshot/METHOD/DATASET/shotsSHOTS/seedSEED/results.json; finished runs are skipped (when their config is this one).
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ $# -lt 3 ]; then
  echo "usage: DATA=... $0 DATASET SEED SHOTS [METHOD] [KEY VALUE ...]" >&2
  exit 2
fi
DATASET=$1 SEED=$2 SHOTS=$3 METHOD=${4:-abkd_promptkd}
shift $(( $# < 4 ? $# : 4 ))
recipe "$METHOD" "$DATASET"
teacher_args "$DATASET"
run_once "$OUTPUT/fewshot/$METHOD/$DATASET/shots$SHOTS/seed$SEED" \
  --root "$DATA" "${RECIPE[@]}" --seed "$SEED" \
  DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES all "${TEACHER_ARGS[@]}" "$@"
