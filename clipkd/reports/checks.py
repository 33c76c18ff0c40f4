"""Warnings about the runs a report averages: what a table's numbers alone do not show.

- a run whose final model is its first epoch although it trained more (collapse, or a selection gone wrong);
- a seed far from the others (robust rule: more than 3 scaled MADs, 1.4826 x the median absolute deviation, from
  the median of the seeds, and more than 1 point; needs 3 seeds);
- missing seeds: a dataset (sweep: a cell) with fewer seeds than its table has elsewhere;
- runs selected on base TEST (reported apart, but their numbers are optimistic);
- tables compared on different dataset/seed sets (their averages are over different runs).

The same rules serve every report: the first-epoch and base-test checks read the runs that trained (their
profile, their method name), the other three the values a table averages. In the base-to-new, few-shot and sweep
tables those are the runs themselves; in the transfer tables (reports/transfer.py) a value is one column of one
seed: the source run's accuracy, or a target's (an evaluation of the source run, or a run of its own), given as a
RunRecord whose dataset is the column and whose results hold that one accuracy.

Torch-free; every check reads what collect.sort_out already put in the runs (results, profile).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Hashable
from pathlib import Path

from clipkd.reports.collect import BASE_TEST_MARK, KIND_FEWSHOT, KIND_SWEEP, Problem, RunRecord

MAD_SCALE = 1.4826  # makes the MAD estimate the std of normal data
OUTLIER_MADS = 3.0
OUTLIER_MIN_POINTS = 1.0  # never flag a seed less than this far from the median (seeds that agree to the digit)
RULE = (f"more than {OUTLIER_MADS:g} scaled MADs ({MAD_SCALE} x median absolute deviation) from the median of the "
        f"seeds and more than {OUTLIER_MIN_POINTS:g} point")


def _common(paths: list[Path]) -> Path:
    return Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0]


def _group(runs: list[RunRecord], key: Callable[[RunRecord], Hashable]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def _seeds(seeds: object) -> str:
    return ", ".join(str(s) for s in sorted(seeds))  # type: ignore[call-overload]


def first_epoch(runs: list[RunRecord]) -> list[Problem]:
    out = []
    for r in runs:
        p = r.profile
        if p is not None and p.epoch == 1 and p.max_epoch is not None and p.max_epoch > 1:
            out.append(Problem(r.path, f"its final model is epoch 1 of {p.max_epoch} (results.json \"epoch\" 1, "
                                       f"selected on {p.selection}): training may have collapsed; see its log.txt"))
    return out


def outlier_seeds(runs: list[RunRecord]) -> list[Problem]:
    """Each seed of a (method, dataset[, K, cell]) with 3 or more seeds, per half, against RULE."""
    out = []
    for group in _group(runs, lambda r: (r.method, r.dataset, r.shots, r.alpha, r.beta)).values():
        if len(group) < 3:
            continue
        for half in group[0].results:
            values = [r.results[half] for r in group]
            med = statistics.median(values)
            mad = statistics.median(abs(v - med) for v in values)
            limit = max(OUTLIER_MADS * MAD_SCALE * mad, OUTLIER_MIN_POINTS)
            for r, v in zip(group, values):
                if abs(v - med) > limit:
                    what = "accuracy" if half == "all" else f"{half} accuracy"  # all classes: few-shot, transfer
                    out.append(Problem(r.path, f"seed {r.seed} is far from the others: {what} {v:.2f} is "
                                               f"{abs(v - med):.2f} points from the median {med:.2f} of the "
                                               f"{len(group)} seeds (MAD {mad:.2f}; rule: {RULE}); it is in the mean"))
    return out


def _table(kind: str) -> tuple[Callable[[RunRecord], Hashable], Callable[[RunRecord], Hashable], str]:
    """A run's table, its row in that table, and what a row is called."""
    if kind == KIND_SWEEP:
        return (lambda r: (r.method, r.dataset)), (lambda r: (r.alpha, r.beta)), "cell"
    if kind == KIND_FEWSHOT:
        return (lambda r: (r.method, r.shots)), (lambda r: r.dataset), "dataset"
    return (lambda r: r.method), (lambda r: r.dataset), "dataset"


def _row_name(row: Hashable, what: str) -> str:
    if what == "cell":
        alpha, beta = row  # type: ignore[misc]
        return f"cell alpha={alpha:g}, beta={beta:g}"
    return str(row)


def missing_seeds(runs: list[RunRecord], kind: str) -> list[Problem]:
    table_of, row_of, what = _table(kind)
    out = []
    for trun in _group(runs, table_of).values():
        every = {r.seed for r in trun}
        for row, rruns in _group(trun, row_of).items():
            have = {r.seed for r in rruns}
            if have != every:
                out.append(Problem(_common([r.path for r in rruns]),
                                   f"missing seeds: {rruns[0].method} has seed(s) {_seeds(have)} on "
                                   f"{_row_name(row, what)} but {_seeds(every)} on other {what}s; seed(s) "
                                   f"{_seeds(every - have)} missing, so its mean is over fewer seeds"))
    return out


def base_test_selected(runs: list[RunRecord]) -> list[Problem]:
    out = []
    for (method, _), group in _group([r for r in runs if BASE_TEST_MARK in r.method],
                                     lambda r: (r.method, r.dataset)).items():
        out.append(Problem(_common([r.path for r in group]),
                           f"{len(group)} run(s) selected on base TEST (TEST.FINAL_MODEL best_base_test, the "
                           f"reference code's choice): optimistic numbers, reported apart as '{method}'"))
    return out


def different_sets(runs: list[RunRecord], kind: str) -> list[Problem]:
    """Tables (methods; few-shot: per K) whose (dataset, seed) sets differ: one warning per comparison."""
    if kind == KIND_SWEEP:
        return []  # one table per (method, dataset): nothing is compared across methods
    table_of, row_of, _ = _table(kind)
    out = []
    by_k = _group(runs, lambda r: r.shots)
    for shots, kruns in sorted(by_k.items(), key=lambda kv: kv[0] or 0):
        tables = {t: {(row_of(r), r.seed) for r in truns} for t, truns in _group(kruns, table_of).items()}
        if len(tables) < 2 or len({frozenset(v) for v in tables.values()}) == 1:
            continue
        union = set().union(*tables.values())
        lacks = []
        for t, have in sorted(tables.items(), key=lambda kv: str(kv[0])):
            gone = union - have
            if gone:
                rows = _group_pairs(gone)
                name = t if kind != KIND_FEWSHOT else t[0]  # type: ignore[index]
                lacks.append(f"{name} lacks " + ", ".join(f"{row} seed(s) {_seeds(s)}" for row, s in rows.items()))
        where = f" at {shots} shots" if kind == KIND_FEWSHOT else ""
        out.append(Problem(_common([r.path for r in kruns]),
                           f"methods compared on different dataset/seed sets{where}: {'; '.join(lacks)}; their "
                           "averages are over different runs (compare on the datasets and seeds all have)"))
    return out


def _group_pairs(pairs: set) -> dict:
    out: dict = {}
    for row, seed in sorted(pairs, key=lambda p: (str(p[0]), p[1])):
        out.setdefault(row, set()).add(seed)
    return out


def warnings(runs: list[RunRecord], kind: str, values: list[RunRecord] | None = None) -> list[Problem]:
    """Every warning about ``runs`` (complete runs of ``kind``, as collect.sort_out kept them) and the ``values``
    their table averages (default: the runs themselves; transfer tables: one per column and seed, see above)."""
    values = runs if values is None else values
    return (first_epoch(runs) + outlier_seeds(values) + missing_seeds(values, kind) + base_test_selected(runs)
            + different_sets(values, kind))
