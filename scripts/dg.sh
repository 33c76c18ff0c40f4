#!/usr/bin/env bash
# Domain generalisation (CoOp/CoCoOp): learn on ImageNet, then classify ImageNetV2, ImageNet-Sketch, ImageNet-A and
# ImageNet-R (evaluation sets: test images only; A and R hold 200 of ImageNet's classes).
# Usage: DATA=/path/to/data scripts/dg.sh SEED [METHOD] [KEY VALUE ...]
# The ImageNet run is the one of scripts/xd.sh ($OUTPUT/transfer/METHOD/imagenet/seedSEED/, trained here unless
# finished: all classes, 16 shots for an inductive METHOD, all images unlabelled for a transductive one); each
# variant's evaluation goes to its eval/<variant>/results.json. Then the table: clipkd report OUTPUT/transfer --dg.
# DG_TARGETS="imagenet_a imagenet_r" restricts the variants (default: all 4).
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ $# -lt 1 ]; then
  echo "usage: DATA=... $0 SEED [METHOD] [KEY VALUE ...]" >&2
  exit 2
fi
SEED=$1 METHOD=${2:-abkd_promptkd}
shift $(( $# < 2 ? $# : 2 ))
TARGETS=(${DG_TARGETS:-imagenetv2 imagenet_sketch imagenet_a imagenet_r})
transfer_setting "$METHOD" "$@"
transfer_teacher_args
transfer_train "$TRANSFER_SOURCE" "$SEED" "$METHOD" "$@"
for target in "${TARGETS[@]}"; do
  eval_once "$OUTPUT/transfer/$METHOD/$TRANSFER_SOURCE/seed$SEED" "$target" "$@"
done
"$CLIPKD" report "$OUTPUT/transfer" --dg --method "$METHOD"
