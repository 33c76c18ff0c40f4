"""The cross-dataset (``--xd``) and domain-generalisation (``--dg``) tables: source accuracy, each target, the
average over the targets; mean and std over seeds (sample std, ddof 1, unless ddof=0 asks for the population std).

Layout (written by scripts/xd.sh and scripts/dg.sh, ``ROOT`` = ``output/transfer``): the source run
``ROOT/<method>/imagenet/seed<S>/results.json`` (``{"all": {"accuracy"}}``); a target's accuracy is
``<source run>/eval/<target>/results.json`` (the source run evaluated there, ``clipkd eval --run DIR --dataset``)
or, for a transductive method that trains on every dataset, the run ``ROOT/<method>/<target>/seed<S>/results.json``.
A target with both for one seed is ambiguous and listed as a problem. The warnings of the base-to-new tables
(reports/checks.py: first-epoch selection, a far seed, missing seeds, base-test selection, methods on different
target/seed sets) are checked by the same rules, a value being one column (source or target) of one seed.
ROOT may also be a method folder (its name is then read from the path above), as for the base-to-new report.

Average: the mean of the per-target seed means over the targets present (the papers average their targets'
means); the table says how many targets it covers, so a partial average is never mistaken for the full one.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

from clipkd.data.specs import DG_TARGETS, TRANSFER_SOURCE, XD_TARGETS
from clipkd.reports.aggregate import SAMPLE, Stat, dataset_name
from clipkd.reports.checks import warnings as check_warnings
from clipkd.reports.collect import (BASE_TEST_MARK, KIND_B2N, RESULTS_FILE, Problem, RunRecord, _read_results,
                                    _results_fields, collect, sort_out)
from clipkd.reports.published import PublishedTransfer
from clipkd.reports.render import (_ci, _md_table, _tex_pm, _tex_row, _tex_seeds_note, _tex_spread, csv_spread,
                                   incomplete_lines, mean_pm, spread_note, stat_dict, tex_escape)
from clipkd.rundir import eval_results_path

SETTINGS: dict[str, tuple[str, ...]] = {"xd": XD_TARGETS, "dg": DG_TARGETS}
TITLES = {"xd": "Cross-dataset transfer", "dg": "Domain generalisation"}
TransferReference = tuple[list[PublishedTransfer], str]  # published rows, source


@dataclass
class TransferRow:
    method: str
    source: Stat | None
    targets: dict[str, Stat] = field(default_factory=dict)  # stem -> accuracy over seeds
    seeds: tuple[int, ...] = ()  # the seeds of the source runs

    def average(self, targets: tuple[str, ...]) -> float | None:
        """Mean of the target means over the targets present (None when none is)."""
        means = [self.targets[t].mean for t in targets if t in self.targets]
        return sum(means) / len(means) if means else None


@dataclass
class TransferTable:
    setting: str  # "xd" | "dg"
    rows: list[TransferRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # runs and evaluations that could not be read
    left_out: list[Problem] = field(default_factory=list)  # not averaged with the others (collect.sort_out)
    warnings: list[Problem] = field(default_factory=list)  # about what is averaged (reports/checks.py)

    @property
    def targets(self) -> tuple[str, ...]:
        return SETTINGS[self.setting]

    def n_targets(self, row: TransferRow) -> int:
        return sum(t in row.targets for t in self.targets)


def _all_accuracy(file: Path) -> tuple[float | None, str]:
    """``all.accuracy`` of a results.json (a run's, or an evaluation's under ``eval/<stem>/``), or None and why."""
    results, why = _read_results(file.parent, ("all",))
    if results is None:
        if why.startswith("malformed"):
            why += " (a base-to-new run? the transfer settings train and evaluate on all classes)"
        return None, why
    return results["all"], ""


def _method(run: RunRecord) -> str:
    selected = _results_fields(run.path).get("selected_on", "last")
    return run.method + (BASE_TEST_MARK if selected == "base_test" else "")


def transfer_table(root: str | Path, setting: str, method: str | None = None, ddof: int = SAMPLE) -> TransferTable:
    """Collect the runs under ``root`` and aggregate one setting's table (rows: methods, sorted; std with ``ddof``)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, not {setting!r}")
    targets = SETTINGS[setting]
    col = collect(root)
    table = TransferTable(setting)
    values: dict[tuple[str, str, int], tuple[float, Path]] = {}  # (method, stem, seed) -> accuracy, file
    sources: dict[str, dict[int, float]] = {}
    runs, accuracy = [], {}
    for run in col.runs:
        if run.kind != KIND_B2N or not run.placed:
            if run.kind in (KIND_B2N, None) and run.problem:
                table.problems.append(Problem(run.path, run.problem))
            continue
        if method is not None and _method(run).removesuffix(BASE_TEST_MARK) != method:
            continue
        if run.dataset != TRANSFER_SOURCE and run.dataset not in targets:
            continue
        acc, why = _all_accuracy(run.path / RESULTS_FILE)
        if acc is None:
            table.problems.append(Problem(run.path, why))
        else:
            accuracy[run.path] = acc
            runs.append(run)
    runs, table.left_out = sort_out(runs, _method)  # a method's row: one kind of run, each seed once
    trained = [replace(run, method=_method(run)) for run in runs]  # the warnings' runs, named as their rows
    cells = []  # the warnings' values: one per method, column and seed
    for run in runs:
        name, acc = _method(run), accuracy[run.path]
        assert run.seed is not None
        if run.dataset != TRANSFER_SOURCE:
            _put(values, (name, run.dataset, run.seed), acc, run.path / RESULTS_FILE, table)
            continue
        sources.setdefault(name, {})[run.seed] = acc
        cells.append(replace(run, method=name, results={"all": acc}))
        for stem in targets:
            file = eval_results_path(run.path, stem)
            if file.parent.is_dir():
                acc, why = _all_accuracy(file)
                if acc is None:
                    table.problems.append(Problem(file.parent, why))
                else:
                    _put(values, (name, stem, run.seed), acc, file, table)
    methods = sorted(set(sources) | {m for m, _, _ in values})
    for name in methods:
        src = sources.get(name, {})
        row = TransferRow(name, Stat.of([src[s] for s in sorted(src)], ddof) if src else None, seeds=tuple(sorted(src)))
        for stem in targets:
            accs = [values[k][0] for k in sorted(values) if k[0] == name and k[1] == stem]
            if accs:
                row.targets[stem] = Stat.of(accs, ddof)
        table.rows.append(row)
    cells += [RunRecord(file.parent, KIND_B2N, name, stem, seed, results={"all": acc}, level=0)
              for (name, stem, seed), (acc, file) in sorted(values.items())]
    table.warnings = check_warnings(trained, KIND_B2N, values=cells)  # tables by method, rows by column
    return table


def _put(values: dict, key: tuple[str, str, int], acc: float, file: Path, table: TransferTable) -> None:
    if key in values:
        other = values.pop(key)[1]
        table.problems.append(Problem(file, f"{key[1]} seed{key[2]} of {key[0]} is also in {other} (an evaluation of "
                                            "the source run and a run of its own): keep one of them"))
        return
    values[key] = (acc, file)


# ---------------------------------------------------------------- rendering
def _cell(s: Stat | None) -> str:
    return "—" if s is None else mean_pm(s)


def _stats(table: TransferTable) -> list[Stat]:
    """Every source and target Stat of the table (what its spread note describes)."""
    return [s for r in table.rows for s in ([r.source] if r.source else []) + list(r.targets.values())]


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _published_rows(table: TransferTable, ref: TransferReference | None) -> list[tuple[str, PublishedTransfer]]:
    return [] if ref is None else [(f"published: {p.method}", p) for p in ref[0]]


def _delta(row: TransferRow, p: PublishedTransfer, targets: tuple[str, ...]) -> list[str]:
    """ours - published per column (source, targets, average); — where either side is missing."""
    out = [f"{row.source.mean - p.source:+.2f}" if row.source and p.source is not None else "—"]
    for t in targets:
        out.append(f"{row.targets[t].mean - p.targets[t]:+.2f}" if t in row.targets and t in p.targets else "—")
    avg = row.average(targets)
    full = all(t in row.targets for t in targets)
    out.append(f"{avg - p.average:+.2f}" if full and avg is not None and p.average is not None else "—")
    return out


def _ci_cell(s: Stat | None) -> str:
    return "—" if s is None else _ci(s)


def transfer_markdown(table: TransferTable, ref: TransferReference | None = None, ci: bool = False) -> str:
    """With ``ci``: after Seeds, a column per source and target with the half-width of the 95% CI of its mean (as
    the base-to-new table's Base/New 95% CI columns)."""
    t = table.targets
    header = ["Method", f"{dataset_name(TRANSFER_SOURCE)} (source)", *(dataset_name(s) for s in t), "Average",
              "Targets", "Seeds"]
    if ci:
        header += [f"{dataset_name(s)} 95% CI" for s in (TRANSFER_SOURCE, *t)]
    blank = [""] * (len(t) + 1 if ci else 0)
    rows = []
    for r in table.rows:
        rows.append([r.method, _cell(r.source), *(_cell(r.targets.get(s)) for s in t), _num(r.average(t)),
                     f"{table.n_targets(r)}/{len(t)}", str(len(r.seeds))])
        if ci:
            rows[-1] += [_ci_cell(r.source), *(_ci_cell(r.targets.get(s)) for s in t)]
    for label, p in _published_rows(table, ref):
        rows.append([label, _num(p.source), *(_num(p.targets.get(s)) for s in t), _num(p.average), "", "", *blank])
        for r in table.rows:
            if r.method == p.recipe:
                rows.append([f"Δ {r.method} - published", *_delta(r, p, t), "", "", *blank])
    out = [f"### {TITLES[table.setting]}: {dataset_name(TRANSFER_SOURCE)} -> {len(t)} targets", ""]
    out += _md_table(header, rows, "l" + "r" * (len(header) - 1))
    out += ["", f"Accuracy (%) over all classes of each test set: {spread_note(_stats(table), ci)}. Average: mean of "
            "the target means over the targets present (Targets); the papers' average needs all of them. Seeds: "
            "source runs."]
    if ref:
        out.append(f"Published: {ref[1]}; Δ = ours - published.")
    return "\n".join(out) + "\n"


def transfer_dict(table: TransferTable, ref: TransferReference | None = None, ci: bool = False) -> dict:
    """``{"setting", "source", "targets", "methods": {M: {"source": {mean,std,n[,ci95]}|null, "targets": {stem:
    ...}, "average", "n_targets", "seeds"}}}`` (+ ``"published"``, ``"published_source"`` with a reference)."""
    t = table.targets

    def stat(s: Stat | None) -> dict | None:
        return None if s is None else stat_dict(s, ci)

    out: dict = {"setting": table.setting, "source": TRANSFER_SOURCE, "targets": list(t), "methods": {
        r.method: {"source": stat(r.source), "targets": {s: stat(r.targets[s]) for s in t if s in r.targets},
                   "average": r.average(t), "n_targets": table.n_targets(r), "seeds": list(r.seeds)}
        for r in table.rows}}
    if ref:
        out["published"] = {p.method: {"recipe": p.recipe, "source": p.source, "targets": dict(p.targets),
                                       "average": p.average} for p in ref[0]}
        out["published_source"] = ref[1]
    return out


TRANSFER_CSV_FIELDS = ["setting", "method", "dataset", "name", "role", "mean", "std", "n"]
TRANSFER_CI_FIELD = "ci95"


def transfer_csv(table: TransferTable, ref: TransferReference | None = None, ci: bool = False) -> str:
    """Long format: one line per method and column (role source / target / average); published rows have
    method ``published: <name>`` and no std/n; with ``ci`` a ci95 column (the average and published rows: empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TRANSFER_CSV_FIELDS + ([TRANSFER_CI_FIELD] if ci else []))
    t = table.targets

    def stat_row(method: str, stem: str, role: str, st: Stat) -> None:
        w.writerow([table.setting, method, stem, dataset_name(stem), role, st.mean, csv_spread(st.std, st.n), st.n]
                   + ([csv_spread(st.ci95, st.n)] if ci else []))

    def bare_row(method: str, stem: str, name: str, role: str, mean: float, n: int | str) -> None:
        w.writerow([table.setting, method, stem, name, role, mean, "", n] + ([""] if ci else []))

    for r in table.rows:
        if r.source is not None:
            stat_row(r.method, TRANSFER_SOURCE, "source", r.source)
        for s in t:
            if s in r.targets:
                stat_row(r.method, s, "target", r.targets[s])
        avg = r.average(t)
        if avg is not None:
            bare_row(r.method, "average", "Average", "average", avg, table.n_targets(r))
    for label, p in _published_rows(table, ref):
        if p.source is not None:
            bare_row(label, TRANSFER_SOURCE, dataset_name(TRANSFER_SOURCE), "source", p.source, "")
        for s in t:
            if s in p.targets:
                bare_row(label, s, dataset_name(s), "target", p.targets[s], "")
        if p.average is not None:
            bare_row(label, "average", "Average", "average", p.average, "")
    return buf.getvalue()


def transfer_latex(table: TransferTable, ref: TransferReference | None = None, ci: bool = False) -> str:
    """One booktabs ``tabular``: methods as rows; the source, each target and the average as columns (the papers'
    layout); mean $\\pm$ std (with ``ci``: $\\pm$ the 95% CI half-width, as the base-to-new tables) where a method
    has several seeds. Needs ``\\usepackage{booktabs}``."""
    t = table.targets
    ncols = len(t) + 3
    out = [f"% \\usepackage{{booktabs}}; written by clipkd report --{table.setting} --format latex",
           "\\begin{tabular}{l" + "c" * (ncols - 1) + "}", r"\toprule",
           _tex_row(["", "Source", f"\\multicolumn{{{len(t)}}}{{c}}{{Target}}", ""]),
           f"\\cmidrule(lr){{2-2}} \\cmidrule(lr){{3-{len(t) + 2}}}",
           _tex_row(["Method", tex_escape(dataset_name(TRANSFER_SOURCE)),
                     *(tex_escape(dataset_name(s)) for s in t), "Average"]),
           r"\midrule"]
    for r in table.rows:
        out.append(_tex_row([tex_escape(r.method), _tex_pm(r.source, ci) if r.source else "--",
                             *(_tex_pm(r.targets[s], ci) if s in r.targets else "--" for s in t),
                             f"{r.average(t):.2f}" if r.average(t) is not None else "--"]))
    published = _published_rows(table, ref)
    if published:
        out.append(r"\midrule")
        for label, p in published:
            out.append(_tex_row([tex_escape(label), _num(p.source).replace("—", "--"),
                                 *(_num(p.targets.get(s)).replace("—", "--") for s in t),
                                 _num(p.average).replace("—", "--")]))
    out += [r"\bottomrule", r"\end{tabular}"]
    counts = [r.source.n for r in table.rows if r.source] + [s.n for r in table.rows for s in r.targets.values()]
    out.append(f"% Accuracy over all classes of each test set: mean $\\pm$ {_tex_spread(_stats(table), ci)} over "
               f"{_tex_seeds_note(counts or [1])}; Average: mean of the target means over the targets present "
               f"({', '.join(f'{r.method}: {table.n_targets(r)}/{len(t)}' for r in table.rows)}).")
    if ref:
        out.append(f"% Published: {tex_escape(ref[1])}.")
    return "\n".join(out) + "\n"


def problem_lines(table: TransferTable, root: Path) -> list[str]:
    """The runs and evaluations that could not be read, those not averaged with the others, and the warnings about
    those that are, relative to ROOT."""
    return incomplete_lines(table.problems, root, table.left_out, what="runs and evaluations", warnings=table.warnings)
