"""Cross-dataset transfer and domain generalisation: a trained run evaluated on all classes of another dataset.

The protocol of CoOp/CoCoOp and of PromptKD's Table 2: a model learned on ImageNet (all classes, 16 shots) is
evaluated on the test images of each target, classified among all the target's classes (SUBSAMPLE_CLASSES all).
The run's own student is used as trained (its ``model.pt``): a PromptKD student classifies with its teacher's
class embeddings of the target's class names (its own teacher: the same prompts, or the zero-shot teacher with
the target's CoOp template, as zero-shot CLIP is evaluated there); an IVLP student with its own prompted text
tower. The result goes to ``<run>/eval/<stem>/results.json`` (written atomically, after each image's prediction in
``predictions.npz`` beside it), which
``clipkd report --xd`` / ``--dg`` read.

The evaluation is the run's saved config with the dataset switched to the target: DATASET.NAME, all classes, the
full lists (no few-shot draw). A teacher checkpoint named through PromptKD's per-dataset folder layout is
resolved for the *source* dataset first, so switching DATASET.NAME never picks up the target's teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from clipkd.data.specs import get_spec
from clipkd.engine.evaluate import write_predictions
from clipkd.errors import TrainingError
from clipkd.fileio import atomic_write_text
from clipkd.models.teacher import ZERO_SHOT, resolve_teacher_checkpoint, teacher_description
from clipkd.rundir import MODEL_FILE, PREDICTIONS_FILE, RunDir, eval_results_path
from clipkd.runs.checks import needs_teacher
from clipkd.runs.run import Run

if TYPE_CHECKING:
    from yacs.config import CfgNode



def transfer_results_path(run_dir: str | Path, dataset: str) -> Path:
    """Where the evaluation of the run in ``run_dir`` on ``dataset`` (stem or Dassl name) is written."""
    return eval_results_path(run_dir, get_spec(dataset).stem)


def target_overrides(cfg: CfgNode, dataset: str) -> list[str]:
    """The KEY VALUE pairs that turn a run's config into its evaluation on ``dataset``: the target, all classes,
    the full lists, and the teacher's prompts pinned to the file the run itself used."""
    spec = get_spec(dataset)
    pinned = ["DATASET.NAME", spec.name, "DATASET.SUBSAMPLE_CLASSES", "all", "DATASET.NUM_SHOTS", "0"]
    ckpt = cfg.MODEL.TEACHER.CHECKPOINT
    if needs_teacher(cfg) and ckpt not in ("", ZERO_SHOT):
        pinned += ["MODEL.TEACHER.CHECKPOINT", str(resolve_teacher_checkpoint(cfg).resolve())]
    return pinned


def evaluate_transfer(run_dir: str | Path, dataset: str, overrides: Sequence[str] = ()) -> tuple[dict, Path]:
    """Evaluate the trained run in ``run_dir`` on all classes of ``dataset``'s test split; write and return the
    results (``{"all": {"accuracy", "macro_f1", "n"}, "dataset", "source", "classes", "teacher"}``) and the path.

    ``overrides`` (KEY VALUE pairs, e.g. ``DATASET.ROOT``) adapt the run's config to this machine first.
    """
    spec = get_spec(dataset)
    folder = RunDir(run_dir)
    folder.check_resumable(what="--run")
    if not (folder / MODEL_FILE).is_file():
        raise TrainingError(f"{folder / MODEL_FILE} not found: the run in {folder.path} has not finished; finish "
                            "it (clipkd train ... --resume) before evaluating it on another dataset")
    source_run = Run.load(run_dir, list(overrides), echo=False)
    source_run.check_inputs(dataset=False)  # the source's data need not be here; its teacher must be the same
    source_cfg = source_run.cfg
    source = get_spec(source_cfg.DATASET.NAME)
    run = Run.load(run_dir, [*overrides, *target_overrides(source_cfg, spec.stem)], echo=False)
    metrics, per_image = run.evaluate_per_image(["all"])
    results = {
        "all": metrics["all"],
        "dataset": spec.stem,
        "source": source.stem,
        "classes": len(run.data.halves["all"].classnames),
        "teacher": teacher_description(run.cfg) if needs_teacher(run.cfg) else "none",
    }
    path = transfer_results_path(run_dir, spec.stem)
    write_predictions(path.parent / PREDICTIONS_FILE, per_image)  # first: an evaluation with results.json has it
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return results, path
