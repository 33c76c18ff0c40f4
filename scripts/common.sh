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

# method_configs METHOD DATASET: sets CONFIGS to the --config arguments (method, then per-dataset settings)
method_configs() {
  local method_cfg="$REPO/configs/methods/$1.yaml" extra="$REPO/configs/per_dataset/$1/$2.yaml"
  if [ ! -f "$method_cfg" ]; then
    echo "unknown method '$1': no $method_cfg" >&2
    exit 2
  fi
  CONFIGS=(--config "$method_cfg")
  if [ -f "$extra" ]; then CONFIGS+=(--config "$extra"); fi
}

# run_once OUTDIR ARGS...: train into OUTDIR unless it already has results.json; resume an interrupted run
run_once() {
  local out="$1"; shift
  if [ -f "$out/results.json" ]; then
    echo "skip $out (finished)"
    return 0
  fi
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
  method_configs "$method" "$TRANSFER_SOURCE"
  PROTOCOL=$("$CLIPKD" config show "${CONFIGS[@]}" "$@" | sed -n 's/^  PROTOCOL: *//p')
  case "$PROTOCOL" in
    inductive) SETTING="$REPO/configs/protocols/xd.yaml" ;;
    transductive) SETTING="$REPO/configs/protocols/xd_transductive.yaml" ;;
    *) echo "cannot read DISTILL.PROTOCOL of method '$method' (clipkd config show failed?)" >&2; exit 2 ;;
  esac
}

# transfer_train DATASET SEED METHOD [KEY VALUE ...]: the transfer settings' run of METHOD on DATASET (needs
# SETTING and TEACHER_ARGS) into $OUTPUT/transfer/METHOD/DATASET/seedSEED, unless finished; resumes a cut one
transfer_train() {
  local dataset="$1" seed="$2" method="$3"; shift 3
  method_configs "$method" "$dataset"
  run_once "$OUTPUT/transfer/$method/$dataset/seed$seed" \
    --root "$DATA" --dataset-config "$REPO/configs/datasets/$dataset.yaml" "${CONFIGS[@]}" --config "$SETTING" \
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
