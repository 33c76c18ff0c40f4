"""``clipkd launch``: the paper's grids (the cells ``scripts/*.sh`` run, into the same folders) as jobs, inline, on
this machine's GPUs or on SLURM; ``clipkd launch status ROOT``. Also the launcher options ``clipkd sweep`` shares."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipkd.launch.launchers import Resources


def add_launcher_options(p: argparse.ArgumentParser) -> None:
    """--launcher and the resources of each job (``clipkd sweep`` and ``clipkd launch``)."""
    g = p.add_argument_group("launcher", "where the cells run (local and slurm need: pip install 'clipkd[cluster]')")
    g.add_argument("--launcher", default="inline", metavar="inline|local|slurm",
                   help="inline: one cell after another, run by this command (default); local: this machine, one "
                        "job per GPU (CUDA_VISIBLE_DEVICES) or --jobs K on CPU, this command waits for them; slurm: "
                        "one sbatch job array through submitit, this command returns once it is submitted")
    g.add_argument("--jobs", type=int, metavar="K", help="local: at most K jobs at once (default: one per GPU, or 1 on "
                   "CPU); slurm: the array's cap, at most K running at once (%%K)")
    g.add_argument("--gpus", type=_gpu_list, metavar="0,1,...", help="local: the GPUs to use (default: all visible)")
    g.add_argument("--gpus-per-job", type=int, metavar="G", help="GPUs per job (default 1; 0: CPU jobs)")
    g.add_argument("--cpus-per-job", type=int, metavar="C", help="slurm: CPU cores per job")
    g.add_argument("--mem", type=float, dest="mem_gb", metavar="GB", help="slurm: memory per job, in GB")
    g.add_argument("--time", metavar="MIN|[D-]HH:MM:SS", help="time limit per job (slurm default 24:00:00); a job "
                   "that reaches it is requeued and resumes from its last epoch (at most --requeues times)")
    g.add_argument("--requeues", type=int, default=3, metavar="N", help="requeues after a time-out (default 3)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm mail-type=END (repeatable)")


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of GPU indices, e.g. 0,1") from None


def resources(args: argparse.Namespace) -> Resources:
    """The launcher options of ``args`` (checked by :func:`clipkd.launch.launchers.check`)."""
    from clipkd.launch.launchers import Resources

    return Resources(launcher=args.launcher, jobs=args.jobs, gpus=args.gpus, gpus_per_job=args.gpus_per_job,
                     cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb, time=args.time, partition=args.partition,
                     account=args.account, qos=args.qos, constraint=args.constraint, slurm=list(args.slurm),
                     requeues=args.requeues)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from clipkd.launch.cells import KINDS

    p = sub.add_parser(
        "launch", help="run the paper's grids (the scripts' cells) inline, on local GPUs or on SLURM; their status",
        description="Each cell of scripts/KIND.sh over --datasets x --seeds becomes one job running the script's own "
        "commands, into the same folders under --output (so clipkd report reads them as before). Finished cells "
        "are not submitted, cells whose job still runs are left alone, interrupted ones resume from their last "
        "epoch. ROOT/launch.jsonl records each cell's job, state and log; clipkd launch status ROOT reads it.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    for kind in KINDS:
        k = kinds.add_parser(kind, help=f"the cells of scripts/{'base2new_all' if kind == 'base2new' else kind}.sh")
        if kind != "teacher":
            k.add_argument("--method", help="METHOD (configs/methods/METHOD.yaml; default abkd_promptkd)")
        k.add_argument("--datasets", nargs="+", default=["all"], metavar="all|STEM",
                       help=("the target datasets, or all (default: the script's targets)" if kind in ("xd", "dg")
                             else "dataset stems, or all (default: the 11 of the paper)"))
        k.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
        if kind == "fewshot":
            k.add_argument("--shots", type=int, nargs="+", default=[16], help="K-shot settings (default 16)")
        k.add_argument("--root", help="DATA root (the scripts' DATA; required unless --dry-run)")
        k.add_argument("--output", default="output", help="the scripts' OUTPUT (default ./output): the launch root")
        if kind != "teacher":
            k.add_argument("--teachers", help="the scripts' TEACHERS: TEACHERS/<dataset>/seed<TEACHER_SEED> when it "
                                              "exists, else TEACHERS itself, as MODEL.TEACHER.CHECKPOINT")
            k.add_argument("--teacher-seed", type=int, default=1)
        if kind in ("xd", "dg"):
            k.add_argument("--xd-teacher", help="the scripts' XD_TEACHER (the ImageNet teacher of the transfer runs)")
        k.add_argument("--dry-run", action="store_true", help="print each job's commands and stop")
        add_launcher_options(k)
        k.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides for every run")
        k.set_defaults(func=cmd_launch)
    s = kinds.add_parser("status", help="done / running / failed / pending per cell of a launch root")
    s.add_argument("root", metavar="ROOT")
    s.set_defaults(func=cmd_status)
    g = kinds.add_parser("group", help="(used by jobs) train one fused sweep group, given as JSON")
    g.add_argument("spec")
    g.set_defaults(func=cmd_group)


def cmd_launch(args: argparse.Namespace) -> int:
    from clipkd.errors import ClipkdError
    from clipkd.launch.cells import paper_jobs
    from clipkd.launch.launchers import check, launch, print_commands

    res = resources(args)
    check(res, engine=not args.dry_run)
    if not args.root and not args.dry_run:
        raise ClipkdError("--root DATA is needed to launch (or pass --dry-run to print the commands)")
    opts = [o for o in (args.opts or []) if o != "--"]
    output = os.path.abspath(args.output)
    jobs = paper_jobs(args.kind, method=getattr(args, "method", None), datasets=args.datasets, seeds=args.seeds,
                      output=output, data=os.path.abspath(args.root) if args.root else "$DATA", opts=opts,
                      shots=getattr(args, "shots", (16,)), teachers=getattr(args, "teachers", None),
                      teacher_seed=getattr(args, "teacher_seed", 1), xd_teacher=getattr(args, "xd_teacher", None))
    if args.dry_run:
        print_commands(jobs)
        return 0
    return launch(jobs, output, res)


def cmd_status(args: argparse.Namespace) -> int:
    from clipkd.errors import ClipkdError
    from clipkd.launch.state import RECORD_FILE, status, status_lines

    if not os.path.isfile(os.path.join(args.root, RECORD_FILE)):
        raise ClipkdError(f"{args.root} has no {RECORD_FILE}: nothing was launched into it (clipkd launch / clipkd "
                          "sweep --launcher ...)")
    for line in status_lines(args.root, status(args.root)):
        print(line)
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    """Train the cells of one fused group (what a ``clipkd sweep --fused --launcher ...`` job runs)."""
    from pathlib import Path

    from clipkd.runs.sweep import Cell, Grid, run_grid

    spec = json.loads(args.spec)
    grid = Grid([Path(f) for f in spec["files"]],
                [Cell(Path(c["out"]), int(c["seed"]), tuple(c["overrides"])) for c in spec["cells"]])
    summary = run_grid(grid, spec["root"], fused=True)
    for line in summary.lines():
        print(line, file=sys.stderr if summary.failed else sys.stdout)
    return 1 if summary.failed else 0
