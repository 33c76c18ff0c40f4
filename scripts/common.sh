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
