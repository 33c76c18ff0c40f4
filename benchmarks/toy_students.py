"""Every registered student with its own recipe, KD and ABKD, on the toy benchmark (inductive protocol).

For each student in ``clipkd.registry.STUDENTS`` the three recipes of ``configs/methods/`` are run: the method's
own (``<student>.yaml``: the paper's supervised baseline, cross-entropy plus its own regulariser where it has
one), ``kd_<student>.yaml`` and ``abkd_<student>.yaml``; a recipe the folder does not hold is a ``—`` cell.

One rule for every row, nothing tuned per row: the demo's toy world (``clipkd/toy/demo.yaml``: toy dataset, tiny
pretrained teacher and student CLIPs, 16-shot base classes, SGD lr 0.02 for 10 epochs, batch 32) with, from each
recipe, what defines the method: MODEL.STUDENT.TYPE, MODEL.PROMPT.*, DISTILL.* and the method's own sections
(e.g. PROMPTSRC.*). Kept from the toy world: the dataset, input, loaders, optimiser and schedule, the models and
their weights, and DISTILL.WEIGHT 1 for a distillation recipe (the recipes' weights, 1000 for PromptKD's KL and
100 for ABKD, pair with their own learning rates, 0.005 and 1e-4), with PromptKD's KL as the plain KL (it is the
KL divided by the number of classes, which its weight of 1000 makes up for), so KD and AB are both a per-image
sum over classes, averaged over the batch, at weight 1. Prompt depths are capped at the toy towers'
2 layers. Everything else (prompt lengths and init, CE and regulariser weights, AB's alpha and beta, the
objective) is the recipe's.

    python benchmarks/toy_students.py --seeds 1 2 3 --output-dir toy-students   # ~15 min on 2 CPU cores

Prints a Markdown table (Base / New mean +- population std over seeds, HM of the means) and writes the rows to
``OUTPUT_DIR/toy_students.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from yacs.config import CfgNode

from clipkd.config import flatten
from clipkd.config.recipes import configs_dir
from clipkd.registry import STUDENTS
from clipkd.runs.run import Run
from clipkd.toy.demo import demo_config
from toy_common import seed_table, toy_assets  # benchmarks/toy_common.py (scripts run from benchmarks/)

RECIPES = {"own": "{}", "KD": "kd_{}", "ABKD": "abkd_{}"}
# What a recipe contributes on the toy world: the keys that define the method (see the module docstring).
METHOD_PREFIXES = ("MODEL.STUDENT.TYPE", "MODEL.PROMPT.", "DISTILL.")
WORLD_SECTIONS = ("DATASET.", "DATALOADER.", "INPUT.", "OPTIM.", "MODEL.", "TEST.", "TRAIN.", "SEED", "OUTPUT_DIR")
KEPT = {"DISTILL.PROTOCOL", "DISTILL.TEACHER_CACHE"}  # the toy world's protocol (inductive) and no cache
TOY_LAYERS = 2  # clipkd-toy-student's towers


def recipe_overrides(path: Path) -> list[str]:
    """``KEY VALUE`` pairs of the method-defining settings of one recipe file."""
    with open(path, encoding="utf-8") as f:
        flat = flatten(CfgNode(CfgNode.load_cfg(f)))
    out: list[str] = []
    for key, value in flat.items():
        if key in KEPT or not (key.startswith(METHOD_PREFIXES) or not key.startswith(WORLD_SECTIONS)):
            continue
        if key.startswith("MODEL.PROMPT.DEPTH_"):
            value = min(int(value), TOY_LAYERS)
        if key == "DISTILL.WEIGHT" and float(value) > 0:
            value = 1.0
        if key == "DISTILL.LOSS" and value == "promptkd_kl":  # = kl / classes; its x 1000 pairs with lr 0.005
            value = "kl"
        out += [key, repr(value) if isinstance(value, str) else str(value)]
    return out


def distils(overrides: list[str]) -> bool:
    """Whether a recipe's overrides train against a teacher (DISTILL.WEIGHT > 0; the default is 1)."""
    pairs = dict(zip(overrides[::2], overrides[1::2]))
    return float(pairs.get("DISTILL.WEIGHT", 1.0)) > 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--students", nargs="+", default=list(STUDENTS.names()), choices=list(STUDENTS.names()))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides for every run")
    args = parser.parse_args(argv)
    started = time.time()
    data_root, weights = toy_assets(args.cache_dir)
    methods = configs_dir() / "methods"
    rows, missing, failed = [], [], []
    for student in args.students:
        for label in args.recipes:
            recipe = RECIPES[label].format(student)
            path = methods / f"{recipe}.yaml"
            if not path.is_file():
                missing.append(recipe)
                continue
            overrides = recipe_overrides(path)
            if label == "own" and distils(overrides):  # PromptKD: the method is a distillation, its KD row
                missing.append(f"{recipe} (a distillation recipe: see its KD row)")
                continue
            for seed in args.seeds:
                cfg = demo_config(data_root, weights, seed, *overrides, *args.opts)
                try:
                    res = Run(cfg, args.output_dir / recipe / f"seed{seed}", echo=False).fit()
                except Exception as exc:  # noqa: BLE001 - report a recipe that does not train, keep going
                    failed.append(f"{recipe} seed {seed}: {type(exc).__name__}: {exc}")
                    print(f"{recipe} seed {seed} failed: {exc}", file=sys.stderr)
                    continue
                rows.append({"student": student, "recipe": label, "file": recipe, "seed": seed,
                             "base": res["base"]["accuracy"], "new": res["new"]["accuracy"]})
            print(f"[{time.time() - started:.0f}s] {recipe}", file=sys.stderr, flush=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "toy_students.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"## Toy benchmark: students x recipes (inductive, {len(args.seeds)} seeds, "
          f"{time.time() - started:.0f} s{', ' + ' '.join(args.opts) if args.opts else ''})\n")
    print(seed_table(rows, ("student", "recipe")))
    if missing:
        print(f"\nNo recipe file (—): {', '.join(missing)}")
    if failed:
        print("\nFailed:\n" + "\n".join(f"- {f}" for f in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
