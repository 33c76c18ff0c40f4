"""``clipkd analyze``: confidence, entropy, tail mass, teacher agreement and calibration of runs, side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PLOT_FILE = "reliability.png"

_DESCRIPTION = """\
What the student's predicted distribution looks like on the test images of each half (base, new; all for
few-shot runs), read from each run's predictions.npz (checked against its results.json: a stale or corrupt file
is named and refused), for several runs side by side, e.g. KD vs ABKD or the cells of a sweep's row.

Per run: accuracy; conf, the mean top probability; p(label), the mean probability of the true class; entropy
(nats); top5-out, the mean mass outside the 5 most probable classes; agree, agreement of the student's prediction
with the teacher's (n/a unless the run recorded them: TEST.TEACHER_PREDICTIONS True); ECE, the expected
calibration error over --bins equal-width confidence bins (i/B, (i+1)/B]: the sum over bins of
|accuracy - mean confidence| weighted by the bin's share of the images. All in % but entropy.

RUN: a run folder (one row), or a folder above run folders (a method or dataset folder, a sweep cell, a
results root): each folder holding seed<S> runs is one row, the mean over its seeds (± sample std, with the
number of runs), or one row per run with --no-mean. Rows are named by their path relative to the folders'
common parent (kd/toy, abkd/toy). The reliability diagram of a row pools the images of its runs.
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze", help="confidence, entropy, teacher agreement and calibration (ECE, reliability "
        "diagram) of runs side by side, from their predictions.npz",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder, or a folder above seed<S> run folders")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    p.add_argument("--bins", type=int, default=15, help="equal-width confidence bins for ECE and the diagram "
                   "(default 15)")
    p.add_argument("--plot", metavar="DIR", help=f"write the reliability diagram to DIR/{PLOT_FILE} (one panel "
                   "per half; needs matplotlib: pip install 'clipkd[plot]')")
    p.add_argument("--counts", action="store_true", help="add the images per confidence bin (md, csv)")
    p.add_argument("--no-mean", action="store_true", help="one row per run instead of the mean over seeds")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from clipkd.errors import ClipkdError
    from clipkd.reports.analyze import analyze, analyze_csv, analyze_dict, analyze_markdown, plot_reliability
    from clipkd.reports.render import dumps

    if args.bins < 1:
        raise ClipkdError(f"--bins {args.bins}: give at least 1 bin")
    target = Path(args.plot) / PLOT_FILE if args.plot else None
    if target is not None and target.parent.exists() and not target.parent.is_dir():
        raise ClipkdError(f"--plot {args.plot} is a file: give a folder (the diagram is written to "
                          f"{args.plot}/{PLOT_FILE})")
    if target is not None:
        from clipkd.reports.plot import require_matplotlib

        require_matplotlib()  # before reading anything: without matplotlib, one line naming the extra
    entries, notes = analyze(args.runs, bins=args.bins, mean=not args.no_mean)
    if args.format == "json":
        text = dumps(analyze_dict(entries, args.bins, notes))
    elif args.format == "csv":
        text = analyze_csv(entries, args.bins, args.counts)
    else:
        text = analyze_markdown(entries, args.bins, args.counts)
    print(text.rstrip("\n"))
    if notes and args.format != "json":
        if args.format == "md":
            print()
            print("\n".join(notes))
        else:
            print("\n".join(notes), file=sys.stderr)
    if target is not None:
        print(f"wrote {plot_reliability(entries, target)}", file=sys.stderr)
    return 0
