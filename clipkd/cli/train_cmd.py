"""``clipkd train`` and ``clipkd eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="distil a teacher into a prompt student, then evaluate Base/New/HM",
        description="Train on the base classes (or all images, transductive), then evaluate base and new "
        "test images and write DIR/results.json. Trailing KEY VALUE pairs override config keys.")
    p.add_argument("--root", help="DATA root (sets DATASET.ROOT)")
    p.add_argument("--dataset-config", help="configs/datasets/STEM.yaml")
    p.add_argument("--config", action="append", default=[],
                   help="configs/methods/METHOD.yaml; repeat to add per-dataset settings merged after it")
    p.add_argument("--seed", type=int, help="run seed (sets SEED; also seeds the few-shot draw)")
    p.add_argument("--output-dir", required=True, help="run folder; must be new or empty unless --resume")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last epoch")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="evaluate a trained run, or a zero-shot teacher/student, on base and new classes",
        description="Re-evaluate a run (--run DIR) or evaluate without training (--zero-shot teacher|student "
        "with the same config arguments as train).")
    p.add_argument("--run", help="a run folder written by clipkd train")
    p.add_argument("--zero-shot", choices=("teacher", "student"), help="evaluate an untrained model instead")
    p.add_argument("--subsample", choices=("base", "new", "all"),
                   help="evaluate one half only (default: base and new, or all for few-shot runs)")
    p.add_argument("--root", help="DATA root (overrides the run's DATASET.ROOT)")
    p.add_argument("--dataset-config")
    p.add_argument("--config")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="also write the results JSON to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    p.set_defaults(func=cmd_eval)


def _config(args: argparse.Namespace, files: list[str | Path]) -> "object":
    from clipkd.config import build_config

    opts = list(args.opts or [])
    if opts and opts[0] == "--":
        opts = opts[1:]
    if args.root:
        opts += ["DATASET.ROOT", args.root]
    if args.seed is not None:
        opts += ["SEED", str(args.seed)]
    return build_config([f for f in files if f], opts)


def cmd_train(args: argparse.Namespace) -> int:
    from clipkd.engine.train import train

    cfg = _config(args, [args.dataset_config, *args.config])
    cfg.defrost()
    cfg.OUTPUT_DIR = str(args.output_dir)
    cfg.freeze()
    results = train(cfg, args.output_dir, resume=args.resume)
    print(json.dumps(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from clipkd.engine.checkpoint import load_checkpoint
    from clipkd.engine.train import CONFIG_FILE, MODEL_FILE, build_models, evaluate_run, pick_device, prepare_data
    from clipkd.errors import ClipkdError

    if bool(args.run) == bool(args.zero_shot):
        raise ClipkdError("give either --run DIR or --zero-shot teacher|student")
    if args.run:
        run = Path(args.run)
        if not (run / CONFIG_FILE).is_file():
            raise ClipkdError(f"{run / CONFIG_FILE} not found; --run takes a folder written by clipkd train")
        cfg = _config(args, [run / CONFIG_FILE])
    else:
        cfg = _config(args, [args.dataset_config, args.config])
    device = pick_device()
    torch.manual_seed(cfg.SEED)
    data = prepare_data(cfg)
    if args.zero_shot == "teacher":
        from clipkd.models.student import build_teacher

        model = build_teacher(cfg, data.spec.template, device=device)
    else:
        _, model = build_models(cfg, data.spec, device)
        if args.run:
            path = Path(args.run) / MODEL_FILE
            model.load_trainable_state_dict(load_checkpoint(path)["state_dict"], source=str(path))
    halves = (args.subsample,) if args.subsample else tuple(data.halves)
    results = evaluate_run(model, data, cfg, device, halves=halves)
    for half in halves:
        print(f"{half}: accuracy {results[half]['accuracy']:.2f}%  macro-F1 {results[half]['macro_f1']:.2f}%  "
              f"({results[half]['n']} images)")
    if "hm" in results:
        print(f"HM: {results['hm']:.2f}%")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0
