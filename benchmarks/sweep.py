"""Pay for the teacher once, timed: K alpha-beta cells fused (``clipkd sweep --fused``) vs K separate runs, and a
run reading a filled teacher cache (DISTILL.TEACHER_CACHE) vs one computing the teacher.

Real sizes: teacher open_clip ViT-L-14, PromptKD student on ViT-B-16, random weights (PRETRAINED ""), 224 px,
fp32, the abkd_promptkd recipe, on a synthetic dataset (DescribableTextures layout, base-to-new) sized so that a
cell trains one epoch of ``--batches`` batches of ``--batch`` images. Everything goes through the code the CLI
runs: ``build_grid`` + ``run_grid(fused=...)`` for the sweeps (so "separate" means one ``Run`` per cell in one
process, each building its own teacher and student: the cost ``clipkd sweep`` had, minus interpreter start-up),
and ``Run.fit`` for the cache runs. The measurements are interleaved (separate K=4, fused K=4, fused K=9,
separate K=9; then the cache runs) so that drift in machine load hits both sides alike.

Cache rows: the per-step time of a run is the median interval between its consecutive ``step`` lines in
metrics.jsonl (data loading, teacher features and the student's step; the epoch's first step, which also
starts the loader, is left out); the student-only floor is ``benchmarks/train_step.py``'s (its ``Bench``:
student forward + CE + backward + SGD on a fixed batch, no teacher, no data loading).

    python benchmarks/sweep.py            # ~15 min on an idle 2-core CPU machine
    python benchmarks/sweep.py --quick    # tiny test-size models at 32 px, seconds: checks the script

Markdown to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHOD = ROOT / "configs" / "methods" / "abkd_promptkd.yaml"
DATASET = "dtd"
TARGET_FUSED = {9: 2.0}  # separate / fused wall time, K cells
TARGET_CACHE = 1.15  # cached run's step / student-only floor step


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_opts(quick: bool) -> list[str]:
    if quick:
        return ["MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.STUDENT.NAME", "clipkd-tiny-student",
                "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2", "INPUT.SIZE", "(32, 32)"]
    return ["MODEL.TEACHER.NAME", "ViT-L-14", "MODEL.STUDENT.NAME", "ViT-B-16", "INPUT.SIZE", "(224, 224)"]


def opts(quick: bool, batch: int, shots: int) -> list[str]:
    return [*model_opts(quick), "MODEL.TEACHER.PRETRAINED", "", "MODEL.STUDENT.PRETRAINED", "",
            "MODEL.TEACHER.CHECKPOINT", "zero-shot", "DATASET.NUM_SHOTS", str(shots),
            "DATALOADER.TRAIN_X.BATCH_SIZE", str(batch), "DATALOADER.NUM_WORKERS", "0", "OPTIM.MAX_EPOCH", "1"]


def make_data(root: Path, batches: int, per_class: int) -> Path:
    """``batches`` base classes (and as many new ones) of at least ``per_class`` training images each."""
    from clipkd.data.synth import synthesize

    synthesize(root, DATASET, classes=2 * batches, images_per_class=per_class + 2, seed=0)
    return root


def alphas(k: int) -> str:
    """K alpha values 0.5, 0.6, ... (beta fixed): K cells of one stream."""
    return f"0.5:{0.5 + 0.1 * (k - 1):.1f}:0.1"


def time_sweep(k: int, fused: bool, data: Path, out: Path, cell_opts: list[str]) -> dict:
    from clipkd.runs.sweep import build_grid, run_grid

    grid = build_grid(METHOD, DATASET, alphas(k), "0.3:0.3:1", [1], out, cell_opts)
    assert len(grid.cells) == k
    t0 = time.perf_counter()
    summary = run_grid(grid, str(data), fused=fused)
    seconds = time.perf_counter() - t0
    if summary.failed or len(summary.done) != k:
        raise SystemExit(f"sweep failed: {summary.lines()}")
    results = [json.loads((c.out / "results.json").read_text()) for c in grid.cells]
    epochs = [epoch_seconds(c.out) for c in grid.cells]
    # training time: a fused group's epoch is shared (each cell logs the group's time), separate ones add up
    training = max(epochs) if fused else sum(epochs)
    log(f"K={k} {'fused' if fused else 'separate'}: {seconds:.1f} s (training epochs {training:.1f} s)")
    return {"seconds": seconds, "training": training, "results": results}


def epoch_seconds(folder: Path) -> float:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return sum(r["time"] for r in rows if r["kind"] == "epoch")


def step_intervals(folder: Path) -> list[float]:
    """Seconds between consecutive step lines of one epoch in metrics.jsonl (each: load, teacher, step)."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    return [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if a["epoch"] == b["epoch"]]


def time_run(data: Path, out: Path, run_opts: list[str]) -> dict:
    from clipkd.config import build_config
    from clipkd.runs.run import Run

    cfg = build_config([ROOT / "configs" / "datasets" / f"{DATASET}.yaml", METHOD],
                       ["DATASET.ROOT", str(data), *run_opts])
    t0 = time.perf_counter()
    results = Run(cfg, out, echo=False).fit()
    seconds = time.perf_counter() - t0
    steps = step_intervals(out)
    log(f"run {out.name}: {seconds:.1f} s, steps {', '.join(f'{s:.2f}' for s in steps)}")
    return {"seconds": seconds, "steps": steps, "step": statistics.median(steps), "results": results,
            "log": (out / "log.txt").read_text()}


def floor_step(quick: bool, batch: int, classes: int, steps: int) -> list[float]:
    """benchmarks/train_step.py's student-only step (its own Bench), ``steps`` timed after one warm-up."""
    spec = importlib.util.spec_from_file_location("clipkd_benchmarks_train_step", HERE / "train_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    bench = module.Bench(quick, batch)
    distiller = bench.distiller([f"class {i}" for i in range(classes)], floor=True)
    labels = bench.labels(classes)
    bench.floor_step(distiller, labels)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        bench.floor_step(distiller, labels)
        times.append(time.perf_counter() - t0)
    log(f"student-only floor: {', '.join(f'{s:.2f}' for s in times)}")
    return times


def cache_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.pt"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny test-size models at 32 px (seconds)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="cells per sweep (default 4 9; quick 2 3)")
    parser.add_argument("--batches", type=int, default=2, help="batches per cell (one epoch)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 8; quick 4)")
    parser.add_argument("--cache-batches", type=int, default=None,
                        help="batches of the cache runs (default 2 x --batches: more steps to take the median of)")
    parser.add_argument("--floor-steps", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="keep the runs and the cache in DIR (default: a temp folder)")
    args = parser.parse_args(argv)
    ks = args.ks or ([2, 3] if args.quick else [4, 9])
    batch = args.batch or (4 if args.quick else 8)
    cache_batches = args.cache_batches or 2 * args.batches
    if args.batches < 1 or cache_batches < 2 or min(ks) < 1:
        parser.error("--batches >= 1, --cache-batches >= 2 and cells >= 1")

    started, load_before = _dt.datetime.now(), os.getloadavg()[0]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="clipkd-bench-sweep-"))
    try:
        sweep_data = make_data(work / "data-sweep", args.batches, batch)
        cache_data = make_data(work / "data-cache", args.batches, batch * cache_batches // args.batches)
        base = opts(args.quick, batch, batch)
        log(f"work folder {work}; sweeps: {args.batches} batch(es) of {batch} per cell")
        # untimed warm-up (imports, tokenizer, first allocations), so the first timed sweep does not pay them
        time_run(sweep_data, work / "warm-up", opts(True, batch, batch))

        # --------------------------------------------------------------- fused vs separate, ABBA order
        order = []
        for i, k in enumerate(ks):
            order += [(k, False), (k, True)] if i % 2 == 0 else [(k, True), (k, False)]
        sweeps: dict[tuple[int, bool], dict] = {}
        for k, fused in order:
            out = work / f"sweep-k{k}-{'fused' if fused else 'separate'}"
            sweeps[(k, fused)] = time_sweep(k, fused, sweep_data, out, base)

        # --------------------------------------------------------------- the teacher cache
        cache = work / "teacher-cache"
        run_opts = opts(args.quick, batch, batch * cache_batches // args.batches)
        filled = time_run(cache_data, work / "run-fill", [*run_opts, "DISTILL.TEACHER_CACHE", str(cache)])
        cached = time_run(cache_data, work / "run-cached", [*run_opts, "DISTILL.TEACHER_CACHE", str(cache)])
        plain = time_run(cache_data, work / "run-teacher", run_opts)
        floor = floor_step(args.quick, batch, args.batches, args.floor_steps)
        size = cache_size(cache)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # --------------------------------------------------------------- the tables
    t, s = ("clipkd-tiny-teacher", "clipkd-tiny-student") if args.quick else ("ViT-L-14", "ViT-B-16")
    px = 32 if args.quick else 224
    print(f"# clipkd sweep benchmarks ({started:%Y-%m-%d %H:%M}, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} torch threads on "
          f"{os.cpu_count()} CPUs)")
    print()
    print(f"Teacher {t}, PromptKD student on {s}, random weights, {px} px, fp32, abkd_promptkd recipe; one epoch of "
          f"{args.batches} batch(es) of {batch} images per cell, then its Base/New evaluation; separate = one Run per "
          "cell in this process (teacher and student built per cell), fused = `run_grid(fused=True)`.")
    print()
    print("## Fused sweep vs separate runs")
    print()
    print("| cells K | separate (s) | fused (s) | speed-up (separate / fused) | target | met | per cell: separate / "
          "fused (s) | training epochs only: separate / fused (s) | speed-up of the epochs | results identical |")
    print("|---:|---:|---:|---:|---:|:---:|---:|---:|---:|:---:|")
    for k in ks:
        sep, fus = sweeps[(k, False)], sweeps[(k, True)]
        ratio = sep["seconds"] / fus["seconds"]
        target = None if args.quick else TARGET_FUSED.get(k)
        met = "-" if target is None else ("yes" if ratio >= target else "no")
        print(f"| {k} | {sep['seconds']:.1f} | {fus['seconds']:.1f} | {ratio:.2f}x | "
              f"{'-' if target is None else f'>= {target:g}x'} | {met} | {sep['seconds'] / k:.1f} / "
              f"{fus['seconds'] / k:.1f} | {sep['training']:.1f} / {fus['training']:.1f} | "
              f"{sep['training'] / fus['training']:.2f}x | {'yes' if sep['results'] == fus['results'] else 'NO'} |")
    print()
    print("## Teacher cache: a run reading a filled cache vs one computing the teacher")
    print()
    fl = statistics.median(floor)
    ratio = cached["step"] / fl
    target = None if args.quick else TARGET_CACHE
    print(f"One cell, one epoch of {cache_batches} batches of {batch}; step = median interval between consecutive "
          f"steps (s); cache size after the fill: {size / 2**20:.2f} MB.")
    print()
    print("| run | whole run (s) | step (s) | steps (s) | step / student-only floor | target | met |")
    print("|---|---:|---:|---|---:|---:|:---:|")
    for name, r in (("computing the teacher (no cache)", plain), ("filling the cache", filled),
                    ("reading the cache", cached)):
        is_cached = r is cached
        met = "-" if not is_cached or target is None else ("yes" if ratio <= target else "no")
        print(f"| {name} | {r['seconds']:.1f} | {r['step']:.2f} | {', '.join(f'{x:.2f}' for x in r['steps'])} | "
              f"{r['step'] / fl:.2f}x | {f'<= {target:g}x' if is_cached and target else '-'} | {met} |")
    print(f"| student-only floor (train_step.py) | - | {fl:.2f} | {', '.join(f'{x:.2f}' for x in floor)} | 1.00x "
          "| - | - |")
    print()
    same = plain["results"] == filled["results"] == cached["results"]
    print(f"Results identical with and without the cache: {'yes' if same else 'NO'}; the reading run computed "
          f"{'no' if '0 computed' in cached['log'] else 'SOME'} teacher batches.")
    print()
    print(f"Whole benchmark: {(_dt.datetime.now() - started).total_seconds():.0f} s; 1-minute load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (2 is this benchmark's own two threads).")
    log(f"done in {(_dt.datetime.now() - started).total_seconds():.0f} s")
    return 0 if same and all(sweeps[(k, False)]["results"] == sweeps[(k, True)]["results"] for k in ks) else 1


if __name__ == "__main__":
    sys.exit(main())
