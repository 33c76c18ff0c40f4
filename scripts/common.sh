# Shared by the run scripts: where things are, and how clipkd is called. Source it; do not run it.
# DATA (the data root) must be set; OUTPUT defaults to ./output; CLIPKD defaults to `clipkd` on PATH.
# TEACHERS (optional) is where the prompted teachers are: clipkd's $OUTPUT/teachers (scripts/teacher.sh writes
# TEACHERS/<dataset>/seed<TEACHER_SEED>, TEACHER_SEED defaults to 1) or PromptKD's released teacher_model folder
# (<DatasetName>/VLPromptLearner/model-best.pth.tar); it becomes MODEL.TEACHER.CHECKPOINT of every run.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${OUTPUT:=output}"
: "${CLIPKD:=clipkd}"
if [ -z "${DATA:-}" ]; then
  echo "set DATA to the folder that holds the datasets (see datasets/README.md), e.g. DATA=~/datasets $0 ..." >&2
  exit 2
fi

# recipe METHOD DATASET: sets RECIPE to the arguments that name METHOD's run on DATASET (this checkout's
# configs/datasets/DATASET.yaml and configs/methods/METHOD.yaml); clipkd adds configs/per_dataset/METHOD/DATASET.yaml
# when it exists (clipkd/config/recipes.py, the rule clipkd sweep and clipkd train --method use too) and names an
# unknown method
recipe() {
  RECIPE=(--dataset-config "$REPO/configs/datasets/$2.yaml" --method "$REPO/configs/methods/$1.yaml")
}

# run_once OUTDIR ARGS...: train into OUTDIR; once a run has started there, with --resume, so that clipkd resumes
# it, skips it when it finished with the same config, and stops with the keys that differ otherwise
run_once() {
  local out="$1"; shift
  local resume=()
  if [ -f "$out/config.yaml" ]; then resume=(--resume); fi
  "$CLIPKD" train --output-dir "$out" "${resume[@]}" "$@"
}

# teacher_args DATASET: sets TEACHER_ARGS to the MODEL.TEACHER.CHECKPOINT override that TEACHERS implies
teacher_args() {
  TEACHER_ARGS=()
  if [ -n "${TEACHERS:-}" ]; then
    local own="$TEACHERS/$1/seed${TEACHER_SEED:-1}"
    if [ -d "$own" ]; then TEACHER_ARGS=(MODEL.TEACHER.CHECKPOINT "$own"); else TEACHER_ARGS=(MODEL.TEACHER.CHECKPOINT "$TEACHERS"); fi
  fi
}

# The cross-dataset and domain-generalisation settings (scripts/xd.sh, scripts/dg.sh). Runs go to
# $OUTPUT/transfer/METHOD/DATASET/seedSEED/; evaluations of a run on another dataset to its eval/DATASET/.
TRANSFER_SOURCE=imagenet

# transfer_teacher_args: sets TEACHER_ARGS to the ImageNet teacher of the transfer settings, for every run of them
# (also those on other datasets, which must not pick up their own teacher): XD_TEACHER when set (a file or folder,
# e.g. PromptKD's teacher_model/ImageNet-xd/VLPromptLearner_large), else clipkd's TEACHERS/imagenet/seed<TEACHER_SEED>,
# else PromptKD's TEACHERS/ImageNet (its <DatasetName>/VLPromptLearner layout); nothing when neither is set
transfer_teacher_args() {
  TEACHER_ARGS=()
  if [ -n "${XD_TEACHER:-}" ]; then
    TEACHER_ARGS=(MODEL.TEACHER.CHECKPOINT "$XD_TEACHER")
  elif [ -n "${TEACHERS:-}" ]; then
    local own="$TEACHERS/$TRANSFER_SOURCE/seed${TEACHER_SEED:-1}"
    TEACHER_ARGS=(MODEL.TEACHER.CHECKPOINT "$TEACHERS/ImageNet")
    if [ -d "$own" ]; then TEACHER_ARGS=(MODEL.TEACHER.CHECKPOINT "$own"); fi
  fi
}

# transfer_setting METHOD [KEY VALUE ...]: sets PROTOCOL (the method's DISTILL.PROTOCOL after the overrides) and
# SETTING, the protocol config merged after the method's: configs/protocols/xd.yaml (inductive: one ImageNet run,
# evaluated on the targets) or xd_transductive.yaml (transductive: one run per dataset, on its unlabelled images)
transfer_setting() {
  local method="$1"; shift
  recipe "$method" "$TRANSFER_SOURCE"
  PROTOCOL=$("$CLIPKD" config show "${RECIPE[@]}" "$@" | sed -n 's/^  PROTOCOL: *//p')
  case "$PROTOCOL" in
    inductive) SETTING="$REPO/configs/protocols/xd.yaml" ;;
    transductive) SETTING="$REPO/configs/protocols/xd_transductive.yaml" ;;
    *) echo "cannot read DISTILL.PROTOCOL of method '$method' (clipkd config show failed?)" >&2; exit 2 ;;
  esac
}

# transfer_train DATASET SEED METHOD [KEY VALUE ...]: the transfer settings' run of METHOD on DATASET (needs
# SETTING and TEACHER_ARGS) into $OUTPUT/transfer/METHOD/DATASET/seedSEED (run_once: skipped when finished)
transfer_train() {
  local dataset="$1" seed="$2" method="$3"; shift 3
  recipe "$method" "$dataset"
  run_once "$OUTPUT/transfer/$method/$dataset/seed$seed" \
    --root "$DATA" "${RECIPE[@]}" --config "$SETTING" \
    --seed "$seed" "${TEACHER_ARGS[@]}" "$@"
}

# eval_once RUN DATASET [KEY VALUE ...]: evaluate the finished run in RUN on all classes of DATASET into
# RUN/eval/DATASET/results.json, unless that exists
eval_once() {
  local run="$1" dataset="$2"; shift 2
  if [ -f "$run/eval/$dataset/results.json" ]; then
    echo "skip $run/eval/$dataset (evaluated)"
    return 0
  fi
  "$CLIPKD" eval --run "$run" --dataset "$dataset" --root "$DATA" "$@"
}
