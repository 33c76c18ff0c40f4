"""Run folders: their file names, where runs sit under a results ROOT, the lock that keeps two processes out
of one folder, and resume hygiene. Torch-free: the engine writes this layout and the reports read it.

A run folder: ``config.yaml``, ``log.txt``, ``metrics.jsonl``, ``checkpoints/last.pt`` (every epoch),
``checkpoints/best-val.pt`` (TEST.FINAL_MODEL val), ``model.pt`` (the final model), ``results.json`` and, written
just before it, ``predictions.npz`` (each test image's label, prediction and probabilities: :data:`PER_IMAGE`).
``inputs.json`` records what the run read (:mod:`clipkd.runs.inputs`). ``.lock`` exists while a process trains
into the folder (or an evaluation writes its ``results.json`` into a folder of its own). An evaluation of the
run on another dataset goes to ``eval/<stem>/results.json`` (and ``predictions.npz``) inside it
(:func:`eval_results_path`).

Under a results ROOT (:data:`LAYOUTS`): ``<method>/<stem>/seed<S>`` (base-to-new),
``fewshot/<method>/<stem>/shots<K>/seed<S>`` and ``<method>/<stem>/a<alpha>_b<beta>/seed<S>`` (a sweep).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from clipkd.config import build_config, flatten
from clipkd.errors import TrainingError
from clipkd.fileio import atomic_write, atomic_write_text, stale_temp_files
from clipkd.locks import HolderLock

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
MODEL_FILE = "model.pt"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
LAST_CKPT = "checkpoints/last.pt"
BEST_CKPT = "checkpoints/best-val.pt"
LOCK_FILE = ".lock"
INPUTS_FILE = "inputs.json"
PREDICTIONS_FILE = "predictions.npz"
# predictions.npz (np.savez_compressed): "format" = PREDICTIONS_FORMAT and, per evaluated half H of results.json,
# "H.<name>" for each name of PER_IMAGE (int32 label and pred; float32 rest) in the half's test-list order, plus
# "H.teacher_pred" (int32) when the run has a teacher and TEST.TEACHER_PREDICTIONS. mean(pred == label) * 100 is results.json's accuracy.
PREDICTIONS_FORMAT = 1
PER_IMAGE = ("label", "pred", "prob", "confidence", "entropy", "top5_out")
TEACHER_PRED = "teacher_pred"
RUN_FILES = (CONFIG_FILE, MODEL_FILE, LOG_FILE, METRICS_FILE, INPUTS_FILE)  # what only a training run writes
# Keys a run may change between its starts: neither changes what the run computes.
SAME_RUN_KEYS = ("OUTPUT_DIR", "DISTILL.TEACHER_CACHE", "TEST.TEACHER_PREDICTIONS")
_KEYS_SHOWN = 5

EVAL_DIR = "eval"  # inside a run folder: eval/<stem>/results.json per evaluated target
FEWSHOT_DIR = "fewshot"
KIND_B2N = "base2new"
KIND_FEWSHOT = "fewshot"
KIND_SWEEP = "sweep"
LAYOUTS = {
    KIND_B2N: "<method>/<dataset>/seed<S>",
    KIND_FEWSHOT: "fewshot/<method>/<dataset>/shots<K>/seed<S>",
    KIND_SWEEP: "<method>/<dataset>/a<alpha>_b<beta>/seed<S>",
}
# how many path components a run's location needs, counting the run folder: method ... seed<S>
DEPTH = {KIND_B2N: 3, KIND_FEWSHOT: 4, KIND_SWEEP: 4}
SEED_DIR = re.compile(r"^seed(-?\d+)$")
SHOTS_DIR = re.compile(r"^shots(-?\d+)$")
CELL_DIR = re.compile(r"^a(.+)_b(.+)$")


def seed_dir(seed: int) -> str:
    return f"seed{seed}"


def cell_dir(alpha: float, beta: float) -> str:
    """A sweep cell's folder (what :data:`CELL_DIR` reads back)."""
    return f"a{format(alpha, 'g')}_b{format(beta, 'g')}"


def eval_results_path(run_dir: str | os.PathLike, stem: str) -> Path:
    """Where the evaluation of the run in ``run_dir`` on the dataset ``stem`` is written."""
    return Path(run_dir) / EVAL_DIR / stem / RESULTS_FILE


class RunDir:
    """Paths of one run folder plus the checks made before a run writes into it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = HolderLock(self.path / LOCK_FILE, remove_on_release=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return (self.path / RESULTS_FILE).is_file()

    @property
    def started(self) -> bool:
        return (self.path / CONFIG_FILE).is_file()

    def check_new(self) -> None:
        """A new run needs a missing or empty folder (a stale ``.lock`` aside). Writes nothing."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise TrainingError(f"output dir {p} is a file, not a folder; pick another --output-dir")
        if p.is_dir() and any(c.name != LOCK_FILE for c in p.iterdir()):
            hint = " or pass --resume to continue it" if self.started and not self.finished else ""
            raise TrainingError(f"output dir {p} is not empty; pick a new --output-dir{hint}")

    @property
    def holds_run(self) -> bool:
        """A training run wrote here (its results.json is the run's own, which reports read)."""
        return any((self.path / name).exists() for name in (*RUN_FILES, "checkpoints"))

    def check_evaluation_target(self) -> None:
        """An evaluation's ``results.json`` goes into a folder of its own: not a file, not a folder a process is
        training in, never a run folder (an evaluation never replaces a run's results). Writes nothing."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise TrainingError(f"--output-dir {p} is a file, not a folder; pass a folder for the evaluation's "
                                f"{RESULTS_FILE} (or --output FILE)")
        holder = None if self._lock.held else self.holder()
        if holder is not None:
            raise TrainingError(f"--output-dir {p} is in use by {holder}; wait for it to finish or pick another "
                                "--output-dir")
        if self.holds_run:
            raise TrainingError(f"--output-dir {p} is a run folder written by clipkd train, and an evaluation never "
                                f"replaces a run's {RESULTS_FILE}; pass a new --output-dir for the evaluation, or "
                                "--output FILE outside the run folder")

    def write_evaluation(self, text: str) -> Path:
        """Write an evaluation's ``results.json`` here, holding the lock and checking again under it."""
        self.check_evaluation_target()
        self.acquire()
        try:
            self.check_evaluation_target()  # a run may have started here meanwhile
            atomic_write_text(self.path / RESULTS_FILE, text)
        finally:
            self.release()
        return self.path / RESULTS_FILE

    def check_resumable(self, what: str = "--resume") -> None:
        """A folder a run has started in (it holds ``config.yaml``); ``what`` names who asks, for the error."""
        if not self.started:
            raise TrainingError(f"{what}: {self.path / CONFIG_FILE} not found; is {self.path} a folder written "
                                "by clipkd train?")

    def plan(self, cfg: CfgNode) -> str:
        """What a run of ``cfg`` does with this folder, the one decision ``clipkd train --resume``, the sweep
        (fused or not) and the scripts share: ``new`` (nothing started here; :meth:`check_new` still guards it),
        ``resume`` (started with this config), ``finished`` (finished with this config: nothing to do). A folder
        started or finished with another config is an error naming the keys, never a silent skip."""
        if not self.started:
            return "new"
        self.check_config(cfg, finished=self.finished)
        return "finished" if self.finished else "resume"

    def check_config(self, cfg: CfgNode, finished: bool = False) -> None:
        """``cfg`` computes what the run saved in ``config.yaml`` computes (:data:`SAME_RUN_KEYS` aside)."""
        saved = self.path / CONFIG_FILE
        before, now = flatten(build_config([saved], freeze=False)), flatten(cfg)
        changed = [k for k in now if k not in SAME_RUN_KEYS and before.get(k) != now[k]]
        if not changed:
            return
        at = ", ".join(f"{k} ({before.get(k)!r} there, {now[k]!r} now)" for k in changed[:_KEYS_SHOWN])
        more = f" and {len(changed) - _KEYS_SHOWN} more keys" if len(changed) > _KEYS_SHOWN else ""
        if finished:
            raise TrainingError(f"{self.path} holds a finished run, and the config differs from {saved} at {at}{more}; "
                                "rerun with the settings it was run with (it is then skipped), or write the new run "
                                "into another folder (clipkd train --output-dir, clipkd sweep --output)")
        raise TrainingError(f"--resume: the config differs from {saved} at {at}{more}; resume with the same "
                            "arguments, or train into a new --output-dir")

    # ------------------------------------------------------------------------------------ the lock
    def acquire(self) -> None:
        """Hold ``.lock`` (an flock, so a killed process's lock is released by the kernel) or refuse."""
        self._lock.acquire(lambda holder: TrainingError(
            f"output dir {self.path} is in use by {holder}; wait for it to finish or pick another --output-dir"))

    def holder(self) -> str | None:
        """Who holds the lock now (None when nobody does); creates nothing."""
        return self._lock.holder()

    def release(self) -> None:
        self._lock.release()

    # ------------------------------------------------------------------------------------ resume
    def clean_for_resume(self, epoch: int) -> list[str]:
        """Drop what a killed run left after its last checkpoint: step/epoch lines of later epochs in
        ``metrics.jsonl``, log lines after that epoch's in ``log.txt``, and temp files of interrupted writes.
        A damaged ``metrics.jsonl`` is refused before anything changes. Only call while holding the lock."""
        metrics = self.path / METRICS_FILE
        kept, dropped = _metrics_through(metrics, epoch) if metrics.is_file() else ([], 0)
        removed = []
        for folder in (self.path, self.path / "checkpoints"):
            for tmp in stale_temp_files(folder):
                tmp.unlink(missing_ok=True)
                removed.append(str(tmp))
        if dropped:
            atomic_write_text(metrics, "".join(f"{line}\n" for line in kept))
            removed.append(f"{dropped} lines of {metrics} after epoch {epoch}")
        cut = trim_log(self.path / LOG_FILE, epoch)
        if cut:
            removed.append(f"{cut} lines of {self.path / LOG_FILE} after epoch {epoch}")
        return removed


def check_evaluation_file(path: str | os.PathLike) -> None:
    """``--output FILE`` is never one of a run folder's own files (its results.json above all)."""
    p = Path(path)
    if p.name in (RESULTS_FILE, *RUN_FILES, LOCK_FILE) and RunDir(p.parent).holds_run:
        raise TrainingError(f"--output {p} is a file of the run in {p.parent}, and an evaluation never replaces a "
                            f"run's {RESULTS_FILE}; pass --output FILE outside the run folder")


# The line Trainer.end_epoch writes as an epoch ends, just before that epoch's last.pt: "epoch [3/20] loss ...".
_EPOCH_LINE = re.compile(rb"epoch \[(\d+)/\d+\] ")


def trim_log(path: Path, epoch: int) -> int:
    """Cut ``log.txt`` after the line of ``epoch`` (all of it for epoch 0), so that a resumed run's log reads as
    an uninterrupted run's, plus a "resumed from" line; returns how many lines went. A log without that line
    (not written by this run's clipkd) is left as it is. Bytes, not text: a damaged log never stops a resume."""
    if not path.is_file():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    end = 0
    if epoch > 0:
        ends = [i for i, line in enumerate(lines) if (m := _EPOCH_LINE.match(line)) and int(m.group(1)) == epoch]
        if not ends:
            return 0
        end = ends[-1] + 1
    if end == len(lines):
        return 0
    kept = b"".join(lines[:end])
    atomic_write(path, lambda f: f.write(kept))
    return len(lines) - end


def _metrics_through(metrics: Path, epoch: int) -> tuple[list[str], int]:
    """The lines of ``metrics.jsonl`` up to ``epoch`` and how many others (later epochs, results, a line cut by
    a kill) there are; a TrainingError naming the file when something else damaged it."""
    try:
        text = metrics.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = metrics.read_bytes()[: exc.start].count(b"\n") + 1
        raise TrainingError(_damaged(metrics, f"line {line} is not UTF-8 text")) from None
    kept, dropped = [], 0
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            dropped += 1
            continue
        try:
            later = row.get("kind") == "results" or int(row.get("epoch", 0)) > epoch
        except (AttributeError, TypeError, ValueError):
            raise TrainingError(_damaged(metrics, f"line {n} is not a clipkd metrics record")) from None
        if later:
            dropped += 1
        else:
            kept.append(line)
    return kept, dropped


def _damaged(metrics: Path, what: str) -> str:
    return (f"{metrics} is damaged ({what}); delete that line, or the whole file (it only holds the run's "
            "curves), and rerun with --resume")
