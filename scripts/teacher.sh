#!/usr/bin/env bash
# A PromptSRC teacher, the way PromptKD trains its teachers (configs/methods/promptsrc_teacher.yaml): IVLP prompts
# on ViT-L/14 trained on the labelled 16-shot base classes of DATASET with SEED; evaluated on base and new.
# Usage: DATA=/path/to/data scripts/teacher.sh DATASET SEED [KEY VALUE ...]
# Writes $OUTPUT/teachers/DATASET/seedSEED/ (model.pt, results.json; OUTPUT defaults to ./output); a finished
# teacher is skipped, an interrupted one resumed. Distillation runs use it with TEACHERS=$OUTPUT/teachers
# (scripts/common.sh) or MODEL.TEACHER.CHECKPOINT $OUTPUT/teachers/DATASET/seedSEED/model.pt.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ $# -lt 2 ]; then
  echo "usage: DATA=... $0 DATASET SEED [KEY VALUE ...]" >&2
  exit 2
fi
DATASET=$1 SEED=$2
shift 2
recipe promptsrc_teacher "$DATASET"
run_once "$OUTPUT/teachers/$DATASET/seed$SEED" \
  --root "$DATA" "${RECIPE[@]}" --seed "$SEED" \
  DATASET.SUBSAMPLE_CLASSES base "$@"
