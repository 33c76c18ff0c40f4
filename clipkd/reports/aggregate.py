"""Aggregate runs over seeds, the way the published tables do (PROTOCOL.md section 1).

Per (method, dataset): Base and New mean and population std (ddof=0) over seeds, and HM of the two means.
Average row: mean over datasets of the dataset mean Base and mean New, and HM of those two means
(not the mean of per-dataset HMs).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from clipkd.data.specs import DATASETS, STEMS
from clipkd.metrics import harmonic_mean  # torch-free, shared with the evaluator
from clipkd.reports.collect import RunRecord


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # population std, ddof=0
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.fmean(values), statistics.pstdev(values), len(values))


@dataclass(frozen=True)
class DatasetRow:
    stem: str
    name: str  # Dassl NAME
    base: Stat
    new: Stat
    seeds: tuple[int, ...]

    @property
    def hm(self) -> float:
        return harmonic_mean(self.base.mean, self.new.mean)


@dataclass(frozen=True)
class Average:
    base: float
    new: float
    n_datasets: int

    @property
    def hm(self) -> float:
        return harmonic_mean(self.base, self.new)


@dataclass
class MethodTable:
    method: str
    rows: list[DatasetRow] = field(default_factory=list)

    @property
    def average(self) -> Average | None:
        if not self.rows:
            return None
        k = len(self.rows)
        return Average(sum(r.base.mean for r in self.rows) / k, sum(r.new.mean for r in self.rows) / k, k)


def dataset_name(stem: str) -> str:
    spec = DATASETS.get(stem)
    return spec.name if spec else stem


def dataset_order(stem: str) -> tuple[int, str]:
    """Benchmark order (as in the papers' tables), unknown datasets last, alphabetically."""
    return (STEMS.index(stem), "") if stem in STEMS else (len(STEMS) + (stem != "toy"), stem)


def _group(runs: list[RunRecord], key) -> dict:  # noqa: ANN001
    out: dict = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def base_to_new_tables(runs: list[RunRecord]) -> list[MethodTable]:
    """One table per method (sorted), rows in benchmark order. ``runs`` must be complete base-to-new runs."""
    tables = []
    for method, mruns in sorted(_group(runs, lambda r: r.method).items()):
        table = MethodTable(method)
        for stem, druns in sorted(_group(mruns, lambda r: r.dataset).items(), key=lambda kv: dataset_order(kv[0])):
            druns = sorted(druns, key=lambda r: r.seed)
            table.rows.append(DatasetRow(
                stem, dataset_name(stem),
                Stat.of([r.results["base"] for r in druns]), Stat.of([r.results["new"] for r in druns]),
                tuple(r.seed for r in druns)))
        tables.append(table)
    return tables


@dataclass(frozen=True)
class FewShotRow:
    stem: str
    name: str
    acc: Stat
    seeds: tuple[int, ...]


@dataclass
class FewShotTable:
    method: str
    shots: int
    rows: list[FewShotRow] = field(default_factory=list)

    @property
    def average(self) -> float | None:
        return sum(r.acc.mean for r in self.rows) / len(self.rows) if self.rows else None


def fewshot_tables(runs: list[RunRecord]) -> list[FewShotTable]:
    """One table per (method, K): accuracy mean/std over seeds per dataset; average = mean of dataset means."""
    tables = []
    for (method, shots), kruns in sorted(_group(runs, lambda r: (r.method, r.shots)).items()):
        table = FewShotTable(method, shots)
        for stem, druns in sorted(_group(kruns, lambda r: r.dataset).items(), key=lambda kv: dataset_order(kv[0])):
            druns = sorted(druns, key=lambda r: r.seed)
            table.rows.append(FewShotRow(stem, dataset_name(stem), Stat.of([r.results["all"] for r in druns]),
                                         tuple(r.seed for r in druns)))
        tables.append(table)
    return tables


@dataclass(frozen=True)
class SweepCell:
    alpha: float
    beta: float
    base: Stat
    new: Stat

    @property
    def hm(self) -> float:
        """HM of the seed-mean Base and New (as the per-dataset HM of the tables)."""
        return harmonic_mean(self.base.mean, self.new.mean)


@dataclass
class Sweep:
    method: str
    stem: str
    cells: list[SweepCell] = field(default_factory=list)

    @property
    def name(self) -> str:
        return dataset_name(self.stem)

    @property
    def alphas(self) -> list[float]:
        return sorted({c.alpha for c in self.cells})

    @property
    def betas(self) -> list[float]:
        return sorted({c.beta for c in self.cells})

    def cell(self, alpha: float, beta: float) -> SweepCell | None:
        return next((c for c in self.cells if c.alpha == alpha and c.beta == beta), None)

    @property
    def best(self) -> SweepCell | None:
        """Highest HM; ties go to the first cell in (alpha, beta) order."""
        return max(sorted(self.cells, key=lambda c: (c.alpha, c.beta)), key=lambda c: c.hm, default=None)


def sweeps(runs: list[RunRecord]) -> list[Sweep]:
    """One sweep per (method, dataset); ``runs`` must be complete sweep runs."""
    out = []
    groups = _group(runs, lambda r: (r.method, r.dataset))
    for (method, stem), sruns in sorted(groups.items(), key=lambda kv: (kv[0][0], dataset_order(kv[0][1]))):
        sweep = Sweep(method, stem)
        for (alpha, beta), cruns in sorted(_group(sruns, lambda r: (r.alpha, r.beta)).items()):
            sweep.cells.append(SweepCell(alpha, beta, Stat.of([r.results["base"] for r in cruns]),
                                         Stat.of([r.results["new"] for r in cruns])))
        out.append(sweep)
    return out
