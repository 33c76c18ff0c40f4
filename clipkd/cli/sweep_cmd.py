"""``clipkd sweep``: the alpha-beta grid of ABKD, every cell (limit lines included), run or printed."""

from __future__ import annotations

import argparse
import shlex
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path


def parse_range(text: str, name: str) -> list[float]:
    """``A0:A1:STEP`` -> A0, A0+STEP, ..., A1 (both ends included, as `seq` does), in exact decimal steps."""
    from clipkd.errors import ClipkdError

    try:
        start, stop, step = (Decimal(p) for p in text.split(":"))
    except (ValueError, InvalidOperation):
        raise ClipkdError(f"--{name} takes START:STOP:STEP (e.g. 0:1:0.1), got '{text}'") from None
    if step <= 0 or stop < start:
        raise ClipkdError(f"--{name} {text}: STEP must be > 0 and STOP >= START")
    values, v = [], start
    while v <= stop:
        values.append(float(v))
        v += step
    return values


def cell_name(alpha: float, beta: float) -> str:
    return f"a{format(alpha, 'g')}_b{format(beta, 'g')}"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run (or print) the ABKD alpha-beta grid for one dataset",
        description="Every (alpha, beta) cell of the grid, both ends included, alpha = 0, beta = 0 and "
        "alpha + beta = 0 too (the loss is defined there). Cells write OUTPUT/METHOD/STEM/a<A>_b<B>/seed<S>/; "
        "finished cells are skipped. Then: clipkd report OUTPUT --sweep --plot hm.png")
    p.add_argument("--alpha", required=True, help="START:STOP:STEP")
    p.add_argument("--beta", required=True, help="START:STOP:STEP (a negative START needs --beta=-0.5:...)")
    p.add_argument("--dataset", required=True, metavar="STEM")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--root", help="DATA root (required unless --dry-run)")
    p.add_argument("--config", default="configs/methods/abkd_promptkd.yaml", help="method config")
    p.add_argument("--output", default="output/sweep", help="sweep root (default output/sweep)")
    p.add_argument("--dry-run", action="store_true", help="print one self-contained command per cell and stop")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides for every cell")
    p.set_defaults(func=cmd_sweep)


def cell_commands(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    alphas, betas = parse_range(args.alpha, "alpha"), parse_range(args.beta, "beta")
    method = Path(args.config).stem
    dataset_cfg = str(Path(args.config).resolve().parents[1] / "datasets" / f"{args.dataset}.yaml")
    opts = [o for o in (args.opts or []) if o != "--"]
    cells = []
    for alpha in alphas:
        for beta in betas:
            for seed in args.seeds:
                out = Path(args.output) / method / args.dataset / cell_name(alpha, beta) / f"seed{seed}"
                cmd = ["clipkd", "train", "--root", args.root or "$DATA", "--dataset-config", dataset_cfg,
                       "--config", str(Path(args.config).resolve()), "--seed", str(seed), "--output-dir", str(out),
                       "DATASET.SUBSAMPLE_CLASSES", "base", "DISTILL.LOSS", "ab",
                       "DISTILL.ALPHA", repr(alpha), "DISTILL.BETA", repr(beta), *opts]
                cells.append((out, cmd))
    return cells


def cmd_sweep(args: argparse.Namespace) -> int:
    from clipkd.errors import ClipkdError

    cells = cell_commands(args)
    if args.dry_run:
        for _, cmd in cells:
            print(" ".join(shlex.quote(c) if not c.startswith("$") else f'"{c}"' for c in cmd))
        return 0
    if not args.root:
        raise ClipkdError("--root DATA is needed to run the sweep (or pass --dry-run to print the commands)")
    from clipkd.cli.main import main

    for i, (out, cmd) in enumerate(cells, 1):
        if (out / "results.json").is_file():
            print(f"[{i}/{len(cells)}] skip {out} (finished)")
            continue
        print(f"[{i}/{len(cells)}] {out}", flush=True)
        resume = ["--resume"] if (out / "config.yaml").is_file() else []
        rc = main(cmd[1:] + resume)
        if rc:
            print(f"cell {out} failed (exit {rc}); continuing", file=sys.stderr)
    return 0
