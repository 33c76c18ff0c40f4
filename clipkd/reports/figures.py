"""The report's figures, built from the same tables the text report prints (nothing is recomputed from runs).

Each builder returns a matplotlib ``Figure`` made without pyplot (no global figure registry, nothing to leak
when a report draws many) and never writes a file: :mod:`clipkd.reports.plot` names, renders and saves them.
matplotlib is optional (the ``plot`` extra) and imported only inside the builders.

Error bars are the spread of seeds: the std the report uses (sample std unless --std population) or, with
--ci, the half-width of the t-based 95% confidence interval of the seed mean; each figure says which. An HM
bar is the HM of the mean Base and mean New (as the tables); its error bar is the spread of the per-seed HMs.
An average over datasets gets a spread only when every dataset has the same seeds: then the spread is that of
the per-seed averages over datasets; otherwise it has none, and the caption says so.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from clipkd.errors import ClipkdError
from clipkd.metrics import harmonic_mean
from clipkd.reports.aggregate import (POPULATION, DatasetRow, FewShotTable, MethodTable, Stat, Sweep, dataset_name,
                                      dataset_order)

if TYPE_CHECKING:  # matplotlib is optional: only the type checker reads these
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from clipkd.reports.compare import Comparison
    from clipkd.reports.transfer import TransferTable

MATPLOTLIB_MISSING = "--plot needs matplotlib: pip install 'clipkd[plot]'"
DPI = 110
HALF_COLOURS = {"base": "#4c72b0", "new": "#dd8452", "hm": "#55a868"}
VERDICT_STYLE = {1: ("#2a9d3a", "o", True), -1: ("#c0392b", "s", True), 0: ("#7f7f7f", "o", False)}
CAPTION_SIZE = 8


def new_figure(width: float, height: float) -> "Figure":
    """A Figure with constrained layout (titles, legends and captions outside the axes get room), or the
    one-line error naming the extra when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ClipkdError(MATPLOTLIB_MISSING) from exc
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, by its place in the sorted list (the same method, the same colour, in every
    figure of one report)."""
    import matplotlib

    cycle = matplotlib.colormaps["tab10"].colors
    return {m: matplotlib.colors.to_hex(cycle[i % len(cycle)]) for i, m in enumerate(sorted(methods))}


# ---------------------------------------------------------------- spreads
def spread(stat: Stat | None, ci: bool) -> float:
    """The error bar's half-length: the std, or with ``ci`` the 95% t-CI half-width; NaN (no bar) for one seed."""
    if stat is None:
        return math.nan
    value = stat.ci95 if ci else stat.std
    return math.nan if value is None else value


def spread_words(ci: bool, ddof: int = 1) -> str:
    if ci:
        return "95% t-CI of the seed mean"
    return "population std over seeds" if ddof == POPULATION else "sample std over seeds"


def hm_stat(row: DatasetRow) -> Stat | None:
    """The per-seed HMs of a row (its Base and New values are in seed order), or None when they are not kept."""
    b, n = row.base.values, row.new.values
    if not b or len(b) != len(n):
        return None
    return Stat.of([harmonic_mean(x, y) for x, y in zip(b, n)], row.base.ddof)


def seedwise_mean(parts: Sequence[tuple[tuple[int, ...], Stat]]) -> Stat | None:
    """Over (seeds, stat) per dataset: the Stat over seeds of the per-seed mean over datasets; None unless every
    dataset has the same seeds (else the per-seed averages would mix datasets). Its mean is the mean of the
    dataset means."""
    if not parts:
        return None
    seeds = parts[0][0]
    if any(s != seeds or len(st.values) != len(s) for s, st in parts) or not seeds:
        return None
    per_seed = [sum(st.values[i] for _, st in parts) / len(parts) for i in range(len(seeds))]
    return Stat.of(per_seed, parts[0][1].ddof)


def average_stats(table: MethodTable) -> tuple[Stat | None, Stat | None, Stat | None]:
    """Seed-wise Base, New and HM of the average row (None where datasets have different seeds)."""
    base = seedwise_mean([(r.seeds, r.base) for r in table.rows])
    new = seedwise_mean([(r.seeds, r.new) for r in table.rows])
    if base is None or new is None:
        return None, None, None
    return base, new, Stat.of([harmonic_mean(x, y) for x, y in zip(base.values, new.values)], base.ddof)


def caption(fig: "Figure", text: str) -> None:
    """Wrapped to the figure's width, below everything (constrained layout leaves it room)."""
    width = max(40, int(fig.get_figwidth() * 15))
    fig.supxlabel("\n".join(textwrap.wrap(text, width)), fontsize=CAPTION_SIZE, color="#333333")


def title(ax: "Axes", text: str) -> None:
    """An axes title wrapped to the figure's width (a long method name never runs off the picture)."""
    fig = ax.get_figure()
    width = max(40, int(fig.get_figwidth() * 12)) if fig is not None else 80
    ax.set_title("\n".join(textwrap.wrap(text, width)), fontsize=10)


def legend_columns(fig: "Figure", labels: Sequence[str]) -> int:
    """As many legend columns as fit the figure's width with the longest label (at 9 pt, ~12 characters per
    inch)."""
    per = max((len(x) for x in labels), default=1) + 6
    return max(1, min(len(labels), int(fig.get_figwidth() * 12 // per)))


def _name_ticks(ax: "Axes", positions: Sequence[float], names: Sequence[str]) -> None:
    """Dataset names under grouped bars: slanted when there are many, so that 11 long names never overlap."""
    many = len(names) > 5
    ax.set_xticks(list(positions), list(names), rotation=35 if many else 0, ha="right" if many else "center",
                  rotation_mode="anchor" if many else "default", fontsize=9)


def _average_apart(ax: "Axes", n_groups: int) -> None:
    """The last group (the average) set apart: a dotted line before it, its name in bold."""
    ax.axvline(n_groups - 1.5, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.get_xticklabels()[n_groups - 1].set_fontweight("bold")
    ax.set_xlim(-0.6, n_groups - 0.4)


def _value_axis(ax: "Axes", label: str) -> None:
    ax.set_ylabel(label)
    ax.grid(axis="y", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# ---------------------------------------------------------------- base-to-new
def b2n_bars(table: MethodTable, ci: bool = False) -> "Figure":
    """One method: Base, New and HM per dataset and the average, with error bars."""
    rows = table.rows
    avg = table.average
    names = [r.name for r in rows] + ([f"Average ({avg.n_datasets})"] if avg and len(rows) > 1 else [])
    means = {"base": [r.base.mean for r in rows], "new": [r.new.mean for r in rows], "hm": [r.hm for r in rows]}
    errs = {"base": [spread(r.base, ci) for r in rows], "new": [spread(r.new, ci) for r in rows],
            "hm": [spread(hm_stat(r), ci) for r in rows]}
    avg_spread = True
    if len(names) > len(rows):
        stats = average_stats(table)
        avg_spread = stats[0] is not None
        for half, value, st in zip(("base", "new", "hm"), (avg.base, avg.new, avg.hm), stats):
            means[half].append(value)
            errs[half].append(spread(st, ci))
    fig = new_figure(max(6.0, 0.75 * len(names) + 2.5), 4.6)
    ax = fig.add_subplot()
    width = 0.26
    for i, half in enumerate(("base", "new", "hm")):
        xs = [k + (i - 1) * width for k in range(len(names))]
        ax.bar(xs, means[half], width, yerr=errs[half], label=half.upper() if half == "hm" else half.capitalize(),
               color=HALF_COLOURS[half], error_kw={"ecolor": "#222222", "elinewidth": 1, "capsize": 2.5})
    _name_ticks(ax, range(len(names)), names)
    _value_axis(ax, "accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_xlim(-0.6, len(names) - 0.4)
    if len(names) > len(rows):
        _average_apart(ax, len(names))
    ddof = rows[0].base.ddof if rows else 1
    title(ax, f"{table.method}: base-to-new accuracy per dataset (error bars: {spread_words(ci, ddof)})")
    fig.legend(loc="outside upper right", ncols=3, fontsize=9, frameon=False)
    text = ("HM: harmonic mean of the mean Base and mean New; its error bar is the spread of the per-seed HMs. "
            "No bar: one seed.")
    if len(names) > len(rows):
        text += (" Average: mean over datasets of the dataset means (HM of those); its error bars come from the "
                 "per-seed averages over datasets." if avg_spread else
                 " Average: mean over datasets of the dataset means; no error bars (the datasets have different "
                 "seeds).")
    caption(fig, text)
    return fig


def hm_by_method(tables: Sequence[MethodTable], ci: bool = False) -> "Figure":
    """HM per dataset (and on average), methods side by side, each with the spread of its per-seed HMs."""
    stems = sorted({r.stem for t in tables for r in t.rows}, key=dataset_order)
    groups = [dataset_name(s) for s in stems] + ["Average"]
    colours = method_colours([t.method for t in tables])
    k = len(tables)
    width = min(0.7 / k, 0.22)
    fig = new_figure(min(14.0, max(6.5, 0.12 * k * len(groups) + 0.6 * len(groups) + 2.0)), 4.6)
    ax = fig.add_subplot()
    partial = []
    for i, t in enumerate(tables):
        by_stem = {r.stem: r for r in t.rows}
        ys, errs, xs = [], [], []
        for g, stem in enumerate(stems):
            if stem in by_stem:
                xs.append(g + (i - (k - 1) / 2) * width)
                ys.append(by_stem[stem].hm)
                errs.append(spread(hm_stat(by_stem[stem]), ci))
        if t.average is not None:
            xs.append(len(stems) + (i - (k - 1) / 2) * width)
            ys.append(t.average.hm)
            errs.append(spread(average_stats(t)[2], ci))
            if len(t.rows) < len(stems):
                partial.append(f"{t.method} ({len(t.rows)} of {len(stems)})")
        # points, not bars: a bar must start at 0, which would hide differences of a point or two
        ax.errorbar(xs, ys, yerr=errs, fmt="o", markersize=5, color=colours[t.method], ecolor=colours[t.method],
                    elinewidth=1.3, capsize=2.5, label=t.method)
    _name_ticks(ax, range(len(groups)), groups)
    _value_axis(ax, "HM (%)")
    ax.grid(axis="x", color="#f0f0f0", linewidth=0.8)
    _average_apart(ax, len(groups))
    ddof = tables[0].rows[0].base.ddof if tables and tables[0].rows else 1
    title(ax, f"HM per dataset (error bars: {spread_words(ci, ddof)} of the per-seed HMs)")
    fig.legend(loc="outside upper right", ncols=legend_columns(fig, [t.method for t in tables]), fontsize=9,
               frameon=False)
    text = ("Point: HM of the mean Base and mean New (as the tables). Average: HM of the dataset-mean Base and "
            "New, its error bar from the per-seed averages when all datasets have the same seeds.")
    if partial:
        text += " Averages over fewer datasets: " + ", ".join(partial) + "."
    caption(fig, text)
    return fig


# ---------------------------------------------------------------- few-shot
def fewshot_curves(tables: Sequence[FewShotTable], ci: bool = False) -> "Figure":
    """Accuracy against shots per dataset and on average, one line per method, bands of mean ± spread."""
    methods = sorted({t.method for t in tables})
    colours = method_colours(methods)
    stems = sorted({r.stem for t in tables for r in t.rows}, key=dataset_order)
    panels = [(s, dataset_name(s)) for s in stems] + ([(None, "Average")] if len(stems) > 1 else [])
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = new_figure(3.3 * cols, 2.7 * nrows + 1.2)
    axes = fig.subplots(nrows, cols, squeeze=False)
    shots = sorted({t.shots for t in tables})
    notes = []
    ddof = next((r.acc.ddof for t in tables for r in t.rows), 1)
    for p, (stem, title) in enumerate(panels):
        ax = axes[p // cols][p % cols]
        for m in methods:
            points = []
            mtables = sorted((t for t in tables if t.method == m), key=lambda t: t.shots)
            if stem is None:
                sets = {tuple(r.stem for r in t.rows) for t in mtables}
                if len(sets) > 1:
                    notes.append(m)
                for t in mtables:
                    st = seedwise_mean([(r.seeds, r.acc) for r in t.rows])
                    points.append((t.shots, t.average, spread(st, ci)))
            else:
                for t in mtables:
                    row = next((r for r in t.rows if r.stem == stem), None)
                    if row is not None:
                        points.append((t.shots, row.acc.mean, spread(row.acc, ci)))
            if not points:
                continue
            xs, ys, es = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.6, color=colours[m], label=m)
            ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)],
                            color=colours[m], alpha=0.18, linewidth=0, label=f"_{m} band")
        ax.set_title(title, fontsize=10, fontweight="bold" if stem is None else "normal")
        if len(shots) > 1 and min(shots) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.grid(color="#e5e5e5", linewidth=0.8)
        ax.tick_params(labelsize=8)
        if p % cols == 0:
            ax.set_ylabel("accuracy (%)", fontsize=9)
        if p // cols == nrows - 1 or p + cols >= len(panels):
            ax.set_xlabel("shots per class", fontsize=9)
    for p in range(len(panels), nrows * cols):
        axes[p // cols][p % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
    # the title as the legend's: a suptitle and an outside legend would share the top edge and overlap
    shown = [m for m in methods if m in seen]
    legend = fig.legend([seen[m] for m in shown], shown, loc="outside upper center",
                        ncols=legend_columns(fig, shown), fontsize=9, frameon=False,
                        title=f"Few-shot accuracy (bands: mean ± {spread_words(ci, ddof)})")
    legend.get_title().set_fontsize(11)
    text = ("Average: mean over datasets of the dataset means at each K; its band comes from the per-seed "
            "averages over datasets and is left out where the datasets have different seeds.")
    if notes:
        text += f" Averages over different datasets at different K: {', '.join(sorted(set(notes)))}."
    caption(fig, text)
    return fig


# ---------------------------------------------------------------- --compare A B
def forest(c: "Comparison") -> "Figure":
    """Δ HM (A - B) per dataset and on average with its bootstrap CI, a line at 0, the verdict as the marker."""
    rows = c.rows + ([c.average] if c.average else [])
    fig = new_figure(7.5, 0.42 * len(rows) + 2.2)
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]  # the first dataset on top, the average at the bottom
    ax.axvline(0, color="#444444", linewidth=1, zorder=1)
    d = [r.deltas["hm"] for r in rows]
    with_ci = [(y, x) for y, x in zip(ys, d) if x.low is not None and x.high is not None]
    if with_ci:
        ax.errorbar([x.value for _, x in with_ci], [y for y, _ in with_ci],
                    xerr=[[x.value - x.low for _, x in with_ci], [x.high - x.value for _, x in with_ci]],
                    fmt="none", ecolor="#333333", elinewidth=1.3, capsize=3, zorder=2,
                    label=f"{100 * c.level:g}% paired-bootstrap CI")
    words = {1: f"{c.a} better", -1: f"{c.b} better", 0: "not resolved"}
    for side, (colour, marker, filled) in VERDICT_STYLE.items():
        pts = [(y, x.value) for y, x in zip(ys, d) if x.resolved == side]
        if pts:
            ax.scatter([v for _, v in pts], [y for y, _ in pts], s=46, marker=marker, zorder=3,
                       facecolors=colour if filled else "white", edgecolors=colour, linewidths=1.5,
                       label=words[side])
    ax.set_yticks(ys[::-1], [r.name for r in rows][::-1], fontsize=9)  # ascending: tick 0 is the last row
    if c.average:
        ax.get_yticklabels()[0].set_fontweight("bold")
        ax.axhline(0.5, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(f"Δ HM = {c.a} − {c.b} (accuracy points)")
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    title(ax, f"{c.a} vs {c.b}: paired difference in HM")
    fig.legend(loc="outside upper center", ncols=legend_columns(fig, ax.get_legend_handles_labels()[1]), fontsize=8,
               frameon=False)
    no_ci = [r.name for r, x in zip(rows, d) if x.low is None]
    text = (f"CI: paired bootstrap ({c.resamples} replicates, seed {c.seed}) over seeds and, where predictions.npz "
            "exist, test images. Verdict: a method is better when the CI excludes 0.")
    if no_ci:
        text += f" No interval (1 seed, no predictions): {', '.join(no_ci)}."
    caption(fig, text)
    return fig


# ---------------------------------------------------------------- --xd / --dg
def transfer_bars(table: "TransferTable", ci: bool = False) -> "Figure":
    """Accuracy on the source and on each target, one bar per method, error bars over seeds; the average over
    targets without one (it is a mean of target means)."""
    from clipkd.data.specs import TRANSFER_SOURCE
    from clipkd.reports.transfer import TITLES

    targets = table.targets
    groups = [f"{dataset_name(TRANSFER_SOURCE)} (source)"] + [dataset_name(t) for t in targets] + ["Average"]
    colours = method_colours([r.method for r in table.rows])
    k = max(1, len(table.rows))
    width = min(0.8 / k, 0.3)
    fig = new_figure(min(14.0, max(6.5, 0.2 * k * len(groups) + 0.55 * len(groups) + 2.5)), 4.8)
    ax = fig.add_subplot()
    partial = []
    for i, r in enumerate(table.rows):
        off = (i - (k - 1) / 2) * width
        stats = [r.source] + [r.targets.get(t) for t in targets]
        xs = [g + off for g, st in enumerate(stats) if st is not None]
        ys = [st.mean for st in stats if st is not None]
        es = [spread(st, ci) for st in stats if st is not None]
        avg = r.average(targets)
        if avg is not None:
            xs.append(len(groups) - 1 + off)
            ys.append(avg)
            es.append(math.nan)
            if table.n_targets(r) < len(targets):
                partial.append(f"{r.method} ({table.n_targets(r)}/{len(targets)})")
        ax.bar(xs, ys, width, yerr=es, label=r.method, color=colours[r.method],
               error_kw={"ecolor": "#222222", "elinewidth": 1, "capsize": 2})
    _name_ticks(ax, range(len(groups)), groups)
    _value_axis(ax, "accuracy (%)")
    ax.set_ylim(0, 102)
    _average_apart(ax, len(groups))
    ax.axvline(0.5, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ddof = next((r.source.ddof for r in table.rows if r.source), 1)
    title(ax, f"{TITLES[table.setting]}: accuracy per target (error bars: {spread_words(ci, ddof)})")
    fig.legend(loc="outside upper right", ncols=legend_columns(fig, [r.method for r in table.rows]), fontsize=9,
               frameon=False)
    text = "Accuracy over all classes of each test set. Average: mean of the target means (no error bar)."
    if partial:
        text += " Averages over fewer targets: " + ", ".join(partial) + "."
    caption(fig, text)
    return fig


# ---------------------------------------------------------------- alpha-beta sweep
def sweep_heatmap(sweep: Sweep) -> "Figure":
    """Rows alpha, columns beta, cells annotated with HM, the best cell outlined."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    alphas, betas, best = sweep.alphas, sweep.betas, sweep.best
    grid = [[math.nan] * len(betas) for _ in alphas]
    for c in sweep.cells:
        grid[alphas.index(c.alpha)][betas.index(c.beta)] = c.hm
    values = [c.hm for c in sweep.cells]
    lo, hi = min(values), max(values)
    fig = new_figure(1.1 * len(betas) + 2.6, 0.8 * len(alphas) + 1.8)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(np.array(grid)), cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1,
                   origin="lower", aspect="auto")
    ax.set_xticks(range(len(betas)), [format(b, "g") for b in betas])
    ax.set_yticks(range(len(alphas)), [format(a, "g") for a in alphas])
    ax.set_xlabel("beta")
    ax.set_ylabel("alpha")
    mid = (lo + hi) / 2
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            v = grid[i][j]
            text, colour = ("n/a", "black") if math.isnan(v) else (f"{v:.2f}", "black" if v > mid else "white")
            weight = "bold" if best is not None and (a, b) == (best.alpha, best.beta) else "normal"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9, fontweight=weight)
    if best is not None:
        j, i = betas.index(best.beta), alphas.index(best.alpha)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        ax.set_title(f"HM (%) over (alpha, beta): {sweep.name}, {sweep.method}\n"
                     f"best alpha={format(best.alpha, 'g')}, beta={format(best.beta, 'g')}: HM {best.hm:.2f}",
                     fontsize=10)
    fig.colorbar(im, ax=ax, label="HM (%)")
    return fig
