"""Aggregate runs over seeds, the way the published tables do (PROTOCOL.md section 1).

Per (method, dataset): Base and New mean and standard deviation over seeds, and HM of the two means. The std is
the sample std (ddof 1) unless ``ddof=0`` asks for the population std that Dassl's parse_test_res.py prints (it
understates the spread of 3 seeds); with fewer values than ddof + 1 it is None (never NaN). Each Stat also has the
half-width of a t-based 95% confidence interval of its mean (None under 2 values).
Average row: mean over datasets of the dataset mean Base and mean New, and HM of those two means, as the papers
(not the mean of per-dataset HMs, which is given beside it).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from clipkd.data.specs import DATASETS, STEMS
from clipkd.metrics import harmonic_mean  # torch-free, shared with the evaluator
from clipkd.reports.collect import RunRecord


SAMPLE, POPULATION = 1, 0  # the ddof of --std sample (default) and --std population (Dassl's)
CI_LEVEL = 0.95


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # std with ``ddof``; None when there are too few values for it (one seed, ddof 1)
    n: int
    ddof: int = SAMPLE
    sample_std: float | None = None  # ddof 1 whatever ``ddof`` is: what the confidence interval needs
    # the values averaged, in the order given (seed order in the tables): the figures derive per-seed HM and
    # seed-wise averages over datasets from them
    values: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: list[float], ddof: int = SAMPLE) -> "Stat":
        n = len(values)
        sample = statistics.stdev(values) if n > 1 else None
        std = sample if ddof == SAMPLE else statistics.pstdev(values)
        return cls(statistics.fmean(values), std, n, ddof, sample, tuple(values))

    @property
    def ci95(self) -> float | None:
        """Half-width of the t-based 95% CI of the mean, t(0.975, n-1) s / sqrt(n); None under 2 values."""
        if self.sample_std is None:
            return None
        from scipy.stats import t  # torch-free; imported only where a CI is asked for

        return float(t.ppf(0.5 + CI_LEVEL / 2, self.n - 1)) * self.sample_std / math.sqrt(self.n)


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
    mean_hm: float  # the mean of the per-dataset HMs (beside the papers' HM of the mean Base and mean New)

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
        return Average(sum(r.base.mean for r in self.rows) / k, sum(r.new.mean for r in self.rows) / k, k,
                       sum(r.hm for r in self.rows) / k)


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


def base_to_new_tables(runs: list[RunRecord], ddof: int = SAMPLE) -> list[MethodTable]:
    """One table per method (sorted), rows in benchmark order. ``runs`` must be complete base-to-new runs."""
    tables = []
    for method, mruns in sorted(_group(runs, lambda r: r.method).items()):
        table = MethodTable(method)
        for stem, druns in sorted(_group(mruns, lambda r: r.dataset).items(), key=lambda kv: dataset_order(kv[0])):
            druns = sorted(druns, key=lambda r: r.seed)
            table.rows.append(DatasetRow(
                stem, dataset_name(stem),
                Stat.of([r.results["base"] for r in druns], ddof), Stat.of([r.results["new"] for r in druns], ddof),
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


def fewshot_tables(runs: list[RunRecord], ddof: int = SAMPLE) -> list[FewShotTable]:
    """One table per (method, K): accuracy mean/std over seeds per dataset; average = mean of dataset means."""
    tables = []
    for (method, shots), kruns in sorted(_group(runs, lambda r: (r.method, r.shots)).items()):
        table = FewShotTable(method, shots)
        for stem, druns in sorted(_group(kruns, lambda r: r.dataset).items(), key=lambda kv: dataset_order(kv[0])):
            druns = sorted(druns, key=lambda r: r.seed)
            table.rows.append(FewShotRow(stem, dataset_name(stem), Stat.of([r.results["all"] for r in druns], ddof),
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


def sweeps(runs: list[RunRecord], ddof: int = SAMPLE) -> list[Sweep]:
    """One sweep per (method, dataset); ``runs`` must be complete sweep runs."""
    out = []
    groups = _group(runs, lambda r: (r.method, r.dataset))
    for (method, stem), sruns in sorted(groups.items(), key=lambda kv: (kv[0][0], dataset_order(kv[0][1]))):
        sweep = Sweep(method, stem)
        for (alpha, beta), cruns in sorted(_group(sruns, lambda r: (r.alpha, r.beta)).items()):
            sweep.cells.append(SweepCell(alpha, beta, Stat.of([r.results["base"] for r in cruns], ddof),
                                         Stat.of([r.results["new"] for r in cruns], ddof)))
        out.append(sweep)
    return out
