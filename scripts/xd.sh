#!/usr/bin/env bash
# Cross-dataset transfer (CoOp/CoCoOp; PromptKD Table 2): learn on ImageNet, then classify all classes of each of the
# 10 other benchmark datasets.
# Usage: DATA=/path/to/data scripts/xd.sh SEED [METHOD] [KEY VALUE ...]
# An inductive METHOD (default abkd_promptkd) is trained once on ImageNet (all classes, 16 shots:
# configs/protocols/xd.yaml) into $OUTPUT/transfer/METHOD/imagenet/seedSEED/ and evaluated on each target into its
# eval/<target>/results.json. A transductive METHOD (e.g. promptkd_xd) is distilled from the ImageNet teacher on each
# dataset's unlabelled train images (configs/protocols/xd_transductive.yaml), ImageNet included, into
# $OUTPUT/transfer/METHOD/<dataset>/seedSEED/. The teacher: XD_TEACHER, else TEACHERS (scripts/common.sh). Finished
# runs and evaluations are skipped, interrupted runs resumed; then the table: clipkd report OUTPUT/transfer --xd.
# XD_TARGETS="dtd eurosat" restricts the targets (default: all 10).
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ $# -lt 1 ]; then
  echo "usage: DATA=... $0 SEED [METHOD] [KEY VALUE ...]" >&2
  exit 2
fi
SEED=$1 METHOD=${2:-abkd_promptkd}
shift $(( $# < 2 ? $# : 2 ))
TARGETS=(${XD_TARGETS:-caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101})
transfer_setting "$METHOD" "$@"
transfer_teacher_args
transfer_train "$TRANSFER_SOURCE" "$SEED" "$METHOD" "$@"
for target in "${TARGETS[@]}"; do
  if [ "$PROTOCOL" = transductive ]; then
    transfer_train "$target" "$SEED" "$METHOD" "$@"
  else
    eval_once "$OUTPUT/transfer/$METHOD/$TRANSFER_SOURCE/seed$SEED" "$target" "$@"
  fi
done
"$CLIPKD" report "$OUTPUT/transfer" --xd --method "$METHOD"
