"""Fused sweeps: train every cell that shares a data stream in one process, one teacher forward per batch.

The cells of an ABKD alpha-beta grid differ only in what the student learns from the teacher (DISTILL.*) and
how (OPTIM.*): they read the same images in the same order with the same augmentation, and the frozen teacher
gives the same outputs for them (:mod:`clipkd.engine.loop`). ``clipkd sweep --fused`` therefore builds the
teacher and the loader once per group of such cells and feeds each batch, and the teacher's image features of
it, to K students, each with its own prompts, projector, optimizer, scheduler and objective.

A fused cell is the run it replaces: its student is the one it would build alone (the first cell's build is
copied, with the RNG state a build leaves, when the student configs agree: building a ViT-B/16 costs seconds), it
trains on the same batches with the same teacher outputs, and it writes its own folder
(config.yaml, log.txt, metrics.jsonl, checkpoints, model.pt, results.json) through the same code as
``clipkd train`` (:meth:`clipkd.runs.run.Run.prepare`, ``trainer``, ``open``, and the cell's
:class:`~clipkd.engine.trainer.Trainer`). Resume is per cell:
finished cells are skipped and unfinished ones restart from their own ``last.pt``, each only when its folder's
config is the cell's (:meth:`clipkd.rundir.RunDir.plan`); cells at different epochs train in one group,
each joining when the group's epoch reaches its own. A cell that fails (a non-finite
loss, a folder in use) drops out and the others go on. The epoch ``time`` a fused cell logs is the group's.

Set-up and evaluation are shared too: the group's data lists are prepared once, the students share their frozen
CLIP weights (only prompts, projector and buffers are copied: :func:`copy_student`), and the
final evaluation reads each test split once, decoding each image once and handing each batch to every student
(:func:`clipkd.engine.evaluate.predict_many`), whose scores are those of its evaluation alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from yacs.config import CfgNode

from clipkd.config import flatten
from clipkd.data.specs import get_spec
from clipkd.engine import runtime
from clipkd.engine.evaluate import predict_many
from clipkd.engine.loop import train_epochs
from clipkd.engine.runtime import autocast_for, restore_rng, rng_snapshot, seed_everything
from clipkd.engine.teacher_features import TeacherFeatures
from clipkd.models.student import build_student
from clipkd.models.teacher import build_teacher
from clipkd.rundir import TEACHER_PRED
from clipkd.runs.checks import check_teacher, needs_teacher, records_teacher
from clipkd.runs.run import Run

# What a cell may change without leaving the group: everything its student is and learns. The rest of the config
# (data, seed, input, loader, teacher) makes the stream and must agree; of these prefixes, the keys in
# STREAM_KEYS shape the stream too.
PER_STUDENT = ("OUTPUT_DIR", "DISTILL.", "OPTIM.", "MODEL.STUDENT.", "MODEL.PROMPT.", "TEST.", "PROMPTSRC.",
               "KGCOOP.",
               "KDPL.")
STREAM_KEYS = ("DISTILL.PROTOCOL", "DISTILL.TEACHER_CACHE", "OPTIM.PRECISION")


def stream_key(cfg: CfgNode) -> str:
    """Cells with equal keys can be trained together: same images, order, augmentation, teacher and precision."""
    flat = flatten(cfg)
    shared = {k: v for k, v in flat.items() if k in STREAM_KEYS or not k.startswith(PER_STUDENT)}
    shared["needs_teacher"] = needs_teacher(cfg)  # whether a run alone builds a teacher before its student
    return json.dumps(shared, sort_keys=True, default=str)


def group_cells(configs: Sequence[CfgNode]) -> list[list[int]]:
    """Indices of ``configs`` grouped by :func:`stream_key`, groups and members in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(stream_key(cfg), []).append(i)
    return list(groups.values())


def student_key(cfg: CfgNode) -> str:
    """The config keys a student is built from (besides the seed and the teacher): equal keys, equal students."""
    flat = flatten(cfg)
    return json.dumps({k: v for k, v in flat.items() if k.startswith(("MODEL.STUDENT.", "MODEL.PROMPT."))},
                      sort_keys=True, default=str)


def copy_student(student: torch.nn.Module) -> Any:
    """A copy that trains on its own (prompts, projector, buffers) over the *same* frozen CLIP tensors: nothing
    writes them, so a fused group's K students hold one ViT, not K, and a copy does not clone ~100M weights."""
    memo: dict[int, Any] = {id(p): p for p in student.parameters() if not p.requires_grad}
    return copy.deepcopy(student, memo)


@dataclass
class Built:
    """The models a fused group's cells share: one teacher, one student per student config."""

    teacher: Any
    after_teacher: dict  # RNG state right after building the teacher
    # student_key -> (an untouched copy of the student built for it, the RNG state right after that build)
    students: dict[str, tuple[Any, dict]] = field(default_factory=dict)
    # the teacher cache's entry of the training stream (DISTILL.TEACHER_CACHE), opened by the first cell needing it
    train_entry: Any = None


def build_shared(run: Run, shared: Built | None) -> Built:
    """:meth:`Run.build` for a group: the first cell builds and keeps the teacher, an untouched copy of its student
    and the RNG states after each; a later cell gets the same teacher and a copy of the student built for its
    student config (built and added on first use), with the RNG where its own build would have left it: exactly
    the models it would have built alone."""
    cfg = run.cfg
    check_teacher(cfg)
    if shared is None:
        seed_everything(cfg.SEED)
        template = get_spec(cfg.DATASET.NAME).template
        run.teacher = build_teacher(cfg, template, device=run.device) if needs_teacher(cfg) else None
        shared = Built(run.teacher, rng_snapshot())
    else:
        run.teacher = shared.teacher
        restore_rng(shared.after_teacher)
    key = student_key(cfg)
    if key in shared.students:
        student, after_student = shared.students[key]
        run.student = copy_student(student)
        restore_rng(after_student)
    else:
        run.student = build_student(cfg, run.teacher, device=run.device)
        shared.students[key] = (copy_student(run.student), rng_snapshot())
    return shared


def fit_fused(runs: Sequence[Run], resume: Sequence[bool]) -> list[dict | Exception]:
    """Train ``runs`` (:class:`~clipkd.runs.run.Run`s of one :func:`stream_key`) together; each one's results,
    or the error that stopped it. A KeyboardInterrupt stops them all (each keeps its ``last.pt``)."""
    if len({stream_key(r.cfg) for r in runs}) > 1:
        raise ValueError("fit_fused: the runs do not share one data stream (group them with group_cells)")
    outcomes: list[Any] = [None] * len(runs)
    trainers: dict[int, Any] = {}
    stream = None
    shared: Built | None = None  # the teacher and students built by the cells that got that far
    data = None  # the lists (dataset, shots, seed, protocol are stream keys): prepared once for the group
    try:
        for i, run in enumerate(runs):
            if data is not None:
                run.data = data
            try:
                inputs = run.prepare(resume[i])
                shared = build_shared(run, shared)
                trainer, cell_stream = run.trainer(shared.train_entry)
                if trainer.teacher_features is not None and trainer.teacher_features.entry is not None:
                    shared.train_entry = trainer.teacher_features.entry
                run.open(trainer, resume[i], inputs)
                trainers[i] = trainer
                stream = stream if stream is not None else cell_stream
            except Exception as exc:  # noqa: BLE001 - this cell cannot run; the others can
                outcomes[i] = exc
            if data is None and run.has_data:
                data = run.data
        shared = None  # the untouched student copies are not needed any more: free their memory
        if trainers:
            first = trainers[min(trainers)]
            features = None
            if first.teacher_features is not None:  # one source of teacher features for all: the cache if any uses it
                entry = next((t.teacher_features.entry for t in trainers.values()
                              if t.teacher_features.entry is not None), None)
                features = TeacherFeatures(first.teacher_features.teacher, entry, first.teacher_features.rank)
                for t in trainers.values():
                    t.teacher_features = features  # so each cell's log reports the cache it used
            train_epochs(list(trainers.values()), stream, runs[min(trainers)].device, features)
            finished = []
            for i, t in trainers.items():
                if t.error is not None:
                    outcomes[i] = t.error
                    continue
                try:
                    t.finish_model()
                    finished.append(i)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk for one cell's model.pt
                    outcomes[i] = exc
            predictions = _predict_group([runs[i] for i in finished])
            for i, predicted in zip(finished, predictions):
                try:
                    if isinstance(predicted, Exception):
                        raise predicted
                    t = trainers[i]
                    outcomes[i] = t.write_results(*runs[i].evaluate_per_image(log=t.log, predictions=predicted),
                                                  runs[i].teacher_label)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk for one cell's results
                    outcomes[i] = exc
    finally:
        for t in trainers.values():
            t.close()
    return outcomes


def _predict_group(runs: Sequence[Any]) -> list[dict | Exception | None]:
    """Each run's final student's predictions per half, from one pass over each half's test list for all of them
    (:func:`~clipkd.engine.evaluate.predict_many`: every image decoded and transformed once, every student given
    the batches it gets alone), and the group's teacher's in the same pass where a cell asks for it
    (:func:`~clipkd.runs.checks.records_teacher`: its ``teacher_pred``). None for
    each run under torchrun: each then evaluates alone, sharing its test images among the processes as a run alone
    does."""
    if not runs or runtime.is_initialized():
        return [None] * len(runs)
    first = runs[0]
    out: list[Any] = [{} for _ in runs]
    try:
        models = [run.model() for run in runs]
        teachers = list({id(run.teacher): run.teacher for run in runs if records_teacher(run.cfg)}.values())
        autocast, _ = autocast_for(first.cfg.OPTIM.PRECISION, first.device)
        for name, split in first.data.halves.items():
            live = [k for k, o in enumerate(out) if isinstance(o, dict)]
            if not live:
                break
            results = predict_many([*(models[k] for k in live), *teachers], split, first.cfg, first.device, autocast)
            by_teacher = {id(t): r for t, r in zip(teachers, results[len(live):]) if not isinstance(r, Exception)}
            for k, result in zip(live, results):
                if isinstance(result, Exception):
                    out[k] = result
                    continue
                if records_teacher(runs[k].cfg) and id(runs[k].teacher) in by_teacher:
                    result.per_image[TEACHER_PRED] = by_teacher[id(runs[k].teacher)].per_image["pred"]
                out[k][name] = result
    except Exception as exc:  # noqa: BLE001 - the test list cannot be read (e.g. a missing image): every cell
        return [exc] * len(runs)
    return out
