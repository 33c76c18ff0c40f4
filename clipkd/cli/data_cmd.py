"""``clipkd data``: make, inspect and check datasets."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from clipkd.data.specs import DG_STEMS, STEMS

    stems = (*STEMS, *DG_STEMS)
    data = sub.add_parser("data", help="make, inspect and check datasets",
                          description="Make, inspect and check datasets in the CoOp layouts.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True

    p = dsub.add_parser("synth", help="write a small synthetic dataset in a real dataset's exact layout")
    p.add_argument("--dataset", required=True, choices=stems, metavar="STEM", help=f"one of: {', '.join(stems)}")
    p.add_argument("--root", required=True, help="DATA root to write into (the dataset folder goes under it)")
    p.add_argument("--classes", type=int, default=7, help="number of classes (odd counts allowed; default 7)")
    p.add_argument("--images-per-class", type=int, default=8,
                   help="train images of the largest classes (others have 1-2 fewer; default 8)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.set_defaults(func=cmd_synth)

    p = dsub.add_parser("split", help="print the resolved split (few-shot draw, base/new half, class names)")
    p.add_argument("--root", required=True, help="DATA root")
    p.add_argument("--dataset", required=True, metavar="STEM", help="dataset stem or Dassl NAME")
    p.add_argument("--shots", type=int, required=True, help="K images per class; 0 = the full train set "
                                                            "(as DATASET.NUM_SHOTS)")
    p.add_argument("--seed", type=int, required=True, help="run seed of the few-shot draw (as SEED: 0..99999999)")
    p.add_argument("--subsample", choices=("all", "base", "new"), default="all")
    p.add_argument("--json", action="store_true", help="print one JSON object (paths relative to the dataset folder)")
    _add_cache_args(p)
    p.set_defaults(func=cmd_split)

    p = dsub.add_parser("check", help="check datasets under DATA and print their sizes")
    p.add_argument("--root", required=True, help="DATA root")
    p.add_argument("--dataset", nargs="+", metavar="STEM", help="datasets to check (default: every one found)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow on large datasets)")
    p.set_defaults(func=cmd_check)

    p = dsub.add_parser("imagenet-classnames",
                        help="write DATA/imagenet/classnames.txt from the wnid folders and CLIP's class names")
    p.add_argument("--root", required=True, help="DATA root")
    p.add_argument("--dataset", default="imagenet", choices=("imagenet", *DG_STEMS), metavar="STEM",
                   help="imagenet (default) or an ImageNet variant, whose folder gets ImageNet's full file "
                        f"(as CoOp copies it): {', '.join(DG_STEMS)}")
    p.add_argument("--force", action="store_true", help="replace an existing, different classnames.txt")
    p.set_defaults(func=cmd_imagenet_classnames)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None,
                   help="few-shot cache folder (default $CLIPKD_CACHE_DIR or ~/.cache/clipkd)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the few-shot cache")


def cmd_synth(args: argparse.Namespace) -> int:
    from clipkd.data.synth import synthesize

    folder = synthesize(args.root, args.dataset, classes=args.classes,
                        images_per_class=args.images_per_class, seed=args.seed)
    print(f"wrote synthetic {args.dataset} ({args.classes} classes) at {folder}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from clipkd.config import check_value
    from clipkd.data.splits import resolve_split

    check_value("DATASET.NUM_SHOTS", args.shots, "--shots")  # the rules clipkd train applies to its config
    check_value("SEED", args.seed, "--seed")
    cache = False if args.no_cache else args.cache_dir
    split = resolve_split(args.root, args.dataset, args.shots, args.seed, args.subsample, cache_dir=cache)
    if args.json:
        json.dump(split.to_json(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    counts = {key: [0] * len(split.classnames) for key in ("train", "val", "test")}
    for key, table in counts.items():
        for d in getattr(split, key):
            table[d.label] += 1
    shots = "all" if args.shots <= 0 or split.spec.test_only else f"{args.shots}-shot"
    if split.spec.test_only:
        shots += " (evaluation set: test images only, no draw)"
    print(f"{split.spec.name} ({split.spec.stem}) {shots}, seed {args.seed}, {args.subsample} classes: "
          f"{len(split.classnames)} classes, train {len(split.train)} / val {len(split.val)} / "
          f"test {len(split.test)} images")
    width = max(len(n) for n in split.classnames)
    print(f"{'label':>5}  {'class name':<{width}}  {'train':>5} {'val':>5} {'test':>5}")
    for label, name in enumerate(split.classnames):
        print(f"{label:>5}  {name:<{width}}  {counts['train'][label]:>5} {counts['val'][label]:>5} "
              f"{counts['test'][label]:>5}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from clipkd.data.readers import data_root, read_dataset
    from clipkd.data.specs import DATASETS, get_spec
    from clipkd.errors import ClipkdError, DataError

    data_root(args.root)  # a DataError when it is missing or a file
    if args.dataset:
        specs = [get_spec(name) for name in args.dataset]
    else:
        specs = [s for s in DATASETS.values() if os.path.isdir(os.path.join(os.path.expanduser(args.root), s.folder))]
        if not specs:
            raise DataError(
                f"no dataset folders found under {args.root}; expected e.g. "
                f"{', '.join(s.folder for s in list(DATASETS.values())[:3])} (see datasets/README.md)"
            )
    failed = 0
    for spec in specs:
        try:
            split = read_dataset(args.root, spec)
            problem = _check_images(split, args.decode)
            if problem:
                raise DataError(problem)
        except ClipkdError as exc:
            failed += 1
            print(f"FAIL {spec.stem}: {exc}")
            continue
        if spec.test_only:
            n = len({d.label for d in split.test})
            print(f"OK   {spec.stem} ({spec.name}): {n} classes, test {len(split.test)} images "
                  "(evaluation set: no train/val)")
            continue
        n = len({d.label for d in split.train})
        base = math.ceil(n / 2)
        print(f"OK   {spec.stem} ({spec.name}): {n} classes, train {len(split.train)} / val {len(split.val)} / "
              f"test {len(split.test)} images, base {base} / new {n - base} classes")
    return 1 if failed else 0


def _check_images(split, decode: bool) -> str:  # noqa: ANN001
    """The first problem with the image files, or ''."""
    missing = []
    for key in ("train", "val", "test"):
        for d in getattr(split, key):
            path = split.impath(d)
            if not os.path.isfile(path):
                missing.append(path)
            elif decode:
                from clipkd.data.loaders import load_image
                from clipkd.errors import DataError

                try:
                    load_image(path)
                except DataError as exc:
                    return str(exc)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"image {missing[0]}{more} missing; restore the files or re-download the dataset"
    return ""


def cmd_imagenet_classnames(args: argparse.Namespace) -> int:
    from clipkd.data.imagenet import write_imagenet_classnames

    path = write_imagenet_classnames(args.root, force=args.force, dataset=args.dataset)
    print(f"wrote {path}")
    return 0
