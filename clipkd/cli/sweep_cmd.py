"""``clipkd sweep``: the ABKD alpha-beta grid (and other swept DISTILL/OPTIM values) of one dataset, run in this
process or printed as commands."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from clipkd.cli.launch_cmd import add_launcher_options, resources


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run (or print) the ABKD alpha-beta grid, or other DISTILL/OPTIM values, for one dataset",
        description="Every (alpha, beta) cell of the grid, both ends included, alpha = 0, beta = 0 and "
        "alpha + beta = 0 too (the loss is defined there), times every --vary value. With an AB recipe the cells "
        "set the loss's alpha and beta; with a method that has a divergence inside (abdkd, ablsd, abttm) they "
        "set DISTILL.DIVERGENCE ab and its alpha and beta. Cells write OUTPUT/METHOD/STEM/a<A>_b<B>/seed<S>/; "
        "finished cells are skipped and interrupted ones resumed, so a sweep can simply be run again (a cell "
        "whose folder holds another config fails, naming the keys). Cells are counted first: more than --max-cells "
        "is refused. Exits non-zero when a cell failed. Then: clipkd report OUTPUT --sweep --plot hm.png")
    p.add_argument("--alpha", help="START:STOP:STEP (with --beta or --alpha-plus-beta)")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--beta", help="START:STOP:STEP (a negative START needs --beta=-0.5:...): the alpha x beta grid")
    grid.add_argument("--alpha-plus-beta", metavar="START:STOP:STEP",
                      help="ABKD's diagonal grid: these sums of alpha and beta, beta = sum - alpha (exact decimals), "
                           "e.g. --alpha-plus-beta 1.0:1.3:0.1 --alpha 0.5:1.2:0.1 as ABKD's scripts")
    p.add_argument("--vary", nargs=2, action="append", default=[], metavar=("KEY", "VALUES"),
                   help="also sweep a config key over START:STOP:STEP or a comma list, e.g. --vary DISTILL.DKD_BETA "
                        "0.5,1 or --vary DISTILL.TEMPERATURE 1:4:1 (repeatable; the values go into the method folder "
                        "name, METHOD+dkd_beta0.5)")
    p.add_argument("--dataset", required=True, metavar="STEM")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--root", help="DATA root (required unless --dry-run)")
    method = p.add_mutually_exclusive_group()
    method.add_argument("--method", default="abkd_promptkd",
                        help="METHOD (configs/methods/METHOD.yaml, default abkd_promptkd) or a method file; its "
                             "configs/per_dataset/METHOD/STEM.yaml is merged after it when present, as clipkd train "
                             "--method and the scripts do")
    method.add_argument("--config", help="a method file, configs/methods/METHOD.yaml (as --method FILE)")
    p.add_argument("--output", default="output/sweep", help="sweep root (default output/sweep)")
    p.add_argument("--dry-run", action="store_true", help="print one self-contained command per cell and stop")
    p.add_argument("--max-cells", type=int, default=None, metavar="N",
                   help="refuse a sweep of more than N cells, counted before anything is built (default 10000)")
    p.add_argument("--fused", action="store_true",
                   help="train the cells that share a data stream (dataset, seed, shots, protocol, batch, input, "
                        "teacher) together in this process: one loader and one teacher forward per batch for all "
                        "their students; each cell still writes exactly the folder clipkd train writes, resumes "
                        "on its own, and fails on its own (with --dry-run: the per-cell commands, unfused)")
    p.add_argument("--status", action="store_true",
                   help="print done / running / failed / pending for each cell of this grid under --output (with "
                        "the logs of failed jobs) and stop")
    add_launcher_options(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides for every cell")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from clipkd.runs.sweep import MAX_CELLS, build_grid, run_grid
    from clipkd.errors import ClipkdError

    from clipkd.launch.launchers import check

    res = resources(args)
    check(res, engine=not (args.dry_run or args.status))
    opts = [o for o in (args.opts or []) if o != "--"]
    max_cells = MAX_CELLS if args.max_cells is None else args.max_cells
    launched = args.launcher != "inline" or args.status
    output = os.path.abspath(args.output) if launched else args.output  # jobs may start in another folder
    grid = build_grid(args.config or args.method, args.dataset, args.alpha, args.beta, args.seeds, output,
                      opts, alpha_plus_beta=args.alpha_plus_beta, vary=[tuple(v) for v in args.vary],
                      max_cells=max_cells)
    if args.status:
        from clipkd.launch.state import status, status_lines

        for line in status_lines(args.output, status(output, {str(os.path.relpath(c.out, output)): (
                str(c.out / "results.json"),) for c in grid.cells})):
            print(line)
        return 0
    if args.dry_run:
        root = args.root or "$DATA"
        for cell in grid.cells:
            print(" ".join(f'"{c}"' if c.startswith("$") else shlex.quote(c) for c in grid.command(cell, root)))
        return 0
    if not args.root:
        raise ClipkdError("--root DATA is needed to run the sweep (or pass --dry-run to print the commands)")
    if args.launcher != "inline":
        from clipkd.launch.cells import sweep_jobs
        from clipkd.launch.launchers import launch

        return launch(sweep_jobs(grid, os.path.abspath(args.root), output, fused=args.fused), output, res)
    summary = run_grid(grid, args.root, fused=args.fused)
    for line in summary.lines():
        print(line, file=sys.stderr if summary.failed else sys.stdout)
    return 1 if summary.failed else 0
