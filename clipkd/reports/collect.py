"""Find run folders under a results ROOT and read their results.json.

Layouts (written by ``clipkd train`` and the scripts):

- base-to-new: ``ROOT/<method>/<stem>/seed<S>/results.json``
- few-shot:    ``ROOT/fewshot/<method>/<stem>/shots<K>/seed<S>/results.json`` (or ``ROOT`` = the ``fewshot`` folder)
- sweep:       ``ROOT/<method>/<stem>/a<alpha>_b<beta>/seed<S>/results.json``

A run folder is a ``seed<S>`` folder, or any folder holding ``results.json``, ``config.yaml`` or ``log.txt``.
A run folder without a readable, well-formed results.json is kept as *incomplete* (never dropped).

ROOT may also sit lower in these trees: a method folder (``output/base2new/<method>``), a dataset folder
(``.../<method>/<stem>``), a sweep cell or few-shot ``shots<K>`` folder, or one run folder. What a run is
follows from the folder names at its bottom (``seed<S>`` under ``a<A>_b<B>`` is a sweep cell, under
``shots<K>`` a few-shot run, otherwise base-to-new); the names the layout needs but ROOT does not hold
(method, dataset) are read from the folders above ROOT. Per kind, the depth is set by the deepest runs
under ROOT (the plain layout whenever it occurs); runs of that kind at another depth are listed as not
fitting, with the reason, never dropped.

Runs averaged together must be the same kind of run (:func:`sort_out`, used by every table, format and mode):
the same protocol, shot count, teacher kind (zero-shot, prompted, none) and selection of the final epoch, read
from each run's config.yaml and results.json. A table whose runs differ in any of these is split into one table
per kind (its name says which) and the mixture is listed among the problems; a run whose config names another
dataset (or, few-shot, another K) than its folder, or a seed that is there twice (``seed1`` and ``seed01``), is
left out and listed. An accuracy outside [0, 100] (or not finite) makes results.json malformed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipkd.data.specs import DATASETS
from clipkd.errors import ClipkdError
from clipkd.rundir import (CELL_DIR, CONFIG_FILE, DEPTH, FEWSHOT_DIR, KIND_B2N, KIND_FEWSHOT, KIND_SWEEP, LAYOUTS,
                           LOG_FILE, RESULTS_FILE, SEED_DIR, SHOTS_DIR)

# Runs whose final epoch was picked on the base TEST split (TEST.FINAL_MODEL best_base_test, the reference code's
# choice) are reported as a method of their own with this mark, so they never share an average with honest runs.
BASE_TEST_MARK = " [selected on base test]"
RUN_MARKERS = (RESULTS_FILE, CONFIG_FILE, LOG_FILE)

# Folder names the run scripts use for results ROOTs (output/base2new, output/sweep, output/fewshot):
# read from above ROOT as a method or dataset name they mean the ROOT was passed one level too low.
CONTAINER_DIRS = (KIND_B2N, KIND_SWEEP, FEWSHOT_DIR)


@dataclass
class RunRecord:
    path: Path
    kind: str | None  # KIND_* or None when the folder does not fit a known layout
    method: str = ""
    dataset: str = ""  # dataset stem
    seed: int | None = None
    shots: int | None = None
    alpha: float | None = None
    beta: float | None = None
    results: dict | None = None  # the parsed metrics (accuracies in %), None when incomplete
    problem: str = ""  # why the run is incomplete / not understood
    # how many of method/dataset/... were read from the folders above ROOT (0: ROOT holds <method>/...);
    # None when the run has the shape of ``kind`` but does not sit where the layout needs it
    level: int | None = None
    profile: "Profile | None" = None  # what the run is (set by sort_out)

    @property
    def ok(self) -> bool:
        return self.kind is not None and self.level is not None and self.results is not None

    @property
    def placed(self) -> bool:
        """Whether the run sits where its layout needs it (so that method and dataset are known)."""
        return self.kind is not None and self.level is not None


@dataclass
class Collection:
    root: Path
    runs: list[RunRecord] = field(default_factory=list)
    # per kind: the depth used (see RunRecord.level) and the folders to pass instead when its runs sit too deep
    levels: dict[str, int] = field(default_factory=dict)
    deeper: dict[str, list[Path]] = field(default_factory=dict)

    def complete(self, kind: str) -> list[RunRecord]:
        return [r for r in self.runs if r.kind == kind and r.ok]

    def incomplete(self, kind: str | None = None) -> list[RunRecord]:
        """Runs that are failed/unfinished (of ``kind``, or of any kind incl. unknown layouts)."""
        return [r for r in self.runs if not r.ok and (kind is None or r.kind in (kind, None))]

    def kinds(self) -> list[str]:
        """The kinds with at least one run placed under ROOT (complete or not)."""
        return sorted({r.kind for r in self.runs if r.placed})  # type: ignore[misc]


def _is_run_folder(path: Path, names: list[str]) -> bool:
    return bool(SEED_DIR.match(path.name)) or any(m in names for m in RUN_MARKERS)


def _accuracy(block: object, key: str) -> float:
    if not isinstance(block, dict) or "accuracy" not in block:
        raise ValueError(f'no "{key}.accuracy"')
    value = block["accuracy"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'"{key}.accuracy" is not a finite number: {value!r}')
    if not 0 <= value <= 100:
        raise ValueError(f'"{key}.accuracy" is {value!r}, outside [0, 100] (accuracies are in %)')
    return float(value)


def _read_results(path: Path, keys: tuple[str, ...]) -> tuple[dict | None, str]:
    file = path / RESULTS_FILE
    if not file.is_file():
        return None, f"no {RESULTS_FILE} (unfinished or failed run)"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable {RESULTS_FILE}: {exc}"
    if not isinstance(data, dict):
        return None, f"{RESULTS_FILE} is not a JSON object"
    try:
        return {k: _accuracy(data.get(k), k) for k in keys}, ""
    except ValueError as exc:
        return None, f"malformed {RESULTS_FILE}: {exc}"


def _results_fields(path: Path) -> dict:
    """results.json as a dict ({} when it cannot be read: _read_results says why)."""
    try:
        data = json.loads((path / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _selected_on(path: Path) -> str:
    return str(_results_fields(path).get("selected_on", "last"))


def _above(root: Path) -> tuple[str, ...]:
    """The names of ROOT and the folders above it, outermost first (as written: symlinks are not resolved)."""
    absolute = Path(os.path.abspath(root))
    return tuple(p for p in absolute.parts if p != absolute.anchor)


def _shape(names: tuple[str, ...]) -> str | None:
    """The kind of run a ``seed<S>`` folder is, from the name of the folder holding it."""
    if not names or not SEED_DIR.match(names[-1]):
        return None
    parent = names[-2] if len(names) > 1 else ""
    return KIND_FEWSHOT if SHOTS_DIR.match(parent) else KIND_SWEEP if CELL_DIR.match(parent) else KIND_B2N


def _level(kind: str, rel: tuple[str, ...]) -> int:
    """How many layout components lie above ROOT (< 0: ROOT holds extra folders above the layout)."""
    if kind == KIND_FEWSHOT and len(rel) == DEPTH[kind] + 1 and rel[0] == FEWSHOT_DIR:
        return 0  # ROOT holds fewshot/<method>/...
    return DEPTH[kind] - len(rel)


def _deeper_folder(root: Path, kind: str, rel: tuple[str, ...]) -> Path:
    """For a run that sits too deep under ROOT: the folder to pass as ROOT instead."""
    extra = rel[:len(rel) - DEPTH[kind]]
    if kind == KIND_FEWSHOT and extra and extra[-1] == FEWSHOT_DIR:
        extra = extra[:-1]  # the folder holding fewshot/, as the scripts' OUTPUT
    return root.joinpath(*extra)


def _place(run: RunRecord, kind: str, names: tuple[str, ...], level: int) -> None:
    """Fill method/dataset/... from the last components of ``names`` (ROOT's ancestors + path below ROOT)."""
    need = DEPTH[kind]
    if len(names) < need:
        run.problem = f"not enough folders above it to name the method and dataset ({LAYOUTS[kind]})"
        return
    loc = names[-need:]
    roles = ("method", "dataset")
    for role, name in zip(roles, loc[:2]):
        if level > roles.index(role) and name in CONTAINER_DIRS:  # read from above ROOT
            run.problem = (f"'{name}' would be the {role}, but it is a results folder: the runs must sit in "
                           f"{name}/{LAYOUTS[kind].removeprefix('fewshot/')}")
            return
    if kind == KIND_SWEEP:
        cell = CELL_DIR.match(loc[2])
        try:
            run.alpha, run.beta = float(cell.group(1)), float(cell.group(2))  # type: ignore[union-attr]
        except ValueError:
            run.problem = f"cannot read alpha/beta from folder name {loc[2]!r}"
            return
    elif kind == KIND_FEWSHOT:
        run.shots = int(SHOTS_DIR.match(loc[2]).group(1))  # type: ignore[union-attr]
    run.method, run.dataset, run.level = loc[0], loc[1], level
    run.results, run.problem = _read_results(run.path, ("all",) if kind == KIND_FEWSHOT else ("base", "new"))
    if run.results is not None and _selected_on(run.path) == "base_test":
        run.method += BASE_TEST_MARK


def _classify(root: Path, paths: list[Path]) -> tuple[list[RunRecord], dict[str, int], dict[str, list[Path]]]:
    above = _above(root)
    runs, shaped = [], []
    for path in paths:
        rel = path.relative_to(root).parts
        names = above + rel
        seed = SEED_DIR.match(names[-1]) if names else None
        kind = _shape(names)
        run = RunRecord(path=path, kind=kind, seed=int(seed.group(1)) if seed else None)
        if kind is None:
            run.problem = "run folder not named seed<S>"
        else:
            shaped.append((run, rel, _level(kind, rel)))
        runs.append(run)

    levels: dict[str, int] = {}
    deeper: dict[str, list[Path]] = {}
    for kind in LAYOUTS:
        found = [lv for r, _, lv in shaped if r.kind == kind and lv >= 0]
        if found:
            levels[kind] = min(found)  # the deepest runs set the depth: the plain layout wins when present
    for run, rel, lv in shaped:
        kind = run.kind
        assert kind is not None
        if lv < 0:
            folder = _deeper_folder(root, kind, rel)
            deeper.setdefault(kind, [])
            if folder not in deeper[kind]:
                deeper[kind].append(folder)
            run.problem = f"sits deeper than {LAYOUTS[kind]} below ROOT: report {folder} instead"
        elif lv != levels[kind]:
            example = next(r for r, _, v in shaped if r.kind == kind and v == levels[kind])
            run.problem = (f"sits higher than the other runs of its kind under ROOT (e.g. "
                           f"{example.path.relative_to(root).as_posix()}, which follow {LAYOUTS[kind]})")
        else:
            _place(run, kind, above + rel, lv)
    return runs, levels, deeper


def collect(root: str | Path) -> Collection:
    """Walk ``root`` and classify every run folder (sorted, deterministic).

    ``root`` may be a results ROOT, a method or dataset folder below one, or a single run folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ClipkdError(f"{root} is not a folder; give the results ROOT that holds <method>/<dataset>/seed<S>/")
    paths: list[Path] = []
    root_is_seed = bool(SEED_DIR.match(Path(os.path.abspath(root)).name))  # abspath: ROOT may be "."
    # ROOT itself is a run when named seed<S> or holding a run's files (a lone log.txt may be a script's log)
    if root_is_seed or any((root / m).is_file() for m in (RESULTS_FILE, CONFIG_FILE)):
        paths.append(root)
    if not root_is_seed:  # a run folder's insides (checkpoints, logs) are not runs
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            path = Path(dirpath)
            if path != root and _is_run_folder(path, filenames):
                paths.append(path)
                if SEED_DIR.match(path.name):
                    dirnames[:] = []  # a run folder's insides (checkpoints, logs) are not runs
    runs, levels, deeper = _classify(root, paths)
    return Collection(root=root, runs=runs, levels=levels, deeper=deeper)


# ---------------------------------------------------------------- which runs may be averaged together
def dataset_stem(name: str) -> str:
    """The stem of a dataset named by stem or Dassl NAME (an unknown name as it is)."""
    if name in DATASETS:
        return name
    return next((spec.stem for spec in DATASETS.values() if spec.name == name), name)


@dataclass(frozen=True)
class Profile:
    """What a run is, from its config.yaml and results.json; None where the run does not record it."""

    protocol: str | None  # DISTILL.PROTOCOL
    shots: int | None  # DATASET.NUM_SHOTS
    teacher: str | None  # results.json "teacher": zero-shot | prompted | none
    selection: str  # results.json "selected_on": last | val | base_test
    dataset: str | None  # the stem DATASET.NAME names
    # not part of a run's kind (reports/checks.py warns about them): results.json "epoch" (the final model's
    # epoch, 1-based) and OPTIM.MAX_EPOCH (the epochs trained)
    epoch: int | None = None
    max_epoch: int | None = None

    def label(self, attr: str) -> str:
        """How a table's name tells runs apart on ``attr`` (one of KIND_ATTRS)."""
        value = getattr(self, attr)
        if value is None:
            return f"{attr} not recorded"
        if attr == "shots":
            return "all images" if value == 0 else f"{value} shot" + ("" if value == 1 else "s")
        if attr == "teacher":
            return "no teacher" if value == "none" else f"{value} teacher"
        if attr == "selection":
            return {"last": "last epoch", "base_test": "selected on base test"}.get(value, f"selected on {value}")
        return str(value)


# what runs averaged together must share (the dataset is checked against each run's folder instead)
KIND_ATTRS = ("protocol", "shots", "teacher", "selection")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _config_value(config: dict, key: str) -> Any:
    """The value of a dotted key; None where the file leaves it out (a run's config.yaml has every key; a file
    written by hand may not, and then it is not guessed)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_profile(path: Path) -> tuple[Profile | None, str]:
    """The profile of the run in ``path``, or None and why it cannot be told (an unreadable config.yaml)."""
    results = _results_fields(path)
    teacher = results.get("teacher")
    teacher = str(teacher).split(":")[0] if teacher is not None else None
    selection = str(results.get("selected_on", "last"))
    epoch = _int_or_none(results.get("epoch"))
    file = path / CONFIG_FILE
    if not file.is_file():  # e.g. results copied without their run folder: nothing to tell runs apart by
        return Profile(None, None, teacher, selection, None, epoch), ""
    try:
        config = yaml.load(file.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return None, f"unreadable {CONFIG_FILE} ({type(exc).__name__}): cannot tell what kind of run it is"
    if config is None:
        config = {}
    if not isinstance(config, dict):
        return None, f"{CONFIG_FILE} is not a mapping of keys: cannot tell what kind of run it is"
    name, shots = _config_value(config, "DATASET.NAME"), _config_value(config, "DATASET.NUM_SHOTS")
    protocol = _config_value(config, "DISTILL.PROTOCOL")
    return Profile(protocol=str(protocol) if protocol is not None else None,
                   shots=_int_or_none(shots),
                   teacher=teacher, selection=selection,
                   dataset=dataset_stem(str(name)) if name else None,
                   epoch=epoch, max_epoch=_int_or_none(_config_value(config, "OPTIM.MAX_EPOCH"))), ""


@dataclass
class Problem:
    """A run (or folder) that a table leaves out or reports apart, and why."""

    path: Path
    problem: str


def _misplaced(run: RunRecord, profile: Profile) -> str:
    """Why the run's config contradicts the folder it sits in ("" when it does not)."""
    if profile.dataset is not None and profile.dataset != run.dataset:
        return (f"its {CONFIG_FILE} names dataset {profile.dataset} (DATASET.NAME), not {run.dataset} as its folder "
                f"says: left out; move it to the folder of its dataset")
    if run.kind == KIND_FEWSHOT and profile.shots is not None and profile.shots != run.shots:
        return (f"its {CONFIG_FILE} says DATASET.NUM_SHOTS {profile.shots}, not {run.shots} as its folder "
                f"shots{run.shots} says: left out; move it to shots{profile.shots}")
    return ""


def sort_out(runs: list[RunRecord], table: Callable[[RunRecord], Hashable] = lambda r: r.method,
             ) -> tuple[list[RunRecord], list[Problem]]:
    """Of the runs a report is about to average: those that may be, and the problems.

    ``table`` gives the table a run is averaged in (base-to-new: its method). A run whose config contradicts its
    folder, or whose seed is there twice in one place (``seed1`` and ``seed01``), is left out. Runs of one table
    that differ in KIND_ATTRS are never averaged together: each kind gets a table of its own, named by method plus
    what sets it apart (the method of the runs is changed to that name), and the mixture is a problem.
    """
    kept: list[RunRecord] = []
    problems: list[Problem] = []
    for run in runs:
        run.profile, why = read_profile(run.path)
        why = why or _misplaced(run, run.profile)  # type: ignore[arg-type]
        if why:
            problems.append(Problem(run.path, why))
        else:
            kept.append(run)

    slots: dict[tuple, list[RunRecord]] = {}
    for run in kept:
        slots.setdefault((table(run), run.dataset, run.shots, run.alpha, run.beta, run.seed), []).append(run)
    for same in slots.values():
        if len(same) > 1:
            names = ", ".join(r.path.name for r in same)
            for r in same:
                problems.append(Problem(r.path, f"seed {r.seed} is there {len(same)} times ({names}: the same seed): "
                                                "none of them is averaged; keep one folder"))
    kept = [r for r in kept if len(slots[(table(r), r.dataset, r.shots, r.alpha, r.beta, r.seed)]) == 1]

    groups: dict[Hashable, list[RunRecord]] = {}
    for run in kept:
        groups.setdefault(table(run), []).append(run)
    for members in groups.values():
        profiles = [r.profile for r in members]
        varying = [a for a in KIND_ATTRS if len({getattr(p, a) for p in profiles}) > 1]
        if not varying:
            continue
        counts: dict[str, int] = {}
        for run in members:
            label = ", ".join(run.profile.label(a) for a in varying)  # type: ignore[union-attr]
            counts[label] = counts.get(label, 0) + 1
            run.method += f" [{label}]"
        kinds = "; ".join(f"{label}: {n} run" + ("" if n == 1 else "s") for label, n in sorted(counts.items()))
        folder = Path(os.path.commonpath([r.path for r in members]))
        names = ", ".join(sorted({r.method for r in members}))
        problems.append(Problem(folder, f"mixes runs of different kinds ({kinds}): never averaged together, "
                                        f"each kind is reported apart ({names})"))
    return kept, problems
