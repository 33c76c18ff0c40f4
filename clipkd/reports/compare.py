"""Method A vs method B: paired differences with bootstrap confidence intervals (``clipkd report --compare A B``).

Only the datasets and seeds both methods have are compared. Per dataset, one bootstrap replicate draws the
seeds with replacement and, within each drawn seed, the test images with replacement; A and B get the SAME
image draw (both were evaluated on the same test list), so the interval is of the paired difference. Images
are drawn as counts: with per-image correctness of A and B, an image is one of four kinds (both right, only A,
only B, neither), and drawing N images with replacement is one multinomial draw of the four counts. That is
exactly the image bootstrap, costs nothing per image, and makes 10,000 replicates over ImageNet-size test sets
a matter of milliseconds. Runs without a predictions.npz (or with one that does not match its results.json,
which is named) fall back to resampling seeds only, and the row says so.

A replicate's HM is the HM of its mean Base and mean New; the average row's replicate is the mean over
datasets of the per-dataset replicate means (datasets are fixed, not resampled), and its HM the HM of those
two means, as the report's average row. The interval is the percentile interval of the replicates; the
verdict of a row is on HM: "A better" / "B better" when the interval excludes 0, else "not resolved". Beside
it, a paired t-test over seeds (scipy.stats.ttest_rel) on per-seed HMs, where there are at least 2 seeds.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from clipkd.errors import ClipkdError
from clipkd.reports.aggregate import dataset_name, dataset_order
from clipkd.reports.collect import RunRecord
from clipkd.reports.predictions import PREDICTIONS_FILE, PredictionsError, read_predictions
from clipkd.reports.render import md_row

METRICS = ("base", "new", "hm")
IMAGES = "seeds and images"
SEEDS_ONLY = "seeds only"


def hm(base: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Element-wise harmonic mean (0 where both are 0), as clipkd.metrics.harmonic_mean."""
    total = base + new
    return np.where(total > 0, 2 * base * new / np.where(total > 0, total, 1), 0.0)


@dataclass
class Delta:
    """A - B on one metric: the observed difference and its percentile interval."""

    value: float
    low: float | None  # None when no interval can be drawn (1 seed and no predictions)
    high: float | None

    @property
    def resolved(self) -> int:
        """+1 when the interval is above 0, -1 below, 0 when it holds 0 (or there is none)."""
        if self.low is None or self.high is None:
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


@dataclass
class Row:
    name: str
    seeds: tuple[int, ...]
    deltas: dict[str, Delta]
    p_value: dict[str, float | None]  # paired t-test over seeds; None when n/a
    p_note: str  # why there is no p-value ("" when there is one)
    resampled: str  # IMAGES, SEEDS_ONLY, or for the average row a count
    notes: list[str] = field(default_factory=list)  # why a row fell back to seeds only

    def verdict(self, a: str, b: str) -> str:
        side = self.deltas["hm"].resolved
        return f"{a} better" if side > 0 else f"{b} better" if side < 0 else "not resolved"


@dataclass
class Comparison:
    a: str
    b: str
    rows: list[Row]
    average: Row | None
    resamples: int
    seed: int
    level: float
    left_out: list[str]  # datasets/seeds only one method has


# ---------------------------------------------------------------- inputs
def _runs_by_key(runs: list[RunRecord], method: str) -> dict[str, dict[int, RunRecord]]:
    out: dict[str, dict[int, RunRecord]] = {}
    for r in runs:
        if r.method == method:
            out.setdefault(r.dataset, {})[r.seed] = r  # type: ignore[index]
    return out


def _inventory(name: str, by: dict[str, dict[int, RunRecord]]) -> str:
    parts = [f"{d} (seeds {', '.join(map(str, sorted(s)))})" for d, s in
             sorted(by.items(), key=lambda kv: dataset_order(kv[0]))]
    return f"{name}: {'; '.join(parts) if parts else 'no runs'}"


def _counts(ra: RunRecord, rb: RunRecord) -> tuple[dict[str, np.ndarray] | None, str]:
    """Per half, the counts of (both right, only A, only B, neither) on the seed's test list; or None and why."""
    for r in (ra, rb):
        if not (r.path / PREDICTIONS_FILE).is_file():
            return None, f"no {PREDICTIONS_FILE} in {r.path}"
    try:
        pa, pb = read_predictions(ra.path), read_predictions(rb.path)
    except PredictionsError as exc:
        return None, str(exc)
    out = {}
    for half in ("base", "new"):
        if half not in pa or half not in pb:
            return None, f"{ra.path / PREDICTIONS_FILE} or {rb.path / PREDICTIONS_FILE} has no {half} half"
        la, lb = pa[half]["label"], pb[half]["label"]
        if la.shape != lb.shape or not np.array_equal(la, lb):
            return None, (f"{ra.path / PREDICTIONS_FILE} and {rb.path / PREDICTIONS_FILE}: the {half} test lists "
                          "differ (labels), so images cannot be paired")
        ca, cb = pa[half]["pred"] == la, pb[half]["pred"] == lb
        out[half] = np.array([np.count_nonzero(ca & cb), np.count_nonzero(ca & ~cb),
                              np.count_nonzero(~ca & cb), np.count_nonzero(~ca & ~cb)], dtype=np.int64)
    return out, ""


@dataclass
class _Dataset:
    stem: str
    seeds: tuple[int, ...]
    acc: dict[str, np.ndarray]  # "a.base", "b.new", ...: per-seed accuracy (%) from results.json
    counts: dict[str, np.ndarray] | None  # per half: [seeds, 4]; None: seeds only
    note: str


def _gather(runs: list[RunRecord], a: str, b: str) -> tuple[list[_Dataset], list[str]]:
    methods = sorted({r.method for r in runs})
    unknown = [m for m in (a, b) if m not in methods]
    if unknown:
        raise ClipkdError(f"--compare: no base-to-new runs of {' or '.join(unknown)} here; methods here: "
                          f"{', '.join(methods) if methods else 'none'}")
    if a == b:
        raise ClipkdError(f"--compare {a} {b}: name two different methods (methods here: {', '.join(methods)})")
    by_a, by_b = _runs_by_key(runs, a), _runs_by_key(runs, b)
    out, left_out = [], []
    for stem in sorted(set(by_a) | set(by_b), key=dataset_order):
        sa, sb = set(by_a.get(stem, {})), set(by_b.get(stem, {}))
        common = tuple(sorted(sa & sb))
        only = [f"{m} seed {s}" for m, ss in ((a, sa - sb), (b, sb - sa)) for s in sorted(ss)]
        if not common:
            left_out.append(f"{stem}: only {a if sa else b} has runs")
            continue
        if only:
            left_out.append(f"{stem}: {', '.join(only)} (no partner)")
        pairs = [(by_a[stem][s], by_b[stem][s]) for s in common]
        acc = {f"{m}.{h}": np.array([p[i].results[h] for p in pairs], dtype=float)  # type: ignore[index]
               for i, m in enumerate("ab") for h in ("base", "new")}
        counts, note = {"base": [], "new": []}, ""
        for ra, rb in pairs:
            c, note = _counts(ra, rb)
            if c is None:
                break
            for h in ("base", "new"):
                counts[h].append(c[h])
        out.append(_Dataset(stem, common, acc,
                            None if note else {h: np.stack(v) for h, v in counts.items()}, note))
    if not out:
        raise ClipkdError(f"--compare {a} {b}: no dataset and seed that both have; {_inventory(a, by_a)}; "
                          f"{_inventory(b, by_b)}")
    return out, left_out


# ---------------------------------------------------------------- bootstrap
def _replicates(d: _Dataset, rng: np.random.Generator, resamples: int) -> dict[str, np.ndarray]:
    """Per replicate, the mean Base and New of A and of B over the drawn seeds ("a.base", ...: [resamples])."""
    k = len(d.seeds)
    pick = rng.integers(0, k, size=(resamples, k))
    out = {}
    for h in ("base", "new"):
        if d.counts is None:
            for m in "ab":
                out[f"{m}.{h}"] = d.acc[f"{m}.{h}"][pick].mean(axis=1)
            continue
        c = d.counts[h]  # [k, 4]
        n = c.sum(axis=1)
        draw = rng.multinomial(n[pick], (c / np.maximum(n, 1)[:, None])[pick])  # [resamples, k, 4]
        size = np.maximum(n[pick], 1)
        out[f"a.{h}"] = (100.0 * (draw[..., 0] + draw[..., 1]) / size).mean(axis=1)
        out[f"b.{h}"] = (100.0 * (draw[..., 0] + draw[..., 2]) / size).mean(axis=1)
    return out


def _deltas(observed: dict[str, float], reps: dict[str, np.ndarray], level: float, has_ci: bool) -> dict:
    rep = {"base": reps["a.base"] - reps["b.base"], "new": reps["a.new"] - reps["b.new"],
           "hm": hm(reps["a.base"], reps["a.new"]) - hm(reps["b.base"], reps["b.new"])}
    obs = {"base": observed["a.base"] - observed["b.base"], "new": observed["a.new"] - observed["b.new"],
           "hm": float(hm(np.float64(observed["a.base"]), np.float64(observed["a.new"]))
                       - hm(np.float64(observed["b.base"]), np.float64(observed["b.new"])))}
    tail = 100 * (1 - level) / 2
    out = {}
    for m in METRICS:
        low, high = (np.percentile(rep[m], [tail, 100 - tail]) if has_ci else (None, None))
        out[m] = Delta(float(obs[m]), None if low is None else float(low), None if high is None else float(high))
    return out


def _paired_test(per_seed: dict[str, np.ndarray]) -> tuple[dict[str, float | None], str]:
    """ttest_rel of A vs B over seeds on Base, New and per-seed HM."""
    n = len(per_seed["a.base"])
    if n < 2:
        return {m: None for m in METRICS}, "n/a (1 seed)"
    values = {m: (per_seed[f"a.{m}"], per_seed[f"b.{m}"]) for m in ("base", "new")}
    values["hm"] = (hm(per_seed["a.base"], per_seed["a.new"]), hm(per_seed["b.base"], per_seed["b.new"]))
    out: dict[str, float | None] = {}
    for m, (x, y) in values.items():
        diff = x - y
        out[m] = None if np.all(diff == diff[0]) else float(stats.ttest_rel(x, y).pvalue)
    note = "" if out["hm"] is not None else "n/a (Δ the same on every seed)"
    return out, note


def compare(runs: list[RunRecord], a: str, b: str, *, resamples: int = 10_000, seed: int = 0,
            level: float = 0.95) -> Comparison:
    """A vs B over the datasets and seeds both have (``runs``: complete base-to-new runs, sorted out)."""
    if resamples < 1:
        raise ClipkdError(f"--resamples {resamples}: give a positive number of bootstrap replicates (e.g. 10000)")
    datasets, left_out = _gather(runs, a, b)
    rng = np.random.default_rng(seed)
    rows, all_reps = [], []
    for d in datasets:
        reps = _replicates(d, rng, resamples)
        all_reps.append(reps)
        has_ci = d.counts is not None or len(d.seeds) > 1
        observed = {k: float(v.mean()) for k, v in d.acc.items()}
        p, p_note = _paired_test(d.acc)
        notes = [d.note] if d.note else []
        if not has_ci:
            notes.append("no interval: 1 seed and no per-image predictions")
        rows.append(Row(dataset_name(d.stem), d.seeds, _deltas(observed, reps, level, has_ci), p, p_note,
                        IMAGES if d.counts is not None else SEEDS_ONLY, notes))
    average = None
    if len(datasets) > 1:
        mean_reps = {k: np.mean([r[k] for r in all_reps], axis=0) for k in all_reps[0]}
        observed = {k: float(np.mean([d.acc[k].mean() for d in datasets])) for k in datasets[0].acc}
        shared = sorted(set.intersection(*(set(d.seeds) for d in datasets)))
        per_seed = {k: np.array([np.mean([d.acc[k][d.seeds.index(s)] for d in datasets]) for s in shared])
                    for k in datasets[0].acc}
        p, p_note = _paired_test(per_seed)
        if not shared:
            p_note = "n/a (no seed common to all datasets)"
        fallback = sum(d.counts is None for d in datasets)
        how = IMAGES if not fallback else f"{SEEDS_ONLY} on {fallback} of {len(datasets)} datasets"
        has_ci = all(d.counts is not None or len(d.seeds) > 1 for d in datasets)
        average = Row(f"Average ({len(datasets)} datasets)", tuple(shared), _deltas(observed, mean_reps, level, has_ci),
                      p, p_note, how)
    return Comparison(a, b, rows, average, resamples, seed, level, left_out)


# ---------------------------------------------------------------- rendering
def _ci(d: Delta) -> str:
    if d.low is None or d.high is None:
        return f"{d.value:+.2f} (n/a)"
    return f"{d.value:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"


def _p(row: Row) -> str:
    p = row.p_value["hm"]
    return row.p_note if p is None else f"{p:.3f}"


def compare_markdown(c: Comparison) -> str:
    pct = f"{100 * c.level:g}%"
    header = ["Dataset", "Seeds", f"Δ Base [{pct} CI]", f"Δ New [{pct} CI]", f"Δ HM [{pct} CI]", "p (paired t, HM)",
              "Verdict (HM)", "Resampled"]
    body = []
    for r in c.rows + ([c.average] if c.average else []):
        name = f"**{r.name}**" if r is c.average else r.name
        body.append([name, ", ".join(map(str, r.seeds)) or "—", _ci(r.deltas["base"]), _ci(r.deltas["new"]),
                     _ci(r.deltas["hm"]), _p(r), r.verdict(c.a, c.b), r.resampled])
    lines = [f"### {c.a} vs {c.b}", "",
             md_row(header), "|---|---|" + "---:|" * 4 + "---|---|"]
    lines += [md_row(row) for row in body]
    lines += ["", f"Δ = {c.a} - {c.b} (accuracy points) on the datasets and seeds both have. CI: paired bootstrap "
                  f"({c.resamples} replicates, --seed {c.seed}) resampling seeds and, within each seed, test images "
                  "(the same images for both methods); 'seeds only' rows had no usable predictions.npz and resample "
                  "seeds alone. HM of a replicate: HM of its mean Base and mean New. Average: the mean over datasets "
                  "of each replicate's per-dataset means, and the HM of those; its t-test is over the seeds common "
                  "to all datasets, on the dataset-averaged values. Verdict: on HM, a method is better when the CI "
                  "excludes 0."]
    notes = compare_notes(c)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def compare_notes(c: Comparison) -> list[str]:
    """Why rows resampled seeds only (files named), and the datasets/seeds only one method has."""
    return [f"- {r.name}: {n}" for r in c.rows for n in r.notes] + [f"- left out: {x}" for x in c.left_out]


def _row_dict(r: Row, c: Comparison) -> dict:
    return {"seeds": list(r.seeds), "resampled": r.resampled, "verdict": r.verdict(c.a, c.b), "notes": r.notes,
            "delta": {m: {"value": d.value, "low": d.low, "high": d.high} for m, d in r.deltas.items()},
            "p_value": r.p_value, "p_note": r.p_note}


def compare_dict(c: Comparison) -> dict:
    return {"a": c.a, "b": c.b, "level": c.level, "resamples": c.resamples, "seed": c.seed,
            "datasets": {r.name: _row_dict(r, c) for r in c.rows},
            "average": _row_dict(c.average, c) if c.average else None, "left_out": c.left_out}


def compare_csv(c: Comparison) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["a", "b", "dataset", "seeds", *(f"delta_{m}{s}" for m in METRICS for s in ("", "_low", "_high")),
                *(f"p_{m}" for m in METRICS), "verdict", "resampled"])
    for r in c.rows + ([c.average] if c.average else []):
        values = [x for m in METRICS for x in (r.deltas[m].value, r.deltas[m].low, r.deltas[m].high)]
        w.writerow([c.a, c.b, r.name, " ".join(map(str, r.seeds)),
                    *("" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values),
                    *("" if r.p_value[m] is None else r.p_value[m] for m in METRICS), r.verdict(c.a, c.b),
                    r.resampled])
    return buf.getvalue()
