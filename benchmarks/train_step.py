"""Time one PromptKD distillation training step: clipkd (teacher text features cached) vs the reference loop.

PromptKD's reference code runs the frozen teacher's text encoder over every class prompt on every training
batch (PromptKD issue #33), although the teacher never changes. clipkd computes the teacher's class
embeddings once per run (``Teacher.text_features`` caches them) and passes them to
the Distiller (``clipkd.methods.distiller``). This script times both at real sizes (teacher open_clip ViT-L-14,
PromptKD student on ViT-B-16, random weights, fp32, batch 8 at 224 px) for several class counts, plus the
student-only floor (student forward + backward + SGD step, no teacher at all), and then prints the AB-loss
table of ``benchmarks/ab_loss.py``.

Run as ``python benchmarks/train_step.py`` (about 5 minutes on an otherwise idle 2-core CPU machine, more
when it is shared), or ``python benchmarks/train_step.py --quick`` (tiny test-size models at 32 px, seconds)
to check it works.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from clipkd.config import build_config
from clipkd.methods.distiller import Distiller
from clipkd.methods.kd import KDObjective
from clipkd.runs.run import Run
from clipkd.losses import build_distill_loss

HERE = Path(__file__).resolve().parent
# Targets: reference step time / clipkd step time.
TARGETS = {100: 2.0, 1000: 12.0}
KD_WEIGHT, CE_WEIGHT = 1.0, 0.0  # PromptKD: KD only (transductive, labels unused)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_cfg(quick: bool):
    extra: list[str] = []
    if quick:  # the tiny student's vision tower has 2 blocks: prompts can go at most 2 deep
        names, size = ("clipkd-tiny-teacher", "clipkd-tiny-student"), 32
        extra = ["MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2"]
    else:
        names, size = ("ViT-L-14", "ViT-B-16"), 224
    cfg = build_config(overrides=[*extra, "DATASET.NAME", "ImageNet",
        "MODEL.TEACHER.NAME", names[0], "MODEL.TEACHER.PRETRAINED", "",
        "MODEL.STUDENT.NAME", names[1], "MODEL.STUDENT.PRETRAINED", "",
        "MODEL.STUDENT.TYPE", "promptkd",
        "INPUT.SIZE", f"({size}, {size})",
    ])
    return cfg, size


def default_ref_steps(classes: int, steps: int) -> int:
    return steps if classes <= 200 else 1  # a 1000-class reference step is ~1 minute on 2 CPU cores


class Bench:
    """The models, optimizer and loss shared by all measured loops (the trainable part changes each step,
    which does not change the cost of a step)."""

    def __init__(self, quick: bool, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg, self.size = make_cfg(quick)
        t0 = time.perf_counter()
        run = Run(self.cfg)
        run.build()  # the models exactly as a training run builds them
        self.teacher, self.student = run.teacher, run.student
        self.device = run.device
        self.build_s = time.perf_counter() - t0
        self.student.train()
        o = self.cfg.OPTIM
        self.optimizer = torch.optim.SGD(self.student.trainable_parameters(), lr=o.LR, momentum=o.MOMENTUM,
                                         weight_decay=o.WEIGHT_DECAY)
        self.objective = KDObjective(build_distill_loss("ab", alpha=0.8, beta=0.3), KD_WEIGHT, CE_WEIGHT)
        self.floor_objective = KDObjective(None, 0.0, ce_weight=1.0)  # student only: CE, no teacher forward
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch, 3, self.size, self.size, generator=g).to(self.device)
        self.batch = batch
        self.gen = g

    def labels(self, classes: int) -> torch.Tensor:
        return torch.randint(0, classes, (self.batch,), generator=self.gen).to(self.device)

    def _update(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())

    # ------------------------------------------------------------------ the three steps
    def distiller(self, classnames: list[str], floor: bool = False) -> Distiller:
        """What a training run steps through; it computes the teacher's class embeddings once, here."""
        return Distiller(self.student, self.teacher, classnames, self.floor_objective if floor else self.objective)

    def clipkd_step(self, distiller: Distiller, labels: torch.Tensor) -> float:
        """clipkd: the teacher's class embeddings were computed once, before training."""
        return self._update(distiller(self.images, labels).loss)

    def reference_step(self, distiller: Distiller, labels: torch.Tensor) -> tuple[float, float]:
        """PromptKD's reference loop: the teacher's text encoder runs over all class prompts every step.

        Returns (loss, seconds spent in the teacher's text encoder). The recomputed features are also what
        the student's classifier reads (its class embedder is ``teacher.text_features``), so each step
        encodes the class prompts exactly once, as the reference code does.
        """
        t0 = time.perf_counter()
        self.teacher.clear_cache()
        distiller.teacher_text = self.teacher.text_features(distiller.classnames)
        text_s = time.perf_counter() - t0
        return self._update(distiller(self.images, labels).loss), text_s

    def floor_step(self, distiller: Distiller, labels: torch.Tensor) -> float:
        """Student only: its forward (cached classifier) + CE + backward + step, no teacher forward at all."""
        return self._update(distiller(self.images, labels).loss)


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result). CPU time is less sensitive to other processes
    competing for the cores (it still counts some spin-waiting of torch's worker threads)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def measure(bench: Bench, classes: int, steps: int, warmup: int, ref_steps: int, floor_steps: int) -> dict:
    classnames = [f"class {i}" for i in range(classes)]
    labels = bench.labels(classes)
    load_before = os.getloadavg()[0]
    bench.teacher.clear_cache()
    text_once_s, _, distiller = timed(lambda: bench.distiller(classnames))
    floor_distiller = bench.distiller(classnames, floor=True)
    log(f"{classes} classes: teacher text features once: {text_once_s:.2f} s")
    for i in range(warmup):
        s, _, _ = timed(lambda: bench.clipkd_step(distiller, labels))
        log(f"{classes} classes: warm-up clipkd step {i + 1}: {s:.2f} s")
    ours, ref, ref_text, floor = [], [], [], []
    ours_cpu, ref_cpu = [], []
    # Interleave the loops so that load from other processes on a shared machine hits all of them alike.
    for i in range(max(steps, ref_steps, floor_steps)):
        if i < steps:
            s, c, _ = timed(lambda: bench.clipkd_step(distiller, labels))
            ours.append(s)
            ours_cpu.append(c)
            log(f"{classes} classes: clipkd step {i + 1}: {s:.2f} s (CPU {c:.2f} s)")
        if i < ref_steps:
            s, c, (_, text_s) = timed(lambda: bench.reference_step(distiller, labels))
            ref.append(s)
            ref_cpu.append(c)
            ref_text.append(text_s)
            log(f"{classes} classes: reference step {i + 1}: {s:.2f} s (CPU {c:.2f} s; teacher text {text_s:.2f} s)")
        if i < floor_steps:
            s, _, _ = timed(lambda: bench.floor_step(floor_distiller, labels))
            floor.append(s)
            log(f"{classes} classes: student-only step {i + 1}: {s:.2f} s")
    # Leave the cache as clipkd would have it (the reference steps refilled it with equal features).
    bench.teacher.text_features(classnames)
    row = {
        "classes": classes,
        "text_once_s": text_once_s,
        "clipkd_s": statistics.median(ours) if ours else float("nan"),
        "clipkd_all": ours,
        "reference_s": statistics.median(ref) if ref else float("nan"),
        "reference_all": ref,
        "reference_text_s": statistics.median(ref_text) if ref_text else float("nan"),
        "floor_s": statistics.median(floor) if floor else float("nan"),
        "floor_all": floor,
        "load": (load_before, os.getloadavg()[0]),
    }
    row["speedup"] = row["reference_s"] / row["clipkd_s"]
    # Best-case ratio: on a shared machine the fastest step is the one least slowed by other processes.
    row["speedup_min"] = min(ref) / min(ours) if ours and ref else float("nan")
    row["speedup_cpu"] = statistics.median(ref_cpu) / statistics.median(ours_cpu) if ours and ref else float("nan")
    row["clipkd_cpu_all"], row["reference_cpu_all"] = ours_cpu, ref_cpu
    return row


def _fmt_list(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs) if xs else "-"


def markdown(rows: list[dict], bench: Bench, args: argparse.Namespace) -> str:
    t, s = bench.cfg.MODEL.TEACHER, bench.cfg.MODEL.STUDENT
    n_train = sum(p.numel() for p in bench.student.trainable_parameters())
    lines = [
        f"Teacher {t.NAME} (random weights), student {s.TYPE} on {s.NAME} (random weights, {n_train:,} trainable "
        f"parameters), batch {bench.batch} at {bench.size} px, fp32, AB loss (alpha 0.8, beta 0.3), SGD; "
        f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs; steps: {args.warmup} warm-up + "
        f"{args.steps} timed (clipkd), reference and student-only as listed; times are medians in seconds; "
        "'met' compares the median wall-clock ratio with the target; min/min (fastest steps) and CPU-time (median "
        "process CPU seconds) ratios are less sensitive to other processes on a shared machine.",
        "",
        "| classes | teacher text features, once (s) | clipkd step (s) | reference step (s) "
        "| of which teacher text (s) "
        "| speed-up (reference / clipkd) | speed-up, min/min | speed-up, CPU time | target | met "
        "| student-only floor (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        target = TARGETS.get(r["classes"]) if not args.quick else None
        met = "-" if target is None else ("yes" if r["speedup"] >= target else "no")
        lines.append(
            f"| {r['classes']} | {r['text_once_s']:.2f} | {r['clipkd_s']:.2f} | {r['reference_s']:.2f} | "
            f"{r['reference_text_s']:.2f} | {r['speedup']:.2f}x | {r['speedup_min']:.2f}x | {r['speedup_cpu']:.2f}x "
            f"| {'-' if target is None else f'>= {target:g}x'} "
            f"| {met} | {r['floor_s']:.2f} |"
        )
    lines += ["", "Individual timed steps (s), and the machine's 1-minute load average before / after:", ""]
    for r in rows:
        lines.append(f"- {r['classes']} classes: clipkd {_fmt_list(r['clipkd_all'])}; reference "
                     f"{_fmt_list(r['reference_all'])}; student-only {_fmt_list(r['floor_all'])}; CPU seconds: clipkd "
                     f"{_fmt_list(r['clipkd_cpu_all'])}, reference {_fmt_list(r['reference_cpu_all'])}; "
                     f"load {r['load'][0]:.2f} / {r['load'][1]:.2f}")
    return "\n".join(lines)


def load_ab_loss():
    """benchmarks/ab_loss.py as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("clipkd_benchmarks_ab_loss", HERE / "ab_loss.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000], help="class counts to time")
    parser.add_argument("--steps", type=int, default=2, help="timed clipkd steps per class count")
    parser.add_argument("--warmup", type=int, default=1, help="untimed clipkd warm-up steps per class count")
    parser.add_argument("--ref-steps", type=int, default=None,
                        help="timed reference steps per class count (default: --steps up to 200 classes, else 1)")
    parser.add_argument("--floor-steps", type=int, default=None,
                        help="timed student-only steps per class count (default: --steps; 0 skips)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true",
                        help="tiny test-size models (clipkd-tiny-teacher / clipkd-tiny-student) at 32 px")
    parser.add_argument("--ab-repeats", type=int, default=30, help="repeats for the AB-loss table")
    parser.add_argument("--no-ab", action="store_true", help="skip the AB-loss table")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    floor_steps = args.steps if args.floor_steps is None else args.floor_steps

    started = _dt.datetime.now()
    log(f"building models ({'quick' if args.quick else 'full'} sizes)")
    bench = Bench(args.quick, args.batch)
    log(f"models built in {bench.build_s:.1f} s")
    rows = []
    for classes in args.classes:
        ref_steps = default_ref_steps(classes, args.steps) if args.ref_steps is None else args.ref_steps
        if ref_steps < 1:
            parser.error("--ref-steps must be >= 1")
        rows.append(measure(bench, classes, args.steps, args.warmup, ref_steps, floor_steps))
        log(f"{classes} classes: speed-up {rows[-1]['speedup']:.2f}x (min/min {rows[-1]['speedup_min']:.2f}x)")

    print(f"# clipkd benchmarks ({started:%Y-%m-%d %H:%M}, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()})")
    print()
    print("## Training step: clipkd (teacher text features cached) vs reference (recomputed every step)")
    print()
    print(markdown(rows, bench, args))
    if not args.no_ab:
        log("AB-loss benchmark")
        ab = load_ab_loss()
        print()
        print("## AB loss: clipkd vs textbook formula, forward + backward")
        print()
        print(ab.markdown(ab.run(repeats=args.ab_repeats)))
    log(f"done in {(_dt.datetime.now() - started).total_seconds():.0f} s")


if __name__ == "__main__":
    main()
