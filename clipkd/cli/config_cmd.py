"""``clipkd config show``: the merged config a run would use, as YAML (torch-free, so it answers at once)."""

from __future__ import annotations

import argparse
from typing import Any

_DESCRIPTION = """\
Print the config a run would use, merged as clipkd train merges it: the defaults (clipkd/config/defaults.py)
<- --dataset-config <- each --config in order <- --root / --seed <- trailing KEY VALUE pairs. The YAML has
sorted keys (as a run's config.yaml, OUTPUT_DIR aside), so two recipes can be compared with diff. --diff
prints only the keys whose value differs from the defaults. An unknown key, a bad value or a combination of
settings clipkd train refuses (e.g. a DISTILL.* setting the loss does not take) is the same one-line error
clipkd train gives. Not checked here: what needs the data, the model files or the device (DATASET.ROOT,
MODEL.TEACHER.CHECKPOINT, INPUT.SIZE against the models, the batch against the images, fp16 without CUDA).
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the merged config a run would use (clipkd config show)",
                       description="Inspect configs.")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    s = csub.add_parser("show", help="print the merged config (defaults <- dataset yaml <- method yamls <- "
                                     "overrides) as YAML", description=_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--dataset-config", help="configs/datasets/STEM.yaml")
    s.add_argument("--dataset", metavar="STEM", help="configs/datasets/STEM.yaml (instead of --dataset-config)")
    s.add_argument("--method", help="METHOD or a method file, with its per-dataset settings, as clipkd train "
                                     "--method merges them")
    s.add_argument("--config", action="append", default=[],
                   help="configs/methods/METHOD.yaml; repeat to merge more files after it, in order")
    s.add_argument("--root", help="DATA root (sets DATASET.ROOT)")
    s.add_argument("--seed", type=int, help="sets SEED")
    s.add_argument("--diff", action="store_true", help="only the keys that differ from the defaults")
    s.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    s.set_defaults(func=cmd_show)


def _overrides(args: argparse.Namespace) -> list[str]:
    """--root/--seed first, then the user's KEY VALUE tokens (a trailing --diff among them is the switch)."""
    from clipkd.errors import ConfigError

    opts = list(args.opts or [])
    opts = opts[1:] if opts and opts[0] == "--" else opts
    while "--diff" in opts:
        opts.remove("--diff")
        args.diff = True
    stray = [o for o in opts[0::2] if o.startswith("--")]
    if stray:
        raise ConfigError(f"{stray[0]} is not a config key; put options before the KEY VALUE overrides")
    flags = []
    if args.root:
        flags += ["DATASET.ROOT", args.root]
    if args.seed is not None:
        flags += ["SEED", str(args.seed)]
    return flags + opts


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = list(value) if isinstance(value, tuple) else value
    return out


def show_text(files: list[str], overrides: list[str], diff: bool = False) -> str:
    """The merged config as YAML (``diff``: only the keys whose value differs from the defaults)."""
    import yaml

    from clipkd.config import build_config, check_config, flatten, get_cfg_defaults

    cfg = build_config(files, overrides)
    check_config(cfg)  # what clipkd train refuses on the config alone
    if not diff:
        return cfg.dump()
    defaults = flatten(get_cfg_defaults())
    changed = {k: v for k, v in flatten(cfg).items() if defaults.get(k) != v}
    return yaml.safe_dump(_nest(changed), sort_keys=True) if changed else "# no key differs from the defaults\n"


def cmd_show(args: argparse.Namespace) -> int:
    from clipkd.config.recipes import command_files

    overrides = _overrides(args)  # reads a trailing --diff too
    files = command_files(args.method, args.dataset, args.dataset_config, args.config)
    text = show_text([str(f) for f in files if f], overrides, args.diff)
    print(text.rstrip("\n"))
    return 0
