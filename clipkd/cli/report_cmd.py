"""``clipkd report``: Base/New/HM tables (and few-shot / sweep tables) from a folder of runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DESCRIPTION = """\
Collect the runs under ROOT and print seed-averaged tables.

Layouts: base-to-new ROOT/<method>/<dataset>/seed<S>/results.json;
few-shot ROOT/fewshot/<method>/<dataset>/shots<K>/seed<S>/results.json (--fewshot);
sweep ROOT/<method>/<dataset>/a<alpha>_b<beta>/seed<S>/results.json (--sweep).

Base/New: mean and population std (ddof=0) over seeds; HM: harmonic mean of the mean Base and mean New.
Average row: HM of the dataset-mean Base and dataset-mean New (not the mean of per-dataset HMs).
Run folders without a readable results.json are listed as incomplete/failed (after the table for md,
on stderr for csv/json so that stdout stays machine-readable).

--format json prints {"datasets": {NAME: {"base": {"mean","std","n"}, "new": {...}, "hm"}},
"average": {"base","new","hm"}} for ONE method: when ROOT holds several methods, pick one with --method
(md and csv print every method; csv has a method column). With --compare published, json entries gain
"published" and "delta" (ours - published) keys. --fewshot json: {"methods": {M: {K: {"datasets", "average"}}}};
--sweep json: {"sweeps": [{"method", "dataset", "cells", "best"}]}.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="seed-averaged Base/New/HM tables (or few-shot / sweep tables) from a folder of runs",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", help="results folder holding <method>/<dataset>/seed<S>/ run folders")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    p.add_argument("--method", help="only this method (required for --format json when ROOT holds several)")
    p.add_argument("--dataset", help="only this dataset (stem, e.g. oxford_pets, or NAME, e.g. OxfordPets)")
    p.add_argument("--compare", choices=("published",),
                   help="add the published PromptKD numbers (CVPR 2024, Table 1) and deltas ours - published")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fewshot", action="store_true", help="few-shot tables, one per method and K")
    mode.add_argument("--sweep", action="store_true", help="HM per (alpha, beta) cell and the best cell")
    p.add_argument("--plot", metavar="FILE.png",
                   help="with --sweep: heatmap of HM over (alpha, beta) (needs matplotlib: the 'plot' extra); "
                        "several sweeps write FILE_<method>_<dataset>.png")
    p.set_defaults(func=cmd_report)


def _dataset_stem(name: str) -> str:
    from clipkd.data.specs import DATASETS

    for spec in DATASETS.values():
        if name in (spec.stem, spec.name):
            return spec.stem
    return name  # an unknown dataset folder is still selectable by its folder name


def cmd_report(args: argparse.Namespace) -> int:
    from clipkd.errors import ClipkdError
    from clipkd.reports import aggregate, render
    from clipkd.reports.collect import KIND_B2N, KIND_FEWSHOT, KIND_SWEEP, collect
    from clipkd.reports.published import REFERENCES

    if args.plot and not args.sweep:
        raise ClipkdError("--plot draws a sweep heatmap: add --sweep")
    if args.compare and (args.sweep or args.fewshot):
        raise ClipkdError("--compare published applies to the base-to-new tables only (drop --sweep/--fewshot)")
    kind = KIND_SWEEP if args.sweep else KIND_FEWSHOT if args.fewshot else KIND_B2N
    col = collect(args.root)
    stem = _dataset_stem(args.dataset) if args.dataset else None

    def keep(r) -> bool:  # noqa: ANN001
        return (args.method is None or r.method == args.method) and (stem is None or r.dataset == stem)

    runs = [r for r in col.complete(kind) if keep(r)]
    bad = [r for r in col.incomplete(kind) if r.kind is None or keep(r)]
    if not runs:
        what = {KIND_B2N: "base-to-new <method>/<dataset>/seed<S>", KIND_FEWSHOT: "few-shot fewshot/<method>/"
                "<dataset>/shots<K>/seed<S>", KIND_SWEEP: "sweep <method>/<dataset>/a<alpha>_b<beta>/seed<S>"}[kind]
        found = f" ({len(bad)} incomplete: {bad[0].path})" if bad else ""
        raise ClipkdError(f"no completed {what} runs under {args.root}"
                          + (f" for --method {args.method}" if args.method else "")
                          + (f" --dataset {args.dataset}" if args.dataset else "") + found)

    if kind == KIND_B2N:
        tables = aggregate.base_to_new_tables(runs)
        ref = REFERENCES[args.compare] if args.compare else None
        if args.format == "json":
            if len(tables) > 1:
                raise ClipkdError(f"several methods under {args.root} ({', '.join(t.method for t in tables)}): "
                                  "--format json reports one, pick it with --method")
            text = render.dumps(render.b2n_dict(tables[0], ref))
        else:
            text = render.b2n_csv(tables, ref) if args.format == "csv" else render.b2n_markdown(tables, ref)
    elif kind == KIND_FEWSHOT:
        ftables = aggregate.fewshot_tables(runs)
        text = {"md": render.fewshot_markdown, "csv": render.fewshot_csv,
                "json": lambda t: render.dumps(render.fewshot_dict(t))}[args.format](ftables)
    else:
        sweeps = aggregate.sweeps(runs)
        text = {"md": render.sweep_markdown, "csv": render.sweep_csv,
                "json": lambda s: render.dumps(render.sweep_dict(s))}[args.format](sweeps)
        if args.plot:
            from clipkd.reports.plot import plot_sweep

            out = Path(args.plot)
            for s in sweeps:
                path = out if len(sweeps) == 1 else out.with_name(f"{out.stem}_{s.method}_{s.stem}{out.suffix}")
                plot_sweep(s, path)
                print(f"wrote {path}", file=sys.stderr)

    print(text.rstrip("\n"))
    lines = render.incomplete_lines(bad, col.root)
    if lines:
        if args.format == "md":
            print()
            print("\n".join(lines))
        else:
            print("\n".join(lines), file=sys.stderr)
    return 0
