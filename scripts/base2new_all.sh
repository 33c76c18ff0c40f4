#!/usr/bin/env bash
# Base-to-new on the 11 datasets x seeds 1 2 3, then the HM report.
# Usage: DATA=/path/to/data scripts/base2new_all.sh [METHOD] [KEY VALUE ...]   (SEEDS="1 2 3" to change seeds)
set -euo pipefail
source "$(dirname "$0")/common.sh"
METHOD=${1:-abkd_promptkd}
shift $(( $# < 1 ? $# : 1 ))
DATASETS=(imagenet caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101)
for dataset in "${DATASETS[@]}"; do
  for seed in ${SEEDS:-1 2 3}; do
    "$(dirname "$0")/base2new.sh" "$dataset" "$seed" "$METHOD" "$@"
  done
done
"$CLIPKD" report "$OUTPUT/base2new" --method "$METHOD" --compare published
