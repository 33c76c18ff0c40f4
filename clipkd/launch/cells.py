"""The cells of the paper's grids (``scripts/*.sh``) and of sweeps, as jobs: each a list of ``clipkd`` command
lines equal to the ones the scripts run, into the same folders.

A :class:`Step` is one ``clipkd`` call: a training run (``train``: ``--resume`` is added when the job starts and
the folder already holds a started run, what ``run_once`` in ``scripts/common.sh`` does), an evaluation of a run on
another dataset (``eval``: skipped once its ``results.json`` exists, ``eval_once``), or a fused sweep group
(``launch group``). A :class:`Cell` is what a status line is about (a run folder and its evaluations); a
:class:`Job` is what one engine job runs: one cell, or the cells of one fused group.

Torch-free: cells are made from config files only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from yacs.config import CfgNode

from clipkd.config import build_config
from clipkd.config.recipes import command_files, configs_dir, dataset_file, method_file
from clipkd.data.specs import DG_TARGETS, STEMS, TRANSFER_SOURCE, XD_TARGETS
from clipkd.errors import ConfigError
from clipkd.rundir import CONFIG_FILE, RESULTS_FILE, RunDir, eval_results_path, seed_dir

if TYPE_CHECKING:
    from clipkd.runs.sweep import Grid

KINDS = ("base2new", "fewshot", "teacher", "xd", "dg")
DATASETS = STEMS  # the 11 benchmark datasets, in scripts/base2new_all.sh's order (xd.sh / dg.sh: the targets)
TEACHER_METHOD = "promptsrc_teacher"  # scripts/teacher.sh


@dataclass(frozen=True)
class Step:
    """One ``clipkd`` call. ``args``: its arguments without the executable. ``output``: the file that says it is
    done. ``files`` / ``opts``: for a training run, the config it computes (as ``clipkd train`` builds it), so a
    launch can tell a finished run from one finished with other settings before submitting anything."""

    kind: str  # "train" | "eval" | "group"
    args: tuple[str, ...]
    output: str
    files: tuple[str, ...] = ()
    opts: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return Path(self.output).parent

    def args_now(self) -> list[str] | None:
        """The arguments to run when the job starts, or None when there is nothing to do: a training run resumes
        once its folder holds ``config.yaml`` (``clipkd train --resume`` then skips a finished run or names the
        keys that differ), an evaluation is skipped once its ``results.json`` exists."""
        if self.kind == "eval":
            return None if Path(self.output).is_file() else list(self.args)
        if self.kind == "train" and (self.run_dir / CONFIG_FILE).is_file():
            at = self.args.index("--output-dir") + 2
            return [*self.args[:at], "--resume", *self.args[at:]]
        return list(self.args)

    def config(self) -> CfgNode:
        """The config this training run computes (``clipkd train``'s, OUTPUT_DIR absolute)."""
        cfg = build_config(list(self.files), list(self.opts), freeze=False)
        cfg.OUTPUT_DIR = os.path.abspath(self.run_dir)
        cfg.freeze()
        return cfg


@dataclass(frozen=True)
class Cell:
    """What status reports on: ``name`` (its folder under the launch root, with the setting for transfer cells)
    and the files that say it is finished."""

    name: str
    outputs: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return all(Path(p).is_file() for p in self.outputs)


@dataclass(frozen=True)
class Job:
    """What one engine job runs: ``steps`` in order, for ``cells``; ``log``: the job's log, next to the first cell's
    folder (a run folder must be empty when a run starts there, so never inside it)."""

    name: str
    cells: tuple[Cell, ...]
    steps: tuple[Step, ...]
    log: str


def _train(out: Path, data: str, dataset_config: Path, method: Path, middle: Sequence[str], seed: int,
           opts: Sequence[str], configs: Sequence[Path] = ()) -> Step:
    """``run_once OUT --root DATA --dataset-config D --method M [--config C] --seed S OPTS`` of scripts/common.sh."""
    extra = [a for c in configs for a in ("--config", str(c))]
    args = ("train", "--output-dir", str(out), "--root", data, "--dataset-config", str(dataset_config),
            "--method", str(method), *extra, "--seed", str(seed), *middle, *opts)
    files = command_files(str(method), None, str(dataset_config), [str(c) for c in configs])
    return Step("train", args, str(out / RESULTS_FILE), tuple(str(f) for f in files),
                ("DATASET.ROOT", data, "SEED", str(seed), *middle, *opts))


def _recipe(method: str, stem: str) -> tuple[Path, Path]:
    """The scripts' ``recipe METHOD STEM``: the checkout's dataset and method files (both must exist)."""
    method_file(method)  # an unknown method is named, with the known ones
    dataset_file(stem)
    return configs_dir() / "datasets" / f"{stem}.yaml", configs_dir() / "methods" / f"{method}.yaml"


def _own_teacher(teachers: str | None, stem: str, teacher_seed: int) -> list[str]:
    """``teacher_args STEM`` of scripts/common.sh."""
    if not teachers:
        return []
    own = Path(teachers) / stem / seed_dir(teacher_seed)
    return ["MODEL.TEACHER.CHECKPOINT", str(own) if own.is_dir() else teachers]


def _transfer_teacher(teachers: str | None, xd_teacher: str | None, teacher_seed: int) -> list[str]:
    """``transfer_teacher_args`` of scripts/common.sh."""
    if xd_teacher:
        return ["MODEL.TEACHER.CHECKPOINT", xd_teacher]
    if not teachers:
        return []
    own = Path(teachers) / TRANSFER_SOURCE / seed_dir(teacher_seed)
    return ["MODEL.TEACHER.CHECKPOINT", str(own) if own.is_dir() else f"{teachers}/ImageNet"]


def _one(out: Path, root: Path, steps: Sequence[Step], prefix: str = "") -> Job:
    name = prefix + out.relative_to(root).as_posix()
    cell = Cell(name, tuple(s.output for s in steps))
    return Job(name, (cell,), tuple(steps), f"{out}.log")


def resolve_datasets(kind: str, datasets: Sequence[str]) -> list[str]:
    """``all`` or stems; for xd and dg the targets (all: the scripts' 10 datasets / 4 ImageNet variants)."""
    every = {"xd": XD_TARGETS, "dg": DG_TARGETS}.get(kind, DATASETS)
    stems = list(every) if list(datasets) in ([], ["all"]) else list(dict.fromkeys(datasets))
    if "all" in stems:
        raise ConfigError("--datasets takes 'all' or dataset stems, not both")
    for stem in stems:
        dataset_file(stem)  # unknown stems are named, with the known ones
    return stems


def paper_jobs(kind: str, *, method: str | None, datasets: Sequence[str], seeds: Sequence[int], output: str,
               data: str, opts: Sequence[str] = (), shots: Sequence[int] = (16,), teachers: str | None = None,
               teacher_seed: int = 1, xd_teacher: str | None = None) -> list[Job]:
    """The jobs of ``scripts/KIND.sh`` over ``datasets`` x ``seeds`` (x ``shots`` for fewshot), each job the
    commands that script runs for one cell, into the same folders under ``output``. ``teachers``, ``teacher_seed``,
    ``xd_teacher``: the scripts' TEACHERS, TEACHER_SEED, XD_TEACHER. xd and dg: ``datasets`` are the targets."""
    if kind not in KINDS:
        raise ConfigError(f"unknown grid '{kind}'; choose one of {', '.join(KINDS)}")
    if kind == "teacher" and method not in (None, TEACHER_METHOD):
        raise ConfigError(f"launch teacher trains configs/methods/{TEACHER_METHOD}.yaml, as scripts/teacher.sh; "
                          "drop --method")
    method = TEACHER_METHOD if kind == "teacher" else method or "abkd_promptkd"
    stems = resolve_datasets(kind, datasets)
    root = Path(output)
    opts = list(opts)
    jobs: list[Job] = []
    if kind in ("xd", "dg"):
        return _transfer_jobs(kind, method, stems, seeds, root, data, opts, teachers, teacher_seed, xd_teacher)
    for stem in stems:
        dsconf, mfile = _recipe(method, stem)
        for seed in seeds:
            if kind == "base2new":
                out = root / "base2new" / method / stem / seed_dir(seed)
                middle = ["DATASET.SUBSAMPLE_CLASSES", "base", *_own_teacher(teachers, stem, teacher_seed)]
                jobs.append(_one(out, root, [_train(out, data, dsconf, mfile, middle, seed, opts)]))
            elif kind == "teacher":
                out = root / "teachers" / stem / seed_dir(seed)
                jobs.append(_one(out, root, [_train(out, data, dsconf, mfile, ["DATASET.SUBSAMPLE_CLASSES", "base"],
                                                    seed, opts)]))
            else:
                for k in shots:
                    out = root / "fewshot" / method / stem / f"shots{k}" / seed_dir(seed)
                    middle = ["DATASET.NUM_SHOTS", str(k), "DATASET.SUBSAMPLE_CLASSES", "all",
                              *_own_teacher(teachers, stem, teacher_seed)]
                    jobs.append(_one(out, root, [_train(out, data, dsconf, mfile, middle, seed, opts)]))
    return jobs


def transfer_protocol(method: str, opts: Sequence[str]) -> str:
    """DISTILL.PROTOCOL of ``method`` on ImageNet after ``opts`` (what ``transfer_setting`` reads with
    ``clipkd config show``)."""
    dsconf, mfile = _recipe(method, TRANSFER_SOURCE)
    cfg = build_config(command_files(str(mfile), None, str(dsconf), []), list(opts))
    return str(cfg.DISTILL.PROTOCOL)


def _transfer_jobs(kind: str, method: str, targets: list[str], seeds: Sequence[int], root: Path, data: str,
                   opts: list[str], teachers: str | None, teacher_seed: int, xd_teacher: str | None) -> list[Job]:
    """scripts/xd.sh and dg.sh: the ImageNet run (then, inductive, its evaluation on each target in the same job;
    transductive xd: one run per target, each a job)."""
    protocol = transfer_protocol(method, opts)
    setting = {"inductive": "xd.yaml", "transductive": "xd_transductive.yaml"}.get(protocol)
    if setting is None:
        raise ConfigError(f"cannot read DISTILL.PROTOCOL of method '{method}' (got {protocol!r})")
    setting_file = configs_dir() / "protocols" / setting
    teacher = _transfer_teacher(teachers, xd_teacher, teacher_seed)
    jobs = []
    for seed in seeds:
        def train(stem: str) -> tuple[Path, Step]:
            dsconf, mfile = _recipe(method, stem)
            out = root / "transfer" / method / stem / seed_dir(seed)
            return out, _train(out, data, dsconf, mfile, teacher, seed, opts, [setting_file])

        out, source = train(TRANSFER_SOURCE)
        if kind == "xd" and protocol == "transductive":
            jobs.append(_one(out, root, [source], f"{kind}:"))
            for target in targets:
                target_out, step = train(target)
                jobs.append(_one(target_out, root, [step], f"{kind}:"))
            continue
        evals = [Step("eval", ("eval", "--run", str(out), "--dataset", target, "--root", data, *opts),
                      str(eval_results_path(out, target))) for target in targets]
        jobs.append(_one(out, root, [source, *evals], f"{kind}:"))
    return jobs


def sweep_jobs(grid: Grid, root_data: str, output: str, fused: bool = False) -> list[Job]:
    """The cells of a ``clipkd sweep`` grid (:class:`clipkd.runs.sweep.Grid`) as jobs: each cell its
    ``clipkd train`` command (the one ``--dry-run`` prints); with ``fused``, each group of cells that share a data
    stream (:func:`clipkd.runs.fused.group_cells`) one job, ``clipkd launch group`` running them fused."""
    root = Path(output)
    steps = [Step("train", tuple(grid.command(cell, root_data)[1:]), str(Path(cell.out) / RESULTS_FILE),
                  tuple(str(f) for f in grid.files),
                  ("DATASET.ROOT", root_data, "SEED", str(cell.seed), *cell.overrides)) for cell in grid.cells]
    if not fused:
        return [_one(Path(cell.out), root, [step]) for cell, step in zip(grid.cells, steps)]
    from clipkd.runs.fused import group_cells

    jobs = []
    for members in group_cells([grid.config(cell, root_data) for cell in grid.cells]):
        cells = tuple(Cell(Path(grid.cells[i].out).relative_to(root).as_posix(), (steps[i].output,))
                      for i in members)
        first = Path(grid.cells[members[0]].out)
        spec = {"root": root_data, "files": [str(f) for f in grid.files],
                "cells": [{"out": str(grid.cells[i].out), "seed": grid.cells[i].seed,
                           "overrides": list(grid.cells[i].overrides)} for i in members]}
        step = Step("group", ("launch", "group", json.dumps(spec)), "")
        jobs.append(Job(f"fused:{cells[0].name}+{len(cells) - 1}", cells, (step,), f"{first}.fused.log"))
    return jobs


def check_started(step: Step) -> str:
    """``new``, ``resume`` or ``finished`` for a training step (:meth:`clipkd.rundir.RunDir.plan`: a folder
    started or finished with other settings is a TrainingError naming the keys)."""
    return RunDir(step.run_dir).plan(step.config())
