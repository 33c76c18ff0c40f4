#!/usr/bin/env bash
# Base-to-new: train on the base classes of DATASET with SEED, evaluate base and new.
# Usage: DATA=/path/to/data scripts/base2new.sh DATASET SEED [METHOD] [KEY VALUE ...]
# Writes $OUTPUT/base2new/METHOD/DATASET/seedSEED/results.json (OUTPUT defaults to ./output); finished runs
# are skipped and interrupted ones resumed when their config is this one (else clipkd names what differs).
# METHOD names configs/methods/METHOD.yaml (default abkd_promptkd), with configs/per_dataset/METHOD/DATASET.yaml.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ $# -lt 2 ]; then
  echo "usage: DATA=... $0 DATASET SEED [METHOD] [KEY VALUE ...]" >&2
  exit 2
fi
DATASET=$1 SEED=$2 METHOD=${3:-abkd_promptkd}
shift $(( $# < 3 ? $# : 3 ))
recipe "$METHOD" "$DATASET"
teacher_args "$DATASET"
run_once "$OUTPUT/base2new/$METHOD/$DATASET/seed$SEED" \
  --root "$DATA" "${RECIPE[@]}" --seed "$SEED" \
  DATASET.SUBSAMPLE_CLASSES base "${TEACHER_ARGS[@]}" "$@"
