"""Zero-shot vs PromptSRC-trained teacher on the embedded toy benchmark, and the students distilled from each.

Per seed: the toy teacher CLIP zero-shot; the same CLIP with IVLP prompts trained by the PromptSRC objective
(``configs/methods/promptsrc_teacher.yaml``'s recipe scaled to the toy: depth 2 of the toy teacher's 4 vision /
3 text blocks, GPA mean at 3/4 of the epochs as 15 of 20 is); then the PromptKD student distilled with KD and
with ABKD (the demo's settings, inductive) from each teacher. Everything runs through ``Run`` exactly as
``clipkd train`` would; the runs are kept under ``--output-dir``.

    python benchmarks/toy_teachers.py --seeds 1 2 3 --output-dir toy-teachers   # about 15 min on 2 CPU cores

Prints a Markdown table (mean +- population std over seeds; HM of the mean Base and mean New).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clipkd.runs.run import Run
from clipkd.toy.demo import METHODS, demo_config
from toy_common import seed_table, toy_assets  # benchmarks/toy_common.py (scripts run from benchmarks/)

TEACHER_EPOCHS = 10


def teacher_overrides(weights: dict[str, Path]) -> list[str]:
    """The PromptSRC teacher recipe on the toy teacher CLIP."""
    return [
        "MODEL.STUDENT.NAME", "clipkd-toy-teacher", "MODEL.STUDENT.PRETRAINED", str(weights["teacher"]),
        "MODEL.STUDENT.TYPE", "ivlp", "MODEL.PROMPT.N_CTX_TEXT", "4", "MODEL.PROMPT.N_CTX_VISION", "4",
        "MODEL.PROMPT.DEPTH_TEXT", "2", "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.CTX_INIT", "a photo of a",
        "DISTILL.OBJECTIVE", "promptsrc", "DISTILL.WEIGHT", "0", "DISTILL.CE_WEIGHT", "1",
        "PROMPTSRC.GPA_MEAN", str(0.75 * TEACHER_EPOCHS), "PROMPTSRC.GPA_STD", "1",
        "OPTIM.MAX_EPOCH", str(TEACHER_EPOCHS),
    ]


def row(name: str, teacher: str, seed: int, res: dict) -> dict:
    return {"model": name, "teacher": teacher, "seed": seed, "base": res["base"]["accuracy"],
            "new": res["new"]["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.time()
    data_root, weights = toy_assets(args.cache_dir)
    rows = []
    for seed in args.seeds:
        zero_shot = Run(demo_config(data_root, weights, seed))
        rows.append(row("teacher", "zero-shot", seed, zero_shot.evaluate(which="teacher")))
        teacher_dir = args.output_dir / "teachers" / f"seed{seed}"
        teacher_run = Run(demo_config(data_root, weights, seed, *teacher_overrides(weights)), teacher_dir, echo=False)
        rows.append(row("teacher", "PromptSRC", seed, teacher_run.fit()))
        print(f"[{time.time() - started:.0f}s] seed {seed}: teacher trained", file=sys.stderr, flush=True)
        for teacher, ckpt in (("zero-shot", "zero-shot"), ("PromptSRC", str(teacher_dir))):
            for method, extra in METHODS.items():
                cfg = demo_config(data_root, weights, seed, *extra, "MODEL.TEACHER.CHECKPOINT", ckpt)
                run = Run(cfg, args.output_dir / f"{method}-from-{ckpt if ckpt == 'zero-shot' else 'promptsrc'}"
                          / f"seed{seed}", echo=False)
                rows.append(row(f"student {method}", teacher, seed, run.fit()))
        print(f"[{time.time() - started:.0f}s] seed {seed}: students trained", file=sys.stderr, flush=True)
    (args.output_dir / "toy_teachers.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"## Toy benchmark: zero-shot vs PromptSRC teacher ({len(args.seeds)} seeds, "
          f"{time.time() - started:.0f} s)\n")
    print(seed_table(rows, ("model", "teacher")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
