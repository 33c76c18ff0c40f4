"""``clipkd demo`` and ``clipkd toy pretrain``: the embedded offline benchmark."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline offline on the embedded toy benchmark (minutes on a laptop CPU)",
        description="Generate the toy dataset and tiny CLIPs if not cached, evaluate the zero-shot teacher and "
        "student, distil with KD and ABKD, and print a Base/New/HM table.")
    p.add_argument("--output-dir", help="where runs and the table go (default demo-runs/<date-time>)")
    p.add_argument("--cache-dir", help="dataset and weights cache (default $CLIPKD_CACHE_DIR/toy or ~/.cache/clipkd/toy)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="run seeds (default 1)")
    p.add_argument("--no-transductive", action="store_true", help="only the inductive protocol")
    p.set_defaults(func=cmd_demo)

    toy = sub.add_parser("toy", help="the toy world behind clipkd demo")
    tsub = toy.add_subparsers(dest="toy_command", metavar="SUBCOMMAND")
    tsub.required = True
    p = tsub.add_parser("pretrain", help="pretrain the tiny toy CLIPs (reproduces the shipped weights)")
    p.add_argument("--role", choices=("teacher", "student", "all"), default="all")
    p.add_argument("--out-dir", help="write here instead of replacing the shipped weights in the package")
    p.set_defaults(func=cmd_pretrain)


def cmd_demo(args: argparse.Namespace) -> int:
    from clipkd.toy.demo import format_table, run_demo

    out = Path(args.output_dir) if args.output_dir else Path("demo-runs") / time.strftime("%Y%m%d-%H%M%S")
    payload = run_demo(out, args.cache_dir and Path(args.cache_dir), seeds=args.seeds,
                       transductive=not args.no_transductive)
    print(f"\nclipkd demo: {len(payload['rows'])} rows in {payload['seconds']:.0f} s; runs, "
          f"demo_results.json and demo_results.md in {out}\n")
    print(format_table(payload["rows"]))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from clipkd.toy.pretrain import RECIPES, pretrain

    roles = list(RECIPES) if args.role == "all" else [args.role]
    for role in roles:
        out = Path(args.out_dir) / f"{RECIPES[role].model}.pt" if args.out_dir else None
        print(f"wrote {pretrain(role, out=out)}")
    return 0
