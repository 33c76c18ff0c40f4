"""Render aggregated tables as Markdown, CSV, JSON or LaTeX (all plain text, returned as strings)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from clipkd.data.specs import STEMS
from clipkd.reports.aggregate import FewShotTable, MethodTable, Stat, Sweep
from clipkd.reports.collect import Problem, RunRecord
from clipkd.reports.published import Published

Reference = tuple[dict[str, Published], Published, str]  # per-dataset, average, source


def na(n: int) -> str:
    """What a std or CI cell says when there are too few seeds for it (never NaN)."""
    return f"n/a ({n} seed" + ("" if n == 1 else "s") + ")"


def mean_pm(s: Stat) -> str:
    """``mean ± std``, or ``mean ± n/a (1 seed)`` where the std is undefined (the cell every report prints)."""
    return f"{s.mean:.2f} ± {na(s.n) if s.std is None else f'{s.std:.2f}'}"



def _ci(s: Stat) -> str:
    h = s.ci95
    return na(s.n) if h is None else f"± {h:.2f}"


def std_words(ddof: int) -> str:
    """How a table's note names its std."""
    return ("sample std (ddof 1)" if ddof == 1 else
            "population std (ddof 0, as Dassl's parse_test_res.py; it understates the spread of a few seeds)")


def spread_note(stats: Sequence[Stat], ci: bool) -> str:
    """The note's words for the spread of ``stats`` (the std, and the CI with --ci)."""
    ddof = stats[0].ddof if stats else 1
    text = f"mean ± {std_words(ddof)} over seeds"
    if ci:
        text += ("; 95% CI: half-width of the t-based 95% confidence interval of the seed mean, "
                 "t(0.975, n-1) s / sqrt(n) with the sample std s")
    if ddof or ci:  # a population std of one seed is 0, as Dassl prints it; a sample std or CI is undefined
        text += f"; one seed: {na(1)}"
    return text


def stat_dict(s: Stat, ci: bool = False) -> dict:
    """A Stat as JSON: mean, std (null under 2 seeds with the sample std), n, and ci95 with --ci."""
    out: dict = {"mean": s.mean, "std": s.std, "n": s.n}
    if ci:
        out["ci95"] = s.ci95
    return out


def csv_spread(x: float | None, n: int) -> float | str:
    return na(n) if x is None else x


def _n(k: int) -> str:
    return f"{k} dataset" + ("" if k == 1 else "s")


def _d(x: float) -> str:
    return f"{x:+.2f}"


def md_cell(text: object) -> str:
    """Text made safe for a Markdown table cell: a ``|`` (a method or folder name may hold one) would end the
    cell, so it is written ``\\|``; a line break would end the row, so it becomes a space."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def md_row(cells: Sequence[object]) -> str:
    """One Markdown table row, each cell escaped (:func:`md_cell`)."""
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def _md_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    lines = [md_row(header), "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += [md_row(r) for r in rows]
    return lines


def average_reference(table: MethodTable, ref: Reference | None) -> Published | None:
    """The published average is only comparable when all 11 benchmark datasets are in the table."""
    if ref is None or {r.stem for r in table.rows} != set(STEMS):
        return None
    return ref[1]


# ---------------------------------------------------------------- base-to-new
AVERAGE_HM = "HM of mean Base and mean New (as the papers)"


def b2n_markdown(tables: list[MethodTable], ref: Reference | None = None, ci: bool = False) -> str:
    out: list[str] = []
    for t in tables:
        avg = t.average
        header = ["Dataset", "Base", "New", "HM", "Seeds"]
        if ci:
            header += ["Base 95% CI", "New 95% CI"]
        if ref:
            header += ["Pub. Base", "Pub. New", "Pub. HM", "Δ Base", "Δ New", "Δ HM"]
        rows = []
        for r in t.rows:
            row = [r.name, mean_pm(r.base), mean_pm(r.new), f"{r.hm:.2f}", str(r.base.n)]
            if ci:
                row += [_ci(r.base), _ci(r.new)]
            if ref:
                p = ref[0].get(r.stem)
                row += ([f"{p.base:.2f}", f"{p.new:.2f}", f"{p.hm:.2f}",
                         _d(r.base.mean - p.base), _d(r.new.mean - p.new), _d(r.hm - p.hm)] if p else ["—"] * 6)
            rows.append(row)
        if avg:
            row = [f"**Average** ({_n(avg.n_datasets)}): {AVERAGE_HM}", f"{avg.base:.2f}", f"{avg.new:.2f}",
                   f"{avg.hm:.2f} (mean of per-dataset HMs: {avg.mean_hm:.2f})", ""]
            if ci:
                row += ["", ""]
            if ref:
                p = average_reference(t, ref)
                row += ([f"{p.base:.2f}", f"{p.new:.2f}", f"{p.hm:.2f}",
                         _d(avg.base - p.base), _d(avg.new - p.new), _d(avg.hm - p.hm)] if p else ["—"] * 6)
            rows.append(row)
        out.append(f"### {t.method}")
        out.append("")
        out += _md_table(header, rows, "l" + "r" * (len(header) - 1))
        out.append("")
        stats = [x for r in t.rows for x in (r.base, r.new)]
        out.append(f"Base/New: {spread_note(stats, ci)}; HM: harmonic mean of the mean Base and mean New; "
                   "Average: HM of the dataset-mean Base and New, as the papers (the mean of the per-dataset HMs "
                   "beside it).")
        if ref:
            note = f"Published: {ref[2]}; Δ = ours - published."
            if avg and average_reference(t, ref) is None:
                note += " The published average is compared only when all 11 datasets are present."
            out.append(note)
        out.append("")
    return "\n".join(out)


def b2n_dict(table: MethodTable, ref: Reference | None = None, ci: bool = False) -> dict:
    """The JSON shape: {"datasets": {NAME: {"base": {mean,std,n[,ci95]}, "new": {...}, "hm"}}, "average":
    {"base","new","hm","mean_hm"}}; "hm" of the average is the HM of the mean Base and mean New (as the papers),
    "mean_hm" the mean of the per-dataset HMs."""
    datasets = {}
    for r in table.rows:
        entry: dict = {"base": stat_dict(r.base, ci), "new": stat_dict(r.new, ci), "hm": r.hm}
        if ref and r.stem in ref[0]:
            p = ref[0][r.stem]
            entry["published"] = {"base": p.base, "new": p.new, "hm": p.hm}
            entry["delta"] = {"base": r.base.mean - p.base, "new": r.new.mean - p.new, "hm": r.hm - p.hm}
        datasets[r.name] = entry
    avg = table.average
    out: dict = {"datasets": datasets,
                 "average": {"base": avg.base, "new": avg.new, "hm": avg.hm, "mean_hm": avg.mean_hm} if avg else None}
    if ref:
        p = average_reference(table, ref)
        out["published_source"] = ref[2]
        if p and avg:
            out["average"]["published"] = {"base": p.base, "new": p.new, "hm": p.hm}
            out["average"]["delta"] = {"base": avg.base - p.base, "new": avg.new - p.new, "hm": avg.hm - p.hm}
    return out


B2N_CSV_FIELDS = ["method", "dataset", "name", "base_mean", "base_std", "base_n", "new_mean", "new_std", "new_n",
                  "hm", "mean_dataset_hm"]
CI_CSV_FIELDS = ["base_ci95", "new_ci95"]
COMPARE_CSV_FIELDS = ["pub_base", "pub_new", "pub_hm", "delta_base", "delta_new", "delta_hm"]


def b2n_csv(tables: list[MethodTable], ref: Reference | None = None, ci: bool = False) -> str:
    """One row per dataset and an average row (hm: HM of the mean Base and mean New, as the papers;
    mean_dataset_hm: the mean of the per-dataset HMs); a std or CI of too few seeds is "n/a (1 seed)"."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(B2N_CSV_FIELDS + (CI_CSV_FIELDS if ci else []) + (COMPARE_CSV_FIELDS if ref else []))
    for t in tables:
        for r in t.rows:
            row = [t.method, r.stem, r.name, r.base.mean, csv_spread(r.base.std, r.base.n), r.base.n, r.new.mean,
                   csv_spread(r.new.std, r.new.n), r.new.n, r.hm, ""]
            if ci:
                row += [csv_spread(r.base.ci95, r.base.n), csv_spread(r.new.ci95, r.new.n)]
            if ref:
                p = ref[0].get(r.stem)
                row += ([p.base, p.new, p.hm, r.base.mean - p.base, r.new.mean - p.new, r.hm - p.hm]
                        if p else [""] * 6)
            w.writerow(row)
        avg = t.average
        if avg:
            row = [t.method, "average", f"Average ({AVERAGE_HM})", avg.base, "", avg.n_datasets, avg.new, "",
                   avg.n_datasets, avg.hm, avg.mean_hm]
            if ci:
                row += ["", ""]
            if ref:
                p = average_reference(t, ref)
                row += ([p.base, p.new, p.hm, avg.base - p.base, avg.new - p.new, avg.hm - p.hm]
                        if p else [""] * 6)
            w.writerow(row)
    return buf.getvalue()


# ---------------------------------------------------------------- LaTeX (booktabs)
_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Text made safe for a LaTeX table cell (underscores, percent signs, ...)."""
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _tex_pm(s: Stat, ci: bool = False) -> str:
    """mean $\\pm$ std (with ``ci``: $\\pm$ the 95% CI half-width) over several seeds; the bare mean for one seed
    (a spread of one value says nothing)."""
    spread = s.ci95 if ci else s.std
    return f"{s.mean:.2f} $\\pm$ {spread:.2f}" if s.n > 1 and spread is not None else f"{s.mean:.2f}"


def _tex_spread(stats: Sequence[Stat], ci: bool) -> str:
    if ci:
        return "half-width of the t-based 95\\% confidence interval of the mean"
    return tex_escape(std_words(stats[0].ddof if stats else 1))


def _tex_d(x: float) -> str:
    return f"${x:+.2f}$"


def _tex_row(cells: list[str]) -> str:
    return " & ".join(cells) + r" \\"


def _tex_seeds_note(counts: list[int]) -> str:
    """How many seeds the rows average, for the note under a table."""
    kinds = sorted(set(counts))
    if kinds == [1]:
        return "one seed"
    return f"{kinds[0]} seeds" if len(kinds) == 1 else f"{kinds[0]}-{kinds[-1]} seeds per dataset"


def b2n_latex(tables: list[MethodTable], ref: Reference | None = None, ci: bool = False) -> str:
    """One booktabs ``tabular`` per method: datasets as rows, Base / New / HM as columns, the Average row
    below a rule (with ``ref``: column groups Ours / Published / Delta). Needs ``\\usepackage{booktabs}``."""
    out: list[str] = ["% \\usepackage{booktabs}; written by clipkd report --format latex"]
    ncols = 10 if ref else 4
    for t in tables:
        avg = t.average
        out += ["", f"% {tex_escape(t.method)}", "\\begin{tabular}{l" + "c" * (ncols - 1) + "}", r"\toprule",
                _tex_row([f"\\multicolumn{{{ncols}}}{{l}}{{{tex_escape(t.method)}}}"]), r"\midrule"]
        if ref:
            out += [_tex_row(["", r"\multicolumn{3}{c}{Ours}", r"\multicolumn{3}{c}{Published}",
                              r"\multicolumn{3}{c}{$\Delta$}"]),
                    r"\cmidrule(lr){2-4} \cmidrule(lr){5-7} \cmidrule(lr){8-10}",
                    _tex_row(["Dataset"] + ["Base", "New", "HM"] * 3)]
        else:
            out.append(_tex_row(["Dataset", "Base", "New", "HM"]))
        out.append(r"\midrule")
        for r in t.rows:
            row = [tex_escape(r.name), _tex_pm(r.base, ci), _tex_pm(r.new, ci), f"{r.hm:.2f}"]
            if ref:
                p = ref[0].get(r.stem)
                row += ([f"{p.base:.2f}", f"{p.new:.2f}", f"{p.hm:.2f}", _tex_d(r.base.mean - p.base),
                         _tex_d(r.new.mean - p.new), _tex_d(r.hm - p.hm)] if p else ["--"] * 6)
            out.append(_tex_row(row))
        if avg:
            out.append(r"\midrule")
            row = [f"Average ({_n(avg.n_datasets)})", f"{avg.base:.2f}", f"{avg.new:.2f}", f"{avg.hm:.2f}"]
            if ref:
                p = average_reference(t, ref)
                row += ([f"{p.base:.2f}", f"{p.new:.2f}", f"{p.hm:.2f}", _tex_d(avg.base - p.base),
                         _tex_d(avg.new - p.new), _tex_d(avg.hm - p.hm)] if p else ["--"] * 6)
            out.append(_tex_row(row))
        out += [r"\bottomrule", r"\end{tabular}"]
        stats = [x for r in t.rows for x in (r.base, r.new)]
        mean_hm = f" (the mean of the per-dataset HMs is {avg.mean_hm:.2f})" if avg else ""
        seeds = _tex_seeds_note([r.base.n for r in t.rows])
        out.append(f"% Base/New: mean $\\pm$ {_tex_spread(stats, ci)} over {seeds}; "
                   "HM: harmonic mean of the mean Base and mean New; Average: HM of the dataset-mean Base and New, "
                   f"as the papers{mean_hm}.")
        if ref:
            note = f"% Published: {tex_escape(ref[2])}; $\\Delta$ = ours - published."
            if avg and average_reference(t, ref) is None:
                note += " The published average is compared only when all 11 datasets are present."
            out.append(note)
    return "\n".join(out) + "\n"


def fewshot_latex(tables: list[FewShotTable], ci: bool = False) -> str:
    """One booktabs ``tabular`` per (method, K): datasets as rows, accuracy, then the Average row."""
    out: list[str] = ["% \\usepackage{booktabs}; written by clipkd report --fewshot --format latex"]
    for t in tables:
        title = f"{tex_escape(t.method)}, {t.shots} shots"
        out += ["", f"% {title}", r"\begin{tabular}{lc}", r"\toprule",
                _tex_row([f"\\multicolumn{{2}}{{l}}{{{title}}}"]), r"\midrule", _tex_row(["Dataset", "Accuracy"]),
                r"\midrule"]
        out += [_tex_row([tex_escape(r.name), _tex_pm(r.acc, ci)]) for r in t.rows]
        out += [r"\midrule", _tex_row([f"Average ({_n(len(t.rows))})", f"{t.average:.2f}"]), r"\bottomrule",
                r"\end{tabular}",
                f"% Accuracy: mean $\\pm$ {_tex_spread([r.acc for r in t.rows], ci)} over "
                f"{_tex_seeds_note([r.acc.n for r in t.rows])}; "
                "Average: mean of the dataset means."]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- few-shot
def fewshot_markdown(tables: list[FewShotTable], ci: bool = False) -> str:
    out: list[str] = []
    for t in tables:
        rows = [[r.name, mean_pm(r.acc), str(r.acc.n)] + ([_ci(r.acc)] if ci else []) for r in t.rows]
        rows.append([f"**Average** ({_n(len(t.rows))})", f"{t.average:.2f}", ""] + ([""] if ci else []))
        out += [f"### {t.method}, {t.shots} shots", ""]
        out += _md_table(["Dataset", "Accuracy", "Seeds"] + (["95% CI"] if ci else []), rows, "lrr" + "r" * ci)
        out += ["", f"Accuracy: {spread_note([r.acc for r in t.rows], ci)}; Average: mean of the dataset means.", ""]
    return "\n".join(out)


def fewshot_dict(tables: list[FewShotTable], ci: bool = False) -> dict:
    out: dict = {}
    for t in tables:
        out.setdefault(t.method, {})[str(t.shots)] = {
            "datasets": {r.name: stat_dict(r.acc, ci) for r in t.rows},
            "average": t.average}
    return {"methods": out}


def fewshot_csv(tables: list[FewShotTable], ci: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "shots", "dataset", "name", "acc_mean", "acc_std", "n"] + (["acc_ci95"] if ci else []))
    for t in tables:
        for r in t.rows:
            w.writerow([t.method, t.shots, r.stem, r.name, r.acc.mean, csv_spread(r.acc.std, r.acc.n), r.acc.n]
                       + ([csv_spread(r.acc.ci95, r.acc.n)] if ci else []))
        w.writerow([t.method, t.shots, "average", "Average", t.average, "", len(t.rows)] + ([""] if ci else []))
    return buf.getvalue()


# ---------------------------------------------------------------- sweep
def _g(x: float) -> str:
    return format(x, "g")


def best_line(s: Sweep) -> str:
    b = s.best
    return (f"Best cell: alpha={_g(b.alpha)}, beta={_g(b.beta)}: HM {b.hm:.2f} "
            f"(Base {mean_pm(b.base)}, New {mean_pm(b.new)}, {b.base.n} seeds)")


def sweep_markdown(sweeps: list[Sweep], ci: bool = False) -> str:
    out: list[str] = []
    for s in sweeps:
        header = ["alpha \\ beta"] + [_g(b) for b in s.betas]
        rows = []
        best = s.best
        for a in s.alphas:
            row = [_g(a)]
            for b in s.betas:
                c = s.cell(a, b)
                text = "—" if c is None else f"{c.hm:.2f}"
                row.append(f"**{text}**" if c is best else text)
            rows.append(row)
        out += [f"### {s.method}, {s.name}: HM over (alpha, beta)", ""]
        out += _md_table(header, rows, "l" + "r" * len(s.betas))
        line = best_line(s)
        if ci:
            line += f"; 95% CI of Base {_ci(s.best.base)}, of New {_ci(s.best.new)}"  # type: ignore[union-attr]
        out += ["", "HM of the seed-mean Base and New of each cell; — = no completed run.", line,
                f"Base/New: {spread_note([s.best.base], ci)}.", ""]  # type: ignore[union-attr]
    return "\n".join(out)


def sweep_dict(sweeps: list[Sweep], ci: bool = False) -> dict:
    def cell(c) -> dict:  # noqa: ANN001
        return {"alpha": c.alpha, "beta": c.beta, "base": stat_dict(c.base, ci), "new": stat_dict(c.new, ci),
                "hm": c.hm}

    return {"sweeps": [{"method": s.method, "dataset": s.name, "cells": [cell(c) for c in s.cells],
                        "best": cell(s.best)} for s in sweeps]}


def sweep_csv(sweeps: list[Sweep], ci: bool = False) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "dataset", "name", "alpha", "beta", "base_mean", "base_std", "new_mean", "new_std", "n",
                "hm", "best"] + (CI_CSV_FIELDS if ci else []))
    for s in sweeps:
        for c in s.cells:
            w.writerow([s.method, s.stem, s.name, c.alpha, c.beta, c.base.mean, csv_spread(c.base.std, c.base.n),
                        c.new.mean, csv_spread(c.new.std, c.new.n), c.base.n, c.hm, int(c is s.best)]
                       + ([csv_spread(c.base.ci95, c.base.n), csv_spread(c.new.ci95, c.new.n)] if ci else []))
    return buf.getvalue()


# ---------------------------------------------------------------- problems
def _listing(header: str, items: Sequence[RunRecord | Problem], root: Path) -> list[str]:
    if not items:
        return []
    lines = [f"{header} ({len(items)}):"]
    for r in items:
        try:
            rel = r.path.relative_to(root).as_posix()
        except ValueError:
            rel = str(r.path)
        lines.append(f"- {r.path if rel == '.' else rel}: {r.problem}")
    return lines


def incomplete_lines(runs: Sequence[RunRecord | Problem], root: Path, left_out: Sequence[Problem] = (),
                     what: str = "runs", warnings: Sequence[Problem] = ()) -> list[str]:
    """The report's problems list: runs that could not be read, then those not averaged with the others
    (collect.sort_out: left out, or a mixture reported as separate tables), then warnings about runs that are
    averaged (reports/checks.py); paths relative to ``root``."""
    return (_listing(f"Incomplete or failed {what}", runs, root)
            + _listing("Not averaged with the others", left_out, root)
            + _listing("Warnings", warnings, root))


def dumps(obj: dict) -> str:
    def clean(x):  # noqa: ANN001, ANN202 - JSON has no NaN/inf
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2)
