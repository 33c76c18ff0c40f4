"""``clipkd report``: Base/New/HM tables (and few-shot / sweep tables) from a folder of runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_DESCRIPTION = """\
Collect the runs under ROOT and print seed-averaged tables.

Layouts: base-to-new ROOT/<method>/<dataset>/seed<S>/results.json;
few-shot ROOT/fewshot/<method>/<dataset>/shots<K>/seed<S>/results.json (--fewshot);
sweep ROOT/<method>/<dataset>/a<alpha>_b<beta>/seed<S>/results.json (--sweep);
cross-dataset / domain generalisation ROOT/<method>/imagenet/seed<S>/results.json with eval/<target>/results.json
inside, or ROOT/<method>/<target>/seed<S>/ for transductive methods (--xd, --dg; scripts/xd.sh and dg.sh write
output/transfer); --std, --ci and the warnings below apply to their source and target columns as to Base/New.
ROOT may also be a folder lower in these trees: a method folder (output/base2new/<method>,
output/sweep/<method>, output/fewshot/<method>), a dataset folder below it, or a single run folder (seed<S>);
the method and dataset names are then read from the folders above ROOT. A run folder holds config.yaml
(and results.json once finished).

Base/New: mean and sample std (ddof 1) over seeds (--std population: ddof 0, as Dassl's parse_test_res.py,
which understates the spread of 3 seeds); --ci adds the half-width of a t-based 95% confidence interval of each
seed mean (t(0.975, n-1) s / sqrt(n)); with one seed a sample std or CI is "n/a (1 seed)" (null in json).
HM: harmonic mean of the mean Base and mean New. Average row: HM of the dataset-mean Base and dataset-mean New,
as the papers, with the mean of the per-dataset HMs beside it (json "mean_hm", csv mean_dataset_hm).
Warnings (after the table, with the problems): a run whose final model is its first epoch of several, a seed far
from the others (more than 3 scaled MADs from the median and more than 1 point), missing seeds, runs selected on
base test, and methods compared on different dataset/seed sets.
Run folders without a readable results.json are listed as incomplete/failed (after the table for md and html,
on stderr for csv/json so that stdout stays machine-readable).
Only runs of one kind are averaged together: the same DISTILL.PROTOCOL, DATASET.NUM_SHOTS, teacher (zero-shot,
prompted, none) and final-epoch selection (results.json selected_on). A table mixing kinds is split into one
per kind, named by what differs (e.g. "kd [transductive]"), and the mixture is listed with the problems; a run
whose config.yaml names another dataset (or K) than its folder, and a seed present twice (seed1 and seed01),
are listed and left out; an accuracy outside [0, 100] makes results.json malformed.

--format json prints {"datasets": {NAME: {"base": {"mean","std","n"} (+ "ci95" with --ci), "new": {...}, "hm"}},
"average": {"base","new","hm","mean_hm"}} for ONE method: when ROOT holds several methods, pick one with --method
(md and csv print every method; csv has a method column). With --compare published, json entries gain
"published" and "delta" (ours - published) keys. --fewshot json: {"methods": {M: {K: {"datasets", "average"}}}};
--sweep json: {"sweeps": [{"method", "dataset", "cells", "best"}]}.

--format html prints one self-contained page (no scripts, nothing fetched: tables, problems and warnings, figures
embedded as PNG when matplotlib is installed) for every mode; -o FILE writes any format to FILE instead.

--format latex prints one booktabs tabular per method (datasets as rows; Base, New, HM as columns; the
Average row below a rule; mean ± std where a dataset has several seeds) or, with --fewshot, per method and K;
the paper needs the booktabs package.

--compare A B: method A vs method B on the datasets and seeds both have: A - B in Base, New and HM per dataset
and on average, each with a 95% CI from a paired bootstrap (--resamples, default 10000; --seed) that resamples
seeds and, within each seed, test images from each run's predictions.npz (the same images for both methods);
runs without usable prediction files resample seeds only, and the row says so. Beside it a paired t-test over
seeds (n/a with 1 seed) and a verdict on HM: "A better" / "B better" when the CI excludes 0, else "not resolved".

--plot DIR also draws the report as PNGs in DIR (matplotlib: pip install 'clipkd[plot]'), printing "wrote PATH"
on stderr for each: b2n_<method>.png (Base, New and HM per dataset and on average, error bars over seeds; HM's
from the per-seed HMs) and, with several methods, b2n_hm.png (HM per dataset, methods side by side); --fewshot:
fewshot.png (accuracy vs shots per dataset and on average, one line per method, bands of mean ± spread);
--compare A B: compare_<A>_vs_<B>.png (Δ HM per dataset and on average with its bootstrap CI, a line at 0, the
verdict as the marker); --xd/--dg: xd.png/dg.png. Error bars and bands: the std, or with --ci the 95% t-CI; an
average over datasets gets one only when all datasets have the same seeds. A file in the way that is not a PNG
is never overwritten. With --sweep, --plot FILE.png draws the HM heatmap (see --plot below).

Dassl's tools/parse_test_res.py reads one accuracy per seed folder (the last "* accuracy: X%" line of
<seed>/log.txt after a "Finish training" line, or after "=> result" with --test-log). A run's own log.txt
ends like a Dassl training log with its base result (all, for few-shot runs), so
"parse_test_res.py output/base2new/<method>/<dataset>" prints the seed-mean Base. For New, --dassl-logs DIR
writes the CoOp trees DIR/train_base/<dataset>/<method>/seed<S>/log.txt (Base) and
DIR/test_new/<dataset>/<method>/seed<S>/log.txt (New: parse it with --test-log) from results.json.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="seed-averaged Base/New/HM tables (or few-shot / sweep tables) from a folder of runs",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT",
                   help="results folder holding <method>/<dataset>/seed<S>/ run folders (e.g. output/base2new), "
                        "or a method, dataset or run folder below it")
    p.add_argument("--format", choices=("md", "csv", "json", "latex", "html"), default="md",
                   help="output format (default md; latex: booktabs tables for a paper, not with --sweep; html: one "
                        "self-contained page with the tables, problems and figures, to open in a browser or send)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the report to FILE (atomically: the old file or the whole new one, never half) "
                        "instead of stdout; md and html put the problems into FILE, csv/json/latex leave them on "
                        "stderr; not a folder, not inside a run folder")
    p.add_argument("--method", help="only this method (required for --format json when ROOT holds several)")
    p.add_argument("--dataset", help="only this dataset (stem, e.g. oxford_pets, or NAME, e.g. OxfordPets)")
    p.add_argument("--compare", nargs="+", metavar="published | A B",
                   help="'published': add the published PromptKD numbers (CVPR 2024, Table 1) and deltas ours - "
                        "published; two methods A B: A - B in Base, New and HM per dataset and on average, with "
                        "paired-bootstrap CIs, a paired t-test over seeds and a verdict (see below)")
    p.add_argument("--seed", type=int, help="with --compare A B: the bootstrap's random seed (default 0)")
    p.add_argument("--resamples", type=int,
                   help="with --compare A B: bootstrap replicates (default 10000)")
    p.add_argument("--std", choices=("sample", "population"), default="sample",
                   help="std over seeds: sample (ddof 1, default) or population (ddof 0, as Dassl's "
                        "parse_test_res.py)")
    p.add_argument("--ci", action="store_true",
                   help="add the half-width of the t-based 95%% confidence interval of each seed mean")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fewshot", action="store_true", help="few-shot tables, one per method and K")
    mode.add_argument("--sweep", action="store_true", help="HM per (alpha, beta) cell and the best cell")
    mode.add_argument("--xd", action="store_true",
                      help="cross-dataset table: ImageNet source and the 10 other datasets, all classes, from "
                           "ROOT/<method>/imagenet/seed<S>/ and its eval/<target>/ (scripts/xd.sh writes "
                           "output/transfer)")
    mode.add_argument("--dg", action="store_true",
                      help="domain-generalisation table: ImageNet source and ImageNetV2/-Sketch/-A/-R, from the same "
                           "runs (scripts/dg.sh)")
    p.add_argument("--plot", metavar="DIR",
                   help="also draw the report as PNGs in folder DIR (created; needs matplotlib: the 'plot' "
                        "extra): base-to-new b2n_<method>.png (Base/New/HM bars with error bars) and b2n_hm.png "
                        "(HM per dataset, methods side by side) when ROOT holds several methods; --fewshot "
                        "fewshot.png (accuracy vs shots per dataset and average, bands over seeds); --compare A B "
                        "compare_<A>_vs_<B>.png (forest plot of Δ HM with its CI); --xd/--dg xd.png / dg.png. "
                        "Error bars: the std, or with --ci the 95%% t-CI. --sweep: --plot FILE.png, the HM "
                        "heatmap over (alpha, beta); several sweeps write FILE_<method>_<dataset>.png; an existing "
                        "folder (or a name ending in /) gets sweep_<method>_<dataset>.png inside. A file that is "
                        "not a PNG is never overwritten")
    p.add_argument("--dassl-logs", metavar="DIR",
                   help="also write the base-to-new results as Dassl logs that Dassl's unchanged "
                        "tools/parse_test_res.py reads the CoOp way: DIR/train_base/<dataset>/<method>/seed<S>/"
                        "log.txt (parse_test_res.py DIR/train_base/<dataset>/<method>) and DIR/test_new/... "
                        "(the same with --test-log); DIR must be new or empty")
    p.set_defaults(func=cmd_report)


def _no_runs_message(col, kind: str, args: argparse.Namespace, bad: list) -> str:  # noqa: ANN001
    """One line: why ROOT gave no completed runs of ``kind``, and which folder or option to use instead."""
    from clipkd.reports.collect import KIND_B2N, KIND_FEWSHOT, KIND_SWEEP, LAYOUTS

    name = {KIND_B2N: "base-to-new", KIND_FEWSHOT: "few-shot", KIND_SWEEP: "sweep"}
    flag = {KIND_B2N: "run without --fewshot/--sweep", KIND_FEWSHOT: "add --fewshot", KIND_SWEEP: "add --sweep"}
    example = {KIND_B2N: "output/base2new or output/base2new/<method>",
               KIND_FEWSHOT: "output or output/fewshot/<method>", KIND_SWEEP: "output/sweep or output/sweep/<method>"}
    root = args.root
    if not col.runs:
        return (f"no run folders under {root} (a run folder is seed<S>/ holding config.yaml, and results.json "
                f"once finished): pass the folder the runs were written to, e.g. {example[kind]}")
    msg = f"no completed {name[kind]} {LAYOUTS[kind]} runs under {root}"
    placed = [r for r in col.runs if r.kind == kind and r.placed]
    if args.method or args.dataset:
        msg += (f" for --method {args.method}" if args.method else "") + \
            (f" --dataset {args.dataset}" if args.dataset else "")
        methods = sorted({r.method for r in placed})
        if methods:
            msg += f" (methods here: {', '.join(methods)})"
    hints = []
    folders = [str(f) for f in col.deeper.get(kind, [])]
    if folders:
        more = f" or one of {len(folders) - 3} more" if len(folders) > 3 else ""
        hints.append(f"its {name[kind]} runs sit deeper than that: pass {' or '.join(folders[:3])}{more}")
    if not placed:
        others = [k for k in col.kinds() if k != kind]
        if others:
            hints.append(f"it holds {' and '.join(name[k] for k in others)} runs: "
                         + " or ".join(flag[k] for k in others))
    if hints:
        msg += "; " + "; ".join(hints)
    elif bad:
        msg += f" ({len(bad)} incomplete: {bad[0].path}: {bad[0].problem})"
    return msg


DASSL_TRAIN_BASE = "train_base"
DASSL_TEST_NEW = "test_new"


def _write_dassl_logs(runs: list, out: Path) -> None:
    """Each complete base-to-new run as two Dassl logs in the CoOp layout: ``train_base/<dataset>/<method>/
    seed<S>/log.txt`` ends like a Dassl training log with the Base result, ``test_new/...`` like a test log
    with the New result, each accuracy as results.json holds it."""
    import json

    from clipkd.engine.evaluate import dassl_log_lines  # imports torch: only when --dassl-logs asks for it
    from clipkd.errors import ClipkdError
    from clipkd.fileio import atomic_write_text

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClipkdError(f"--dassl-logs {out} is not a new or empty folder; remove it or pick another (logs "
                          "left there from other runs would be averaged in by parse_test_res.py)")
    seen: dict[tuple, Path] = {}
    for r in runs:
        key = (r.dataset, r.method, r.seed)
        if key in seen:
            raise ClipkdError(f"--dassl-logs: {seen[key]} and {r.path} are both {r.method}/{r.dataset}/seed{r.seed}; "
                              "pass a ROOT that holds one of them")
        seen[key] = r.path
    for r in runs:
        results = json.loads((r.path / "results.json").read_text(encoding="utf-8"))
        for folder, half, training in ((DASSL_TRAIN_BASE, "base", True), (DASSL_TEST_NEW, "new", False)):
            lines = dassl_log_lines(results, half, training=training)
            atomic_write_text(out / folder / r.dataset / r.method / f"seed{r.seed}" / "log.txt",
                              "\n".join(lines) + "\n")
    pairs = sorted({(r.dataset, r.method) for r in runs})
    print(f"wrote {2 * len(runs)} Dassl logs under {out}; e.g. python tools/parse_test_res.py "
          f"{out / DASSL_TRAIN_BASE / pairs[0][0] / pairs[0][1]} (Base), and {DASSL_TEST_NEW} in place of "
          f"{DASSL_TRAIN_BASE} with --test-log (New)", file=sys.stderr)


def _check_output(args: argparse.Namespace) -> None:
    """``-o FILE`` must name a file outside every run folder (a report written into seed1/ would sit among the
    run's own files, and be read as one of them); checked before any work, so a refused -o writes nothing."""
    from clipkd.errors import ClipkdError
    from clipkd.rundir import CONFIG_FILE, RESULTS_FILE, SEED_DIR

    given = args.output
    if given is None:
        return
    out = Path(given)
    suffix = {"md": "md", "csv": "csv", "json": "json", "latex": "tex", "html": "html"}[args.format]
    if given.endswith(("/", os.sep)) or out.is_dir():
        raise ClipkdError(f"-o {given} is a folder: give a file name, e.g. -o {out / ('report.' + suffix)}")
    target = out.resolve()
    root = Path(args.root).resolve()
    for folder in target.parents:
        if folder != target.parent and folder != root and root not in folder.parents:
            continue  # above ROOT only the folder the file goes into is checked
        if SEED_DIR.match(folder.name) or any((folder / m).is_file() for m in (CONFIG_FILE, RESULTS_FILE)):
            raise ClipkdError(f"-o {given}: {folder} is a run folder (seed<S>/ or holding {CONFIG_FILE}); write "
                              f"the report outside the run folders, e.g. -o report.{suffix}")


def _options(args: argparse.Namespace) -> list[str]:
    """The options that shaped the report, for the html page's header."""
    out = [f"--{name} {getattr(args, name)}" for name in ("method", "dataset") if getattr(args, name)]
    if args.compare:
        out.append("--compare " + (args.compare if isinstance(args.compare, str) else " ".join(args.compare)))
    out += [f"--{name} {getattr(args, name)}" for name in ("resamples", "seed") if getattr(args, name) is not None]
    if args.std != "sample":
        out.append(f"--std {args.std}")
    return out + ["--ci"] * bool(args.ci)


def _emit(args: argparse.Namespace, text: str, problems: list[str], mode: str, figure_kind: str | None = None,
          data: object = None) -> None:
    """The report to stdout or -o FILE: md and html with the problems inside, csv/json/latex with them on
    stderr (so that the output stays parseable)."""
    fmt = args.format
    if fmt == "html":
        from clipkd.reports import html

        figures, note = html.embedded_figures(figure_kind, data, args.ci) if figure_kind else ([], None)
        body = html.page(args.root, mode, text, problems, figures, note, options=_options(args))
    else:
        body = text.rstrip("\n") + "\n"
        if fmt == "md" and problems:
            body += "\n" + "\n".join(problems) + "\n"
    if args.output:
        from clipkd.fileio import atomic_write_text

        atomic_write_text(args.output, body)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(body)
    if fmt not in ("md", "html") and problems:
        print("\n".join(problems), file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from clipkd.errors import ClipkdError
    from clipkd.reports import aggregate, checks, render
    from clipkd.reports.collect import (BASE_TEST_MARK, KIND_B2N, KIND_FEWSHOT, KIND_SWEEP, collect, dataset_stem,
                                        sort_out)
    from clipkd.reports.published import REFERENCES

    _check_output(args)
    if args.compare and args.compare != ["published"]:
        if len(args.compare) != 2:
            raise ClipkdError(f"--compare {' '.join(args.compare)}: give 'published' or two methods A B")
        return _paired_report(args)
    if args.seed is not None or args.resamples is not None:
        raise ClipkdError("--seed and --resamples set the bootstrap of --compare A B: drop them or add --compare A B")
    if args.compare:
        args.compare = args.compare[0]  # "published": the tables below read it as a name
    if args.xd or args.dg:
        return _transfer_report(args)
    if args.plot:  # before any work: a bad target or a missing matplotlib fails at once
        if args.sweep:
            from clipkd.reports.plot import require_matplotlib

            require_matplotlib()
        else:
            _plot_folder(args.plot)
    if args.format == "latex" and args.sweep:
        raise ClipkdError("--format latex prints base-to-new and few-shot tables; for a sweep use md, csv or json")
    if args.dassl_logs and (args.sweep or args.fewshot):
        raise ClipkdError("--dassl-logs writes base-to-new runs (a few-shot run's own log.txt already ends with "
                          "its result in Dassl's form): drop --sweep/--fewshot")
    if args.compare and (args.sweep or args.fewshot):
        raise ClipkdError("--compare published applies to the base-to-new tables only (drop --sweep/--fewshot)")
    kind = KIND_SWEEP if args.sweep else KIND_FEWSHOT if args.fewshot else KIND_B2N
    col = collect(args.root)
    stem = dataset_stem(args.dataset) if args.dataset else None

    def keep(r) -> bool:  # noqa: ANN001
        method = r.method.removesuffix(BASE_TEST_MARK)  # --method M also shows M's base-test-selected runs
        return (args.method is None or method == args.method) and (stem is None or r.dataset == stem)

    runs = [r for r in col.complete(kind) if keep(r)]
    # runs that fit no layout, or sit where method/dataset cannot be read, are listed whatever the filters
    bad = [r for r in col.incomplete(kind) if not r.placed or keep(r)]
    if not runs:
        raise ClipkdError(_no_runs_message(col, kind, args, bad))
    # one table per (method, K) / (method, dataset) for few-shot / sweeps: runs of one kind, each seed once
    table_of = {KIND_B2N: lambda r: r.method, KIND_FEWSHOT: lambda r: (r.method, r.shots),
                KIND_SWEEP: lambda r: (r.method, r.dataset)}[kind]
    runs, left_out = sort_out(runs, table_of)
    if not runs:
        first = left_out[0]
        raise ClipkdError(f"no runs under {args.root} can be averaged: {len(left_out)} left out "
                          f"(e.g. {first.path}: {first.problem})")

    ddof = aggregate.POPULATION if args.std == "population" else aggregate.SAMPLE
    ci = args.ci
    fmt = "md" if args.format == "html" else args.format  # the page shows the md tables
    warnings = checks.warnings(runs, kind)
    if kind == KIND_B2N:
        tables = aggregate.base_to_new_tables(runs, ddof)
        ref = REFERENCES[args.compare] if args.compare else None
        if args.format == "json":
            if len(tables) > 1:
                pick = "" if args.method else "pick a method with --method, or "
                raise ClipkdError(f"several tables under {args.root} ({', '.join(t.method for t in tables)}): "
                                  f"--format json reports one: {pick}pass a ROOT that holds one of them")
            text = render.dumps(render.b2n_dict(tables[0], ref, ci))
        else:
            text = {"md": render.b2n_markdown, "csv": render.b2n_csv, "latex": render.b2n_latex}[fmt](
                tables, ref, ci)
        if args.dassl_logs:
            _write_dassl_logs(runs, Path(args.dassl_logs))
        if args.plot:
            _write_plots(args.plot, "b2n", tables, ci)
        figure_kind, data, mode = "b2n", tables, "base-to-new"
    elif kind == KIND_FEWSHOT:
        ftables = aggregate.fewshot_tables(runs, ddof)
        if args.plot:
            _write_plots(args.plot, "fewshot", ftables, ci)
        text = {"md": render.fewshot_markdown, "csv": render.fewshot_csv, "latex": render.fewshot_latex,
                "json": lambda t, c: render.dumps(render.fewshot_dict(t, c))}[fmt](ftables, ci)
        figure_kind, data, mode = "fewshot", ftables, "few-shot"
    else:
        sweeps = aggregate.sweeps(runs, ddof)
        text = {"md": render.sweep_markdown, "csv": render.sweep_csv,
                "json": lambda s, c: render.dumps(render.sweep_dict(s, c))}[fmt](sweeps, ci)
        figure_kind, data, mode = "sweep", sweeps, "sweep, HM over (alpha, beta)"
        if args.plot:
            from clipkd.reports.plot import report_figures, sweep_plot_paths

            _save_figures(report_figures("sweep", sweeps), sweep_plot_paths(args.plot, sweeps))

    # paths are shown relative to ROOT; when ROOT is itself a run folder, relative to its parent
    at_root = any(r.path == col.root for r in bad) or any(p.path == col.root for p in left_out)
    problems = render.incomplete_lines(bad, col.root.parent if at_root else col.root, left_out, warnings=warnings)
    _emit(args, text, problems, mode, figure_kind, data)
    return 0


def _paired_report(args: argparse.Namespace) -> int:
    """``--compare A B``: paired differences with bootstrap CIs (see clipkd/reports/compare.py)."""
    from clipkd.errors import ClipkdError
    from clipkd.reports import render
    from clipkd.reports.collect import KIND_B2N, collect, dataset_stem, sort_out
    from clipkd.reports.compare import compare, compare_csv, compare_dict, compare_markdown, compare_notes

    for given, name in ((args.sweep, "--sweep"), (args.fewshot, "--fewshot"), (args.xd, "--xd"), (args.dg, "--dg"),
                        (args.dassl_logs, "--dassl-logs"), (args.method, "--method"),
                        (args.format == "latex", "--format latex")):
        if given:
            raise ClipkdError(f"--compare A B compares two base-to-new methods (md, csv, json or html): drop {name}")
    for given, name in ((args.ci, "--ci"), (args.std != "sample", f"--std {args.std}")):
        if given:
            raise ClipkdError(f"{name} shapes the seed tables; --compare A B reports differences with their own "
                              "paired-bootstrap 95% CIs: drop it")
    if args.plot:
        _plot_folder(args.plot)
    col = collect(args.root)
    stem = dataset_stem(args.dataset) if args.dataset else None
    runs = [r for r in col.complete(KIND_B2N) if stem is None or r.dataset == stem]
    bad = [r for r in col.incomplete(KIND_B2N) if not r.placed or stem is None or r.dataset == stem]
    if not runs:
        raise ClipkdError(_no_runs_message(col, KIND_B2N, args, bad))
    runs, left_out = sort_out(runs)
    resamples = 10_000 if args.resamples is None else args.resamples
    result = compare(runs, args.compare[0], args.compare[1], resamples=resamples,
                     seed=0 if args.seed is None else args.seed)
    text = {"md": compare_markdown, "html": compare_markdown, "csv": compare_csv,
            "json": lambda c: render.dumps(compare_dict(c))}[args.format](result)
    if args.plot:
        _write_plots(args.plot, "compare", result, False)
    # md and html hold the notes under their table, json in "notes" and "left_out"
    notes = compare_notes(result) if args.format == "csv" else []
    at_root = any(r.path == col.root for r in bad) or any(p.path == col.root for p in left_out)
    problems = render.incomplete_lines(bad, col.root.parent if at_root else col.root, left_out)
    _emit(args, text, notes + problems, f"{result.a} vs {result.b}, paired bootstrap", "compare", result)
    return 0


def _transfer_report(args: argparse.Namespace) -> int:
    """``--xd`` / ``--dg``: the papers' transfer tables (see clipkd/reports/transfer.py)."""
    from clipkd.errors import ClipkdError
    from clipkd.reports import transfer
    from clipkd.reports.published import TRANSFER_REFERENCES

    setting = "xd" if args.xd else "dg"
    flag = f"--{setting}"
    for given, name in ((args.dassl_logs, "--dassl-logs"), (args.dataset, "--dataset")):
        if given:
            raise ClipkdError(f"{name} does not apply to {flag} (a table over all its datasets); drop it")
    if args.plot:
        _plot_folder(args.plot)
    ref = None
    if args.compare:
        rows, source = TRANSFER_REFERENCES[args.compare][setting]
        if not rows:
            raise ClipkdError(f"no published {transfer.TITLES[setting].lower()} numbers are stored (none could be "
                              "checked against a source; clipkd/reports/published.py says how to add them): drop "
                              "--compare")
        ref = (rows, source)
    from clipkd.reports.aggregate import POPULATION, SAMPLE

    table = transfer.transfer_table(args.root, setting, method=args.method,
                                    ddof=POPULATION if args.std == "population" else SAMPLE)
    root = Path(args.root)
    if not table.rows:
        where = f" for --method {args.method}" if args.method else ""
        hint = ("; " + table.problems[0].problem) if table.problems else ""
        raise ClipkdError(f"no completed {setting} runs under {root}{where}: expected "
                          f"<method>/imagenet/seed<S>/results.json (scripts/{setting}.sh writes output/transfer)"
                          f"{hint}")
    if args.plot:
        _write_plots(args.plot, "transfer", table, args.ci)
    render = {"md": transfer.transfer_markdown, "html": transfer.transfer_markdown, "csv": transfer.transfer_csv,
              "latex": transfer.transfer_latex}
    if args.format == "json":
        from clipkd.reports.render import dumps

        text = dumps(transfer.transfer_dict(table, ref, args.ci))
    else:
        text = render[args.format](table, ref, args.ci)
    _emit(args, text, transfer.problem_lines(table, root), transfer.TITLES[setting].lower(), "transfer", table)
    return 0


def _plot_folder(target: str) -> Path:
    """``--plot DIR`` checked before any work: matplotlib is there and DIR is (or can become) a folder."""
    from clipkd.errors import ClipkdError
    from clipkd.reports.plot import require_matplotlib

    require_matplotlib()
    folder = Path(target)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            which = "is a file" if p == folder else f"is under {p}, a file"
            raise ClipkdError(f"--plot {target} {which}, not a folder: give a folder for the PNGs (it is created), "
                              "e.g. --plot plots/")
        if p.exists():
            break
    return folder


def _write_plots(target: str, kind: str, data: object, ci: bool) -> None:
    """The report's figures as ``DIR/<stem>.png``; every target is checked before the first is written."""
    from clipkd.reports.plot import PLOT_SUFFIX, report_figures

    folder = _plot_folder(target)
    named = report_figures(kind, data, ci)
    _save_figures(named, [folder / f"{stem}{PLOT_SUFFIX}" for stem, _ in named])


def _save_figures(named: list, paths: list[Path]) -> None:
    """Each figure to its path; every path is checked before the first is written (nothing but a PNG is ever
    replaced)."""
    from clipkd.reports.plot import check_target, save_figure

    for path in paths:
        check_target(path)
    for (_, fig), path in zip(named, paths):
        print(f"wrote {save_figure(fig, path)}", file=sys.stderr)
