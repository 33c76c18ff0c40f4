"""``clipkd train`` and ``clipkd eval``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="distil a teacher into a prompt student, then evaluate Base/New/HM",
        description="Train on the base classes (or all images, transductive), then evaluate base and new "
        "test images and write DIR/results.json. Trailing KEY VALUE pairs override config keys.")
    p.add_argument("--root", help="DATA root (sets DATASET.ROOT)")
    p.add_argument("--dataset-config", help="configs/datasets/STEM.yaml")
    p.add_argument("--dataset", metavar="STEM", help="configs/datasets/STEM.yaml (instead of --dataset-config)")
    p.add_argument("--method", help="METHOD (configs/methods/METHOD.yaml) or a method file, then its "
                                     "configs/per_dataset/METHOD/STEM.yaml when present: the recipe clipkd sweep "
                                     "and the scripts use")
    p.add_argument("--config", action="append", default=[],
                   help="configs/methods/METHOD.yaml; repeat to add per-dataset settings merged after it (after "
                        "--method's files when both are given)")
    p.add_argument("--seed", type=int, help="run seed (sets SEED; also seeds the few-shot draw)")
    p.add_argument("--output-dir", required=True, help="run folder; must be new or empty unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its last epoch; a run finished with the same config "
                        "is left as it is (exit 0), one finished with another config is an error")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to DIR/tensorboard (needs: pip install 'clipkd[tensorboard]')")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="evaluate a trained run, a student checkpoint, or a zero-shot teacher/student, on base and "
        "new classes",
        description="Re-evaluate a run (--run DIR), evaluate a student checkpoint file (--checkpoint FILE: "
        "clipkd's model.pt or a PromptKD student's model-best.pth.tar, with the config arguments of train), or "
        "evaluate without training (--zero-shot teacher|student, with the config arguments of train).")
    p.add_argument("--run", help="a run folder written by clipkd train")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="a student checkpoint: clipkd's model.pt (or its run folder) or a PromptKD student file "
                        "(model-best.pth.tar / model.pth.tar-N, or its VLPromptLearner folder); read without "
                        "running code from it; the student is built from --dataset-config/--config/KEY VALUE")
    p.add_argument("--zero-shot", choices=("teacher", "student"),
                   help="evaluate a CLIP zero-shot instead: the configured teacher, or the student's CLIP with "
                        "its own text tower and the teacher's templates")
    p.add_argument("--subsample", choices=("base", "new", "all"),
                   help="evaluate one half only (default: base and new, or all for few-shot runs)")
    p.add_argument("--dataset", metavar="STEM",
                   help="with --run: evaluate the run on all classes of another dataset's test split (cross-dataset "
                        "transfer, domain generalisation: e.g. caltech101, imagenet_a) and write "
                        "DIR/eval/STEM/results.json; --root names the DATA root that holds it")
    p.add_argument("--root", help="DATA root (overrides the run's DATASET.ROOT)")
    p.add_argument("--dataset-config")
    p.add_argument("--config", action="append", default=[],
                   help="configs/methods/METHOD.yaml; repeat to add per-dataset settings merged after it")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="also write the results JSON to this file")
    p.add_argument("--output-dir", help="write DIR/results.json (the folder is created if needed)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    p.set_defaults(func=cmd_eval)


def _config(args: argparse.Namespace, files: list[str | Path]) -> "object":
    """Config from files and ``KEY VALUE`` overrides; --root and --seed go first, so the user's own tokens
    are the last ones (an odd count is then reported at the user's token)."""
    from clipkd.config import build_config

    return build_config([f for f in files if f], [*_flag_opts(args), *_user_opts(args)])


def _flag_opts(args: argparse.Namespace) -> list[str]:
    opts = []
    if args.root:
        opts += ["DATASET.ROOT", args.root]
    if args.seed is not None:
        opts += ["SEED", str(args.seed)]
    return opts


_TRAILING_FLAGS = ("--resume", "--tensorboard")  # switches users put after the overrides, too


def _user_opts(args: argparse.Namespace) -> list[str]:
    """The KEY VALUE tokens; a switch among them (``... OPTIM.LR 0.1 --resume``) is taken as the switch."""
    from clipkd.errors import ClipkdError

    opts = list(args.opts or [])
    opts = opts[1:] if opts and opts[0] == "--" else opts
    for flag in _TRAILING_FLAGS:
        while flag in opts and hasattr(args, flag[2:]):
            opts.remove(flag)
            setattr(args, flag[2:], True)
    stray = [o for o in opts[0::2] if o.startswith("--")]
    if stray:
        raise ClipkdError(f"{stray[0]} is not a config key; put options before the KEY VALUE overrides")
    return opts


def train_config(args: argparse.Namespace) -> "object":
    """The config ``clipkd train`` runs with these arguments (sweep cells and scripts build the same one)."""
    from clipkd.config.recipes import command_files

    cfg = _config(args, command_files(args.method, args.dataset, args.dataset_config, args.config))
    cfg.defrost()  # _config reads --resume given after the overrides too
    cfg.OUTPUT_DIR = os.path.abspath(args.output_dir)
    cfg.freeze()
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from clipkd.rundir import RunDir

    cfg = train_config(args)
    if args.resume and RunDir(args.output_dir).plan(cfg) == "finished":
        print(f"skip {args.output_dir} (finished)")
        return 0
    from clipkd.runs.run import Run

    results = Run(cfg, args.output_dir, tensorboard=args.tensorboard).fit(resume=args.resume)
    print(json.dumps(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from clipkd.runs.run import Run
    from clipkd.rundir import RunDir, check_evaluation_file
    from clipkd.errors import ClipkdError

    if sum(bool(a) for a in (args.run, args.zero_shot, args.checkpoint)) != 1:
        raise ClipkdError("give one of --run DIR, --checkpoint FILE or --zero-shot teacher|student")
    if args.dataset and not args.run:
        raise ClipkdError(f"--dataset evaluates a trained run (--run DIR) on another dataset; for a checkpoint or a "
                          f"zero-shot model pass --dataset-config configs/datasets/{args.dataset}.yaml and "
                          "DATASET.SUBSAMPLE_CLASSES all instead")
    if args.output:  # before anything is computed or written
        check_evaluation_file(args.output)
    if args.output_dir and not args.dataset:
        RunDir(args.output_dir).check_evaluation_target()
    if args.run:
        if args.dataset_config or args.config:
            raise ClipkdError("--run DIR evaluates with the run's own config.yaml; drop --dataset-config/--config "
                              "(KEY VALUE overrides such as DATASET.ROOT still apply)")
        if args.dataset:
            return _eval_transfer(args)
        run = Run.load(args.run, [*_flag_opts(args), *_user_opts(args)])
        run.check_inputs()
        which = "final"
    elif args.checkpoint:
        run = Run(_config(args, [args.dataset_config, *args.config]))
        run.load_student_file(args.checkpoint)
        which = "final"
    else:
        run = Run(_config(args, [args.dataset_config, *args.config]))
        which = args.zero_shot
    halves = (args.subsample,) if args.subsample else None
    results = run.evaluate(halves, which=which)
    for half in halves or run.data.halves:
        print(f"{half}: accuracy {results[half]['accuracy']:.2f}%  macro-F1 {results[half]['macro_f1']:.2f}%  "
              f"({results[half]['n']} images)")
    if "hm" in results:
        print(f"HM: {results['hm']:.2f}%")
    if args.checkpoint:
        results["checkpoint"] = str(args.checkpoint)
    from clipkd.fileio import atomic_write_text

    if args.output:
        atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    if args.output_dir:
        RunDir(args.output_dir).write_evaluation(json.dumps(results, indent=2) + "\n")
    return 0


def _eval_transfer(args: argparse.Namespace) -> int:
    """``clipkd eval --run DIR --dataset STEM``: all classes of STEM's test split, into DIR/eval/STEM/results.json."""
    from clipkd.runs.transfer import evaluate_transfer
    from clipkd.errors import ClipkdError
    from clipkd.fileio import atomic_write_text

    if args.subsample:
        raise ClipkdError("--dataset evaluates all classes of the target dataset; drop --subsample")
    if args.output_dir:
        raise ClipkdError("--dataset writes DIR/eval/STEM/results.json inside the run folder; drop --output-dir "
                          "(--output FILE writes a copy elsewhere)")
    results, path = evaluate_transfer(args.run, args.dataset, [*_flag_opts(args), *_user_opts(args)])
    m = results["all"]
    print(f"{results['dataset']} ({results['classes']} classes, trained on {results['source']}): accuracy "
          f"{m['accuracy']:.2f}%  macro-F1 {m['macro_f1']:.2f}%  ({m['n']} images)")
    print(f"wrote {path}")
    if args.output:
        atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    return 0
