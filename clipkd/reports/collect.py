"""Find run folders under a results ROOT and read their results.json.

Layouts (written by ``clipkd train`` and the scripts):

- base-to-new: ``ROOT/<method>/<stem>/seed<S>/results.json``
- few-shot:    ``ROOT/fewshot/<method>/<stem>/shots<K>/seed<S>/results.json``
- sweep:       ``ROOT/<method>/<stem>/a<alpha>_b<beta>/seed<S>/results.json``

A run folder is a ``seed<S>`` folder, or any folder holding ``results.json``, ``config.yaml`` or ``log.txt``.
A run folder without a readable, well-formed results.json is kept as *incomplete* (never dropped).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from clipkd.errors import ClipkdError

RESULTS_FILE = "results.json"
RUN_MARKERS = (RESULTS_FILE, "config.yaml", "log.txt")
FEWSHOT_DIR = "fewshot"

KIND_B2N = "base2new"
KIND_FEWSHOT = "fewshot"
KIND_SWEEP = "sweep"

_SEED = re.compile(r"^seed(-?\d+)$")
_SHOTS = re.compile(r"^shots(-?\d+)$")
_CELL = re.compile(r"^a(.+)_b(.+)$")


@dataclass
class Run:
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

    @property
    def ok(self) -> bool:
        return self.kind is not None and self.results is not None


@dataclass
class Collection:
    root: Path
    runs: list[Run] = field(default_factory=list)

    def complete(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind and r.ok]

    def incomplete(self, kind: str | None = None) -> list[Run]:
        """Runs that are failed/unfinished (of ``kind``, or of any kind incl. unknown layouts)."""
        return [r for r in self.runs if not r.ok and (kind is None or r.kind in (kind, None))]


def _is_run_folder(path: Path, names: list[str]) -> bool:
    return bool(_SEED.match(path.name)) or any(m in names for m in RUN_MARKERS)


def _accuracy(block: object, key: str) -> float:
    if not isinstance(block, dict) or "accuracy" not in block:
        raise ValueError(f'no "{key}.accuracy"')
    value = block["accuracy"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'"{key}.accuracy" is not a finite number: {value!r}')
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


def _classify(root: Path, path: Path) -> Run:
    parts = path.relative_to(root).parts
    seed = _SEED.match(parts[-1]) if parts else None
    run = Run(path=path, kind=None, seed=int(seed.group(1)) if seed else None)
    if seed is None:
        run.problem = "run folder not named seed<S>"
        return run
    keys: tuple[str, ...] = ("base", "new")
    if len(parts) == 5 and parts[0] == FEWSHOT_DIR and _SHOTS.match(parts[3]):
        run.kind, run.method, run.dataset = KIND_FEWSHOT, parts[1], parts[2]
        run.shots = int(_SHOTS.match(parts[3]).group(1))  # type: ignore[union-attr]
        keys = ("all",)
    elif len(parts) == 3:
        run.kind, run.method, run.dataset = KIND_B2N, parts[0], parts[1]
    elif len(parts) == 4 and _CELL.match(parts[2]):
        cell = _CELL.match(parts[2])
        try:
            run.alpha, run.beta = float(cell.group(1)), float(cell.group(2))  # type: ignore[union-attr]
        except ValueError:
            run.problem = f"cannot read alpha/beta from folder name {parts[2]!r}"
            return run
        run.kind, run.method, run.dataset = KIND_SWEEP, parts[0], parts[1]
    else:
        run.problem = "folder does not fit a known layout (method/dataset/seedS, " \
                      "method/dataset/a<alpha>_b<beta>/seedS, fewshot/method/dataset/shotsK/seedS)"
        return run
    run.results, run.problem = _read_results(path, keys)
    return run


def collect(root: str | Path) -> Collection:
    """Walk ``root`` and classify every run folder (sorted, deterministic)."""
    root = Path(root)
    if not root.is_dir():
        raise ClipkdError(f"{root} is not a folder; give the results ROOT that holds <method>/<dataset>/seed<S>/")
    out = Collection(root=root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        path = Path(dirpath)
        if path != root and _is_run_folder(path, filenames):
            out.runs.append(_classify(root, path))
            if _SEED.match(path.name):
                dirnames[:] = []  # a run folder's insides (checkpoints, logs) are not runs
    return out
