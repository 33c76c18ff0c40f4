"""What the student's output distribution looks like on the test images (``clipkd analyze``): the quantities
ABKD's argument is about, from each run's ``predictions.npz``, side by side for several runs.

Per run and half: accuracy, mean confidence (the top probability), mean probability of the label, mean entropy
(nats), mean mass outside the top 5, agreement with the teacher's prediction (only where the run recorded it:
TEST.TEACHER_PREDICTIONS True) and the expected calibration error. Probabilities are shown in % like accuracy.

ECE: the confidences are cut into B equal-width bins (i/B, (i+1)/B] (a confidence of 0 falls in the first);
ECE = sum over bins of (n_b / n) * |acc_b - conf_b|, where acc_b is the fraction of the bin's images predicted
correctly and conf_b their mean confidence (Guo et al., 2017). The reliability diagram is (conf_b, acc_b) per
non-empty bin.

A group of seed runs (the ``seed<S>`` folders of one folder) is shown as the mean over its runs of each run's
value (ECE included), with the sample std; its reliability diagram pools the images of all its runs. Torch-free.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipkd.errors import ClipkdError
from clipkd.rundir import PREDICTIONS_FILE, RESULTS_FILE, SEED_DIR, TEACHER_PRED
from clipkd.reports.collect import KIND_ATTRS, collect, read_profile
from clipkd.reports.predictions import HALVES, read_predictions
from clipkd.reports.render import md_row

DEFAULT_BINS = 15
# (key, header in tables): every value in % but entropy (nats) and n
QUANTITIES = (("accuracy", "acc"), ("confidence", "conf"), ("p_label", "p(label)"), ("entropy", "entropy"),
              ("top5_out", "top5-out"), ("agreement", "agree"), ("ece", "ECE"))
NO_TEACHER = ("agreement n/a: no teacher predictions (a run records them with TEST.TEACHER_PREDICTIONS True, "
              "when it has a teacher)")


# ---------------------------------------------------------------- computation on arrays
def bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Each confidence's bin among ``bins`` equal-width bins (i/B, (i+1)/B] of [0, 1]."""
    conf = np.asarray(confidence, dtype=np.float64)
    return np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)


@dataclass
class Bins:
    """Per-bin sums, so that groups pool exactly: images, correct predictions, sum of confidences."""

    count: np.ndarray
    correct: np.ndarray
    confidence: np.ndarray

    @classmethod
    def of(cls, confidence: np.ndarray, correct: np.ndarray, bins: int) -> "Bins":
        if bins < 1:
            raise ClipkdError(f"--bins {bins}: give at least 1 bin")
        idx = bin_index(confidence, bins)
        return cls(np.bincount(idx, minlength=bins),
                   np.bincount(idx, weights=np.asarray(correct, dtype=np.float64), minlength=bins),
                   np.bincount(idx, weights=np.asarray(confidence, dtype=np.float64), minlength=bins))

    def __add__(self, other: "Bins") -> "Bins":
        return Bins(self.count + other.count, self.correct + other.correct, self.confidence + other.confidence)

    def accuracy(self) -> list[float | None]:
        """Per bin: the fraction predicted correctly (None for an empty bin)."""
        return [float(c / n) if n else None for c, n in zip(self.correct, self.count)]

    def mean_confidence(self) -> list[float | None]:
        return [float(s / n) if n else None for s, n in zip(self.confidence, self.count)]

    def ece(self) -> float:
        """sum_b (n_b / n) |acc_b - conf_b|, as a fraction in [0, 1] (0 for no images)."""
        n = int(self.count.sum())
        if n == 0:
            return 0.0
        return float(np.abs(self.correct - self.confidence).sum() / n)  # n_b |acc_b - conf_b| = |sum ok - sum conf|


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE with ``bins`` equal-width confidence bins, a fraction in [0, 1] (see the module docstring)."""
    return Bins.of(confidence, correct, bins).ece()


def half_stats(arrays: dict[str, np.ndarray], bins: int = DEFAULT_BINS) -> dict:
    """One half's quantities from its prediction arrays (:data:`clipkd.rundir.PER_IMAGE`, maybe teacher_pred):
    ``n``, every key of :data:`QUANTITIES` (%, entropy in nats; agreement None without teacher predictions)
    and ``bins`` (a :class:`Bins`)."""
    correct = arrays["pred"] == arrays["label"]
    n = int(correct.shape[0])

    def mean(x: np.ndarray) -> float:
        return float(np.mean(np.asarray(x, dtype=np.float64))) if n else math.nan

    teacher = arrays.get(TEACHER_PRED)
    b = Bins.of(arrays["confidence"], correct, bins)
    accuracy = 100.0 * float(correct.sum()) / n if n else math.nan  # as results.json's, to the last bit
    return {"n": n, "accuracy": accuracy, "confidence": 100.0 * mean(arrays["confidence"]),
            "p_label": 100.0 * mean(arrays["prob"]), "entropy": mean(arrays["entropy"]),
            "top5_out": 100.0 * mean(arrays["top5_out"]),
            "agreement": None if teacher is None else 100.0 * mean(arrays["pred"] == teacher),
            "ece": 100.0 * b.ece(), "bins": b}


# ---------------------------------------------------------------- runs and groups
@dataclass
class RunStats:
    path: Path
    seed: int | None
    halves: dict[str, dict]  # half -> half_stats


@dataclass
class Entry:
    """One row of the comparison: a run, or a folder's seed runs averaged."""

    folder: Path
    runs: list[RunStats]
    label: str = ""
    halves: dict[str, dict] = field(default_factory=dict)  # half -> means, "std", "n", "runs", "bins" (pooled)


def _sample_std(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def combine(runs: list[RunStats]) -> dict[str, dict]:
    """Per half the runs all have: each quantity's mean over the runs (agreement None unless every run has it),
    its sample std (None for one run), the images of all runs (``n``), ``runs`` and the pooled :class:`Bins`."""
    halves = [h for h in HALVES if all(h in r.halves for r in runs)]
    out = {}
    for half in halves:
        stats = [r.halves[half] for r in runs]
        block: dict = {"runs": len(stats), "n": sum(s["n"] for s in stats), "std": {}}
        for key, _ in QUANTITIES:
            values = [s[key] for s in stats]
            if any(v is None for v in values):
                block[key], block["std"][key] = None, None
            else:
                block[key], block["std"][key] = float(np.mean(values)), _sample_std(values)
        pooled = stats[0]["bins"]
        for s in stats[1:]:
            pooled = pooled + s["bins"]
        block["bins"] = pooled
        out[half] = block
    return out


def find_entries(args: list[str | os.PathLike], mean: bool = True) -> list[tuple[Path, list[tuple[Path, int | None]]]]:
    """The rows to show: ``(folder, [(run folder, seed)])``. A RUN that is itself a run folder is one row; a
    higher folder gives one row per folder holding its ``seed<S>`` runs (``mean``), or one per run."""
    entries: dict[Path, list[tuple[Path, int | None]]] = {}
    for arg in args:
        root = Path(arg)
        if not root.is_dir():
            raise ClipkdError(f"RUN {root} is not a folder: pass a run folder (seed<S>/) or a folder above run folders")
        runs = [(r.path, r.seed) for r in collect(root).runs]
        if not runs:
            raise ClipkdError(f"no run folders under {root} (a run folder is seed<S>/ holding results.json and "
                              f"{PREDICTIONS_FILE}): pass a run folder or a folder above its seed<S> folders")
        for path, seed in runs:
            single = not mean or path == root or not SEED_DIR.match(path.name)
            key = path if single else path.parent
            members = entries.setdefault(key, [])
            if (path, seed) not in members:
                members.append((path, seed))
    return list(entries.items())


def labels(folders: list[Path]) -> list[str]:
    """Each folder's path relative to their common parent ("kd/toy", "abkd/toy"); one folder: its name."""
    absolute = [Path(os.path.abspath(f)) for f in folders]
    base = Path(os.path.commonpath(absolute)) if absolute else Path(".")
    if any(a == base for a in absolute):
        base = base.parent
    return [a.relative_to(base).as_posix() for a in absolute]


def read_run(path: Path, seed: int | None, bins: int) -> RunStats:
    """A run's :class:`RunStats`; a ClipkdError naming the file when it has no usable predictions."""
    if (path / RESULTS_FILE).is_file() and not (path / PREDICTIONS_FILE).is_file():
        raise ClipkdError(f"{path / PREDICTIONS_FILE} not found: clipkd writes it beside results.json for runs "
                          "finished since per-image predictions (clipkd 0.1.0 from 2026-12-04; the teacher's "
                          "predictions with TEST.TEACHER_PREDICTIONS True); rerun the run into a new folder")
    preds = read_predictions(path)  # names a stale or corrupt file, or a missing results.json
    return RunStats(path, seed, {half: half_stats(arrays, bins) for half, arrays in preds.items()})


def _check_kind(folder: Path, paths: list[Path]) -> None:
    """Seed runs averaged together must be one kind of run (as in clipkd report)."""
    profiles = {}
    for p in paths:
        profile, _ = read_profile(p)
        if profile is not None:
            profiles[p] = tuple(getattr(profile, a) for a in KIND_ATTRS)
    if len(set(profiles.values())) > 1:
        raise ClipkdError(f"{folder}: its seed runs are of different kinds (protocol, shots, teacher or final-epoch "
                          f"selection differ between {', '.join(p.name for p in profiles)}): pass --no-mean, or "
                          "the run folders one by one")


def analyze(args: list[str | os.PathLike], bins: int = DEFAULT_BINS,
            mean: bool = True) -> tuple[list[Entry], list[str]]:
    """The entries (rows) for RUN arguments ``args``, and notes (unfinished runs left out, agreement n/a)."""
    if bins < 1:
        raise ClipkdError(f"--bins {bins}: give at least 1 bin")
    notes: list[str] = []
    entries = []
    for folder, members in find_entries(args, mean):
        finished = [(p, s) for p, s in members if (p / RESULTS_FILE).is_file()]
        notes += [f"left out: {p} has no {RESULTS_FILE} (unfinished or failed run)"
                  for p, _ in members if not (p / RESULTS_FILE).is_file()]
        if not finished:
            continue
        if len(finished) > 1:
            _check_kind(folder, [p for p, _ in finished])
        runs = [read_run(p, s, bins) for p, s in finished]
        entry = Entry(folder, runs)
        entry.halves = combine(runs)
        if not entry.halves:
            halves = sorted({h for r in runs for h in r.halves})
            raise ClipkdError(f"{folder}: its runs evaluate different halves ({', '.join(halves)}): pass --no-mean")
        entries.append(entry)
    if not entries:
        raise ClipkdError(f"no finished runs in {' '.join(map(str, args))}: " + (notes[0] if notes else ""))
    for entry, label in zip(entries, labels([e.folder for e in entries])):
        entry.label = label
    if any(b.get("agreement") is None for e in entries for b in e.halves.values()):
        notes.append(NO_TEACHER)
    return entries, notes


# ---------------------------------------------------------------- output
def _edges(bins: int) -> list[float]:
    return [i / bins for i in range(bins + 1)]


def _fmt(x: float | None, std: float | None = None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def present_halves(entries: list[Entry]) -> list[str]:
    return [h for h in HALVES if any(h in e.halves for e in entries)]


def analyze_markdown(entries: list[Entry], bins: int, counts: bool = False) -> str:
    """One table per half, a row per entry: runs, images, then each quantity (mean ± sample std over runs)."""
    lines = []
    for half in present_halves(entries):
        lines += [f"### {half}", "",
                  md_row(["run", "runs", "images", *(h for _, h in QUANTITIES)]),
                  "|---|---:|---:|" + "---:|" * len(QUANTITIES)]
        for e in entries:
            b = e.halves.get(half)
            if b is None:
                continue
            cells = [_fmt(b[k], b["std"][k], 3 if k == "entropy" else 2) for k, _ in QUANTITIES]
            lines.append(md_row([e.label, b["runs"], b["n"], *cells]))
        lines.append("")
        if counts:
            edges = _edges(bins)
            lines += [f"{half}: images per confidence bin (all runs of a row pooled)", "",
                      md_row(["run", *(f"≤{edges[i + 1]:.2f}" for i in range(bins))]),
                      "|---|" + "---:|" * bins]
            for e in entries:
                if half in e.halves:
                    lines.append(md_row([e.label, *(int(c) for c in e.halves[half]["bins"].count)]))
            lines.append("")
    lines.append(f"Mean over each row's runs (± sample std); %, entropy in nats; ECE over {bins} equal-width "
                 "confidence bins: sum of |acc - conf| weighted by each bin's share of the images.")
    return "\n".join(lines)


def _half_dict(b: dict, bins: int) -> dict:
    pooled: "Bins" = b["bins"]
    out = {k: b[k] for k in ("runs", "n")}
    out.update({k: b[k] for k, _ in QUANTITIES})
    out["std"] = dict(b["std"])
    out["reliability"] = {"edges": _edges(bins), "count": [int(c) for c in pooled.count],
                          "accuracy": [None if a is None else 100.0 * a for a in pooled.accuracy()],
                          "confidence": [None if c is None else 100.0 * c for c in pooled.mean_confidence()]}
    return out


def analyze_dict(entries: list[Entry], bins: int, notes: list[str] = ()) -> dict:
    """``{"bins", "units", "entries": [{"label", "path", "runs": [{"path", "seed"}], "halves": {half: {...}}}],
    "notes"}``; a half holds runs, n, each quantity, "std" (per quantity; None for one run) and "reliability"
    (bin edges, and per bin the pooled count, accuracy % and mean confidence %; None for an empty bin)."""
    return {"bins": bins, "units": "% (entropy: nats)",
            "entries": [{"label": e.label, "path": str(e.folder),
                         "runs": [{"path": str(r.path), "seed": r.seed} for r in e.runs],
                         "halves": {h: _half_dict(b, bins) for h, b in e.halves.items()}} for e in entries],
            "notes": list(notes)}


def analyze_csv(entries: list[Entry], bins: int, counts: bool = False) -> str:
    """A row per (entry, half): label, half, runs, n, each quantity and its std (empty when n/a); --counts adds
    count_1 .. count_B."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [k for k, _ in QUANTITIES]
    w.writerow(["run", "half", "runs", "n", *keys, *(f"{k}_std" for k in keys),
                *(f"count_{i + 1}" for i in range(bins if counts else 0))])
    for e in entries:
        for half, b in e.halves.items():
            row = [e.label, half, b["runs"], b["n"], *("" if b[k] is None else b[k] for k in keys),
                   *("" if b["std"][k] is None else b["std"][k] for k in keys)]
            if counts:
                row += [int(c) for c in b["bins"].count]
            w.writerow(row)
    return buf.getvalue()


def plot_reliability(entries: list[Entry], path: str | os.PathLike) -> Path:
    """A PNG reliability diagram: one panel per half, per entry its (mean confidence, accuracy) per non-empty bin
    (pooled over its runs), the diagonal of perfect calibration, and the entry's ECE in the legend."""
    from clipkd.reports.figures import new_figure
    from clipkd.reports.plot import save_figure

    halves = present_halves(entries)
    fig = new_figure(4.6 * len(halves), 4.6)
    axes = fig.subplots(1, len(halves), squeeze=False)
    for ax, half in zip(axes[0], halves):
        ax.plot([0, 100], [0, 100], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        for e in entries:
            b = e.halves.get(half)
            if b is None:
                continue
            pooled: Bins = b["bins"]
            points = [(100 * c, 100 * a) for c, a in zip(pooled.mean_confidence(), pooled.accuracy()) if c is not None]
            xs, ys = zip(*points) if points else ((), ())
            ax.plot(xs, ys, marker="o", markersize=4, label=f"{e.label} (ECE {b['ece']:.2f})")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_aspect("equal")
        ax.set_xlabel("mean confidence in bin (%)")
        ax.set_ylabel("accuracy in bin (%)")
        ax.set_title(f"{half}: reliability")
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)
