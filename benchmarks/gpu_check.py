"""GPU check: the real-size distillation step on one GPU in fp32, bf16 and fp16, plus a torchrun NCCL run.

ViT-L/14 teacher -> ViT-B/16 PromptKD student at 224 px with random weights (nothing to download), the
training step a run takes (``Run.build`` + ``Distiller`` + SGD, fp16 with the grad scaler), ``--steps``
steps per precision at batch 8 on fixed random images. Per precision it reports: whether every loss was
finite, images/s, peak GPU memory, and the teacher's share of a step (teacher image forward timed alone
over the same steps). Then ``torchrun --nproc_per_node N -m clipkd train`` (N = the visible GPUs, at most 2)
on a small synthetic dataset with the tiny test models, which exercises set_device and the
``cpu:gloo,cuda:nccl`` collectives end to end.

    python benchmarks/gpu_check.py              # on a GPU machine, about 3-4 minutes on one H100
    python benchmarks/gpu_check.py --quick      # tiny models at 32 px, a few steps: checks the script on CPU

Prints a Markdown table (the last thing printed) for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipkd.config import build_config
from clipkd.methods.distiller import Distiller, build_objective
from clipkd.runs.run import Run
from clipkd.engine.runtime import autocast_for

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_cfg(quick: bool):
    names, size = (("clipkd-tiny-teacher", "clipkd-tiny-student"), 32) if quick else (("ViT-L-14", "ViT-B-16"), 224)
    extra = ["MODEL.PROMPT.DEPTH_VISION", "2"] if quick else []
    return build_config(overrides=[
        *extra, "DATASET.NAME", "ImageNet", "INPUT.SIZE", f"({size}, {size})",
        "MODEL.TEACHER.NAME", names[0], "MODEL.TEACHER.PRETRAINED", "",
        "MODEL.STUDENT.NAME", names[1], "MODEL.STUDENT.PRETRAINED", "", "MODEL.STUDENT.TYPE", "promptkd",
        "DISTILL.LOSS", "ab", "DISTILL.WEIGHT", "100", "OPTIM.LR", "1e-4",
    ]), size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_precision(run: Run, precision: str, steps: int, batch: int, classes: int, size: int) -> dict:
    device = run.device
    cfg = run.cfg
    classnames = [f"class {i}" for i in range(classes)]
    distiller = Distiller(run.student, run.teacher, classnames, build_objective(cfg))
    params = run.student.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=cfg.OPTIM.LR, momentum=0.9)
    autocast, use_scaler = autocast_for(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    distiller.train()
    losses, step_s, teacher_s = [], [], []
    warmup = min(5, steps)
    for i in range(steps + warmup):
        sync(device)
        t0 = time.perf_counter()
        with autocast():
            loss = distiller(images, labels).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync(device)
        t1 = time.perf_counter()
        with autocast():
            distiller.teacher_logits(images)  # the teacher's part of a step, timed alone
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            losses.append(float(loss.item()))
            step_s.append(t1 - t0)
            teacher_s.append(t2 - t1)
    step, teacher = statistics.median(step_s), statistics.median(teacher_s)
    return {
        "precision": precision,
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "first_loss": losses[0], "last_loss": losses[-1],
        "images_per_s": batch / step,
        "step_ms": 1000 * step,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan"),
        "teacher_share": teacher / step,
    }


def torchrun_check(nproc: int, timeout: int = 240) -> dict:
    """``torchrun -m clipkd train`` with ``nproc`` processes on a synthetic dataset, tiny models."""
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "clipkd", "data", "synth", "--dataset", "oxford_pets", "--root",
                        str(data), "--classes", "6"], check=True, capture_output=True)
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", "29531", "-m", "clipkd",
               "train", "--root", str(data), "--dataset-config", str(ROOT / "configs/datasets/oxford_pets.yaml"),
               "--config", str(ROOT / "configs/methods/abkd_promptkd.yaml"), "--seed", "1", "--output-dir", str(out),
               "MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
               "MODEL.TEACHER.CHECKPOINT", "zero-shot",
               "MODEL.STUDENT.NAME", "clipkd-tiny-student", "MODEL.STUDENT.PRETRAINED", "",
               "MODEL.PROMPT.DEPTH_VISION", "2", "INPUT.SIZE", "(32, 32)", "DATASET.NUM_SHOTS", "4",
               "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "2"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - t0
        ok = proc.returncode == 0 and (out / "results.json").is_file()
        said = [line for line in proc.stderr.splitlines() if "clipkd:" in line or "Error" in line]
        return {"nproc": nproc, "ok": ok, "seconds": seconds, "tail": "" if ok else "\n".join(said[-20:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per precision (default 200)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="tiny models at 32 px (a CPU check of the script)")
    parser.add_argument("--no-torchrun", action="store_true")
    args = parser.parse_args(argv)

    cfg, size = make_cfg(args.quick)
    run = Run(cfg)
    t0 = time.perf_counter()
    run.build()
    device = run.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU)"
    log(f"models built in {time.perf_counter() - t0:.1f} s on {gpu}")
    precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    rows = []
    for precision in precisions:
        rows.append(check_precision(run, precision, args.steps, args.batch, args.classes, size))
        log(f"{precision}: {rows[-1]['images_per_s']:.1f} images/s, finite {rows[-1]['finite']}")
    nccl = None
    if not args.no_torchrun:
        nproc = max(1, min(2, torch.cuda.device_count())) if device.type == "cuda" else 1
        nccl = torchrun_check(nproc)
        log(f"torchrun x{nproc}: {'ok' if nccl['ok'] else 'FAILED'}")

    t, s = cfg.MODEL.TEACHER.NAME, cfg.MODEL.STUDENT.NAME
    print(f"## GPU check: {t} -> {s} PromptKD student, {size} px, batch {args.batch}, {args.classes} classes, "
          f"random weights, {args.steps} steps per precision ({gpu}, torch {torch.__version__})")
    print()
    print("| precision | all losses finite | first / last loss | images/s | step (ms) | peak memory (MiB) "
          "| teacher share of step |")
    print("|---|:---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {'yes' if r['finite'] else 'NO'} | {r['first_loss']:.4g} / {r['last_loss']:.4g} "
              f"| {r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['peak_mib']:.0f} | {100 * r['teacher_share']:.0f}% |")
    if nccl is not None:
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        print()
        print(f"torchrun, {nccl['nproc']} process(es), {backend}: {'ok' if nccl['ok'] else 'FAILED'} "
              f"({nccl['seconds']:.0f} s)")
        if not nccl["ok"]:
            print("```\n" + nccl["tail"] + "\n```")
    failed = not all(r["finite"] for r in rows) or (nccl is not None and not nccl["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
