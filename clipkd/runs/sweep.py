"""Sweeps: the ABKD alpha-beta grid and any other DISTILL.* / OPTIM.* values, one :class:`Cell` per point and
seed, each a :class:`~clipkd.runs.run.Run`.

Folders: the alpha-beta grid writes ``OUTPUT/METHOD/STEM/a<A>_b<B>/seed<S>`` (what ``clipkd report --sweep``
reads); every other swept value goes into the method's folder name, ``METHOD+dkd_beta0.5``, so each value is
a method of its own to ``clipkd report`` (a row, or a sweep of its own when alpha and beta are swept too).

A cell is described once (its folder and its config overrides) and turned either into a config for an
in-process Run or, for ``--dry-run``, into the equivalent ``clipkd train`` command line, so the two never
drift apart. Finished cells are skipped, interrupted ones resumed (both only when their folder's config.yaml
is the cell's config: :meth:`~clipkd.rundir.RunDir.plan`), failed ones reported at the end.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from fractions import Fraction
from pathlib import Path

from yacs.config import CfgNode

from clipkd.config import build_config
from clipkd.config.checks import loss_params
from clipkd.config.recipes import recipe_files
from clipkd.errors import ClipkdError, ConfigError
from clipkd.rundir import RunDir, cell_dir, seed_dir

log = logging.getLogger(__name__)


MAX_CELLS = 10_000  # above this a sweep is refused before any list is built (--max-cells raises it)
_EXPONENT_LIMIT = 400  # beyond 1e+-400 a number is no float at all (floats end near 1.8e308 and 5e-324)


def parse_range(text: str, name: str) -> list[float]:
    """``START:STOP:STEP`` -> START, START+STEP, ..., STOP (both ends included, as `seq` does), in exact
    decimal steps."""
    return [float(v) for v in decimal_range(text, name)]


def _range_parts(text: str, name: str) -> tuple[Decimal, Decimal, Decimal]:
    if not isinstance(text, str):  # argparse turns `--alpha=--` into a list
        text = " ".join(map(str, text))
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, step = (Decimal(p) for p in parts)
        if not all(v.is_finite() for v in (start, stop, step)):
            raise ValueError
    except (ValueError, InvalidOperation):
        raise ConfigError(f"--{name} takes START:STOP:STEP with finite numbers (e.g. 0:1:0.1), got '{text}'") from None
    if step <= 0 or stop < start:
        raise ConfigError(f"--{name} {text}: STEP must be > 0 and STOP >= START")
    for v in (start, stop, step):  # checked before any arithmetic: 1e-99999999 would make a huge integer below
        if v and abs(v.adjusted()) > _EXPONENT_LIMIT:
            raise ConfigError(f"--{name} {text}: {v} is out of a float's range (about 1e-308 to 1e308)")
    return start, stop, step


def range_count(text: str, name: str) -> int:
    """How many values ``START:STOP:STEP`` has, floor((STOP - START) / STEP) + 1, in exact arithmetic and
    without listing them (so a sweep's size is known before anything is built)."""
    return _count(*_range_parts(text, name))


def _count(start: Decimal, stop: Decimal, step: Decimal) -> int:
    return int((Fraction(stop) - Fraction(start)) // Fraction(step)) + 1


def decimal_range(text: str, name: str) -> list[Decimal]:
    """:func:`parse_range` as exact decimals (so derived values such as beta = sum - alpha stay exact).
    Call :func:`range_count` first where the range comes from a user: this lists every value."""
    start, stop, step = _range_parts(text, name)
    with localcontext() as ctx:  # exact: START + i * STEP may need more digits than the default 28
        lowest = min(int(start.as_tuple().exponent), int(step.as_tuple().exponent))
        ctx.prec = max(ctx.prec, max(start.adjusted(), stop.adjusted()) - lowest + 3)
        values = [start + i * step for i in range(_count(start, stop, step))]
    floats = [float(v) for v in values]
    if any(math.isinf(f) for f in floats):
        raise ConfigError(f"--{name} {text}: the values must be floats, below about 1.8e308")
    if len(set(floats)) != len(floats):
        same = next(f for f, g in zip(floats, floats[1:]) if f == g)
        raise ConfigError(f"--{name} {text}: STEP {step} is below a float's resolution near {same!r} (two values "
                          "would be the same float, one cell); use a larger STEP")
    return values


def count_cells(alpha: str | None, beta: str | None, alpha_plus_beta: str | None,
                vary: Sequence[tuple[str, str]], seeds: Sequence[int]) -> int:
    """The number of cells :func:`build_grid` would make, counted arithmetically (nothing listed)."""
    n = len(seeds)
    if alpha is not None:
        n *= range_count(alpha, "alpha")
        for text, name in ((beta, "beta"), (alpha_plus_beta, "alpha-plus-beta")):
            if text is not None:
                n *= range_count(text, name)
    for key, text in vary:
        n *= range_count(text, f"vary {key}") if ":" in text else len(text.split(","))
    return n


def check_size(n: int, max_cells: int = MAX_CELLS) -> None:
    if n > max_cells:
        count = f"{n:,}" if n < 10**15 else f"about {Decimal(n):.2E}"
        raise ConfigError(f"this sweep has {count} cells, more than --max-cells {max_cells:,}; use larger steps "
                          "or fewer values, or raise --max-cells if you mean it")


@dataclass(frozen=True)
class Cell:
    """One grid cell: where it writes and how its config differs from the method config."""

    out: Path
    seed: int
    overrides: tuple[str, ...]


@dataclass
class Grid:
    """The cells of one method on one dataset; ``files``: the recipe (:func:`clipkd.config.recipes.recipe_files`:
    dataset, method, per-dataset settings), merged in this order before each cell's overrides."""

    files: list[Path]
    cells: list[Cell]

    @property
    def method_config(self) -> Path:
        return self.files[1]

    def config(self, cell: Cell, root: str) -> CfgNode:
        cfg = build_config(self.files,
                           ["DATASET.ROOT", root, "SEED", str(cell.seed), *cell.overrides], freeze=False)
        cfg.OUTPUT_DIR = os.path.abspath(cell.out)  # stored absolute, as every path build_config makes
        cfg.freeze()
        return cfg

    def command(self, cell: Cell, root: str) -> list[str]:
        """The ``clipkd train`` command that runs exactly this cell."""
        return ["clipkd", "train", "--root", root, "--dataset-config", str(self.files[0]),
                "--method", str(self.method_config), "--seed", str(cell.seed), "--output-dir", str(cell.out),
                *cell.overrides]


def grid_points(alpha: str | None, beta: str | None = None,
                alpha_plus_beta: str | None = None) -> list[tuple[float, float]]:
    """(alpha, beta) pairs: the alpha x beta grid, or ABKD's diagonal grid where ``alpha_plus_beta`` gives the
    sums and beta = sum - alpha, computed in exact decimals (1.3 - 0.5 is 0.8, not 0.8000000000000002).
    No ``alpha``: no alpha-beta grid (an empty list)."""
    if alpha is None:
        if beta is not None or alpha_plus_beta is not None:
            raise ConfigError("--beta and --alpha-plus-beta need --alpha")
        return []
    if (beta is None) == (alpha_plus_beta is None):
        raise ConfigError("give either --beta (alpha x beta grid) or --alpha-plus-beta (ABKD's diagonal grid)")
    alphas = decimal_range(alpha, "alpha")
    if beta is not None:
        return [(float(a), float(b)) for a in alphas for b in decimal_range(beta, "beta")]
    return [(float(a), float(s - a)) for s in decimal_range(alpha_plus_beta, "alpha-plus-beta") for a in alphas]


def vary_values(key: str, text: str) -> list[str]:
    """``--vary KEY VALUES``: START:STOP:STEP (exact decimals, both ends) or a comma-separated list."""
    if ":" in text:
        return [format(v.normalize(), "f") for v in decimal_range(text, f"vary {key}")]
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise ConfigError(f"--vary {key} takes START:STOP:STEP or a comma-separated list, got '{text}'")
    return values


def _ab_overrides(cfg: CfgNode, method: str) -> list[str]:
    """How a cell sets the alpha-beta divergence: as the loss (DISTILL.LOSS ab), or inside a method."""
    if cfg.DISTILL.LOSS == "ab":
        return []
    if "divergence" in loss_params(cfg.DISTILL.LOSS, "ab"):
        return ["DISTILL.DIVERGENCE", "ab"]
    raise ConfigError(f"--alpha/--beta sweep the alpha-beta divergence, and {method} uses DISTILL.LOSS "
                      f"{cfg.DISTILL.LOSS}, which has none: use an AB recipe (e.g. abkd_promptkd, abdkd_promptkd), "
                      "or sweep its own parameters with --vary KEY VALUES")


def build_grid(method_config: str | Path, dataset: str, alpha: str | None, beta: str | None, seeds: Sequence[int],
               output: str | Path, opts: Sequence[str] = (), alpha_plus_beta: str | None = None,
               vary: Sequence[tuple[str, str]] = (), max_cells: int = MAX_CELLS) -> Grid:
    """Every (alpha, beta) x varied values x seed cell of the method's recipe on ``dataset`` (a stem:
    :func:`clipkd.config.recipes.recipe_files`, as ``clipkd train --method`` and the scripts merge it).
    ``vary``: (config key, values) pairs, e.g. ("DISTILL.DKD_BETA", "0.5,1"). More than ``max_cells`` cells is
    an error, found by counting before any list is built."""
    check_size(count_cells(alpha, beta, alpha_plus_beta, vary, seeds), max_cells)
    points = grid_points(alpha, beta, alpha_plus_beta)
    files = recipe_files(method_config, dataset)
    method_config = files[1]
    if not points and not vary:
        raise ConfigError("nothing to sweep: give --alpha with --beta or --alpha-plus-beta, and/or --vary KEY VALUES")
    method = method_config.stem
    keys = [key for key, _ in vary]
    if len(set(keys)) != len(keys) or ({"DISTILL.ALPHA", "DISTILL.BETA"} & set(keys) and points):
        raise ConfigError("each swept key once: --vary repeats a key, or sweeps DISTILL.ALPHA/BETA besides --alpha")
    fixed = set(opts[0::2]) & (set(keys) | ({"DISTILL.ALPHA", "DISTILL.BETA"} if points else set()))
    if fixed:
        raise ConfigError(f"{', '.join(sorted(fixed))} is swept and also set in the KEY VALUE overrides; "
                          "drop one of the two")
    base = build_config(files, list(opts))  # bad keys/values fail here, once
    ab = ["DATASET.SUBSAMPLE_CLASSES", "base", *_ab_overrides(base, method)] if points else []
    variants: list[tuple[str, list[str]]] = [(method, [])]
    for key, text in vary:
        values = vary_values(key, text)
        short = key.split(".")[-1].lower()
        variants = [(f"{name}+{short}{v}", [*over, key, v]) for name, over in variants for v in values]
    cells = []
    for name, over in variants:
        for point in [*points] or [None]:
            folder = Path(output) / name / dataset
            extra: list[str] = []
            if point is not None:
                folder = folder / cell_dir(*point)
                extra = [*ab, "DISTILL.ALPHA", repr(point[0]), "DISTILL.BETA", repr(point[1])]
            overrides = (*extra, *over, *opts)
            cells += [Cell(folder / seed_dir(seed), seed, overrides) for seed in seeds]
        _check_loss(build_config(files, list(overrides)))
    folders: dict[Path, Cell] = {}
    for cell in cells:
        if cell.out in folders:
            raise ConfigError(f"two cells would share the folder {cell.out} (their values differ beyond the 6 "
                              "significant digits a folder name keeps); use a larger STEP")
        folders[cell.out] = cell
    return Grid(files, cells)


def _check_loss(cfg: CfgNode) -> None:
    """A swept key the loss does not take fails the sweep now, not once per cell."""
    from clipkd.losses import build_distill_loss_from_cfg  # torch: only when a sweep is built

    if cfg.DISTILL.OBJECTIVE in ("kd", "kgcoop") and cfg.DISTILL.WEIGHT > 0:
        build_distill_loss_from_cfg(cfg)


@dataclass
class SweepSummary:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"sweep: {len(self.done)} done, {len(self.skipped)} skipped (finished before), "
               f"{len(self.failed)} failed"]
        out += [f"  failed {path}: {reason}" for path, reason in self.failed]
        return out


def run_grid(grid: Grid, root: str, *, echo: bool = False, fused: bool = False) -> SweepSummary:
    """Run every cell in this process; a failed cell is recorded and the sweep goes on. ``fused``: the cells
    that share a data stream train together, one loader and one teacher forward per batch for all of them
    (:mod:`clipkd.runs.fused`); each still writes exactly its own folder."""
    from clipkd.runs.fused import fit_fused, group_cells  # torch and open_clip: only when a sweep runs
    from clipkd.runs.run import Run

    configs = [grid.config(cell, root) for cell in grid.cells]  # a bad override or root fails the sweep now
    summary = SweepSummary()
    n = len(grid.cells)
    for group in group_cells(configs) if fused else [[i] for i in range(n)]:
        cells, resume = [], []
        for i in group:  # checked when the group's turn comes: another process may have finished a cell
            out = grid.cells[i].out
            try:
                plan = RunDir(out).plan(configs[i])
            except ClipkdError as exc:  # finished or started with another config: named, never skipped
                summary.failed.append((out, str(exc)))
                log.warning(f"[{i + 1}/{n}] failed {out}: {exc}")
                continue
            if plan == "finished":
                log.info(f"[{i + 1}/{n}] skip {out} (finished)")
                summary.skipped.append(out)
            else:
                cells.append(i)
                resume.append(plan == "resume")
        if not cells:
            continue
        together = f" (fused: {len(cells)} cells, one teacher forward per batch)" if len(cells) > 1 else ""
        for i, again in zip(cells, resume):
            log.info(f"[{i + 1}/{n}] {'resume' if again else 'run'} {grid.cells[i].out}{together}")
        runs = [Run(configs[i], grid.cells[i].out, echo=echo) for i in cells]
        if len(runs) > 1:
            outcomes = fit_fused(runs, resume)
        else:
            try:
                outcomes = [runs[0].fit(resume=resume[0])]
            except Exception as exc:  # noqa: BLE001 - one broken cell must not end the sweep
                outcomes = [exc]
        for i, outcome in zip(cells, outcomes):
            out = grid.cells[i].out
            if not isinstance(outcome, Exception):
                summary.done.append(out)
                continue
            if isinstance(outcome, ClipkdError):
                reason = str(outcome)
            else:
                log.debug("cell %s failed:\n%s", out, "".join(traceback.format_exception(outcome)))
                first = str(outcome).strip().splitlines()[0] if str(outcome).strip() else ""
                reason = f"{type(outcome).__name__}: {first}"
            summary.failed.append((out, reason))
            log.warning(f"[{i + 1}/{n}] failed {out}: {reason}")
    return summary
