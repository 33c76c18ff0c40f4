"""Strict merging of YAML files and ``KEY VALUE`` overrides into the defaults.

yacs already refuses unknown keys, but its messages are terse and it refuses ``OPTIM.LR 1`` (int for a
float). Here every problem names the key and where it came from, and ints widen to floats. After merging,
:func:`validate` checks the values themselves (ranges, choices, finite floats), one line per problem.
"""

from __future__ import annotations

import ast
import math
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

from clipkd.config.defaults import PARAMS, ZERO_SHOT, choices, get_cfg_defaults
from clipkd.errors import ConfigError


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    if isinstance(value, str) and default is not None and not isinstance(default, str):
        value = _parse_value(value)  # YAML "(32, 32)" or "1e-4" means the Python literal, as in yacs
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _non_finite(value):
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, (tuple, list)):
        if isinstance(value, (tuple, list)):
            if default and len(value) != len(default):
                raise ConfigError(
                    f"{source}: {key} needs {len(default)} values like {list(default)}, got {list(value)}"
                )
            items = [
                _coerce(v, d, key, source) if default else v
                for v, d in zip(value, default if default else value)
            ]
            return type(default)(items)
    elif default is None:
        return value
    if isinstance(default, (tuple, list)) and isinstance(value, str) and _non_finite_items(value):
        raise ConfigError(f"{source}: {key} must hold finite numbers like {list(default)}, got {value!r}")
    raise ConfigError(
        f"{source}: {key} must be {type(default).__name__} (default {default!r}), got {value!r}"
    )


def _merge_mapping(cfg: CN, mapping: dict, source: str, prefix: str = "") -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: {prefix or 'the file'} must be a mapping of keys, got {mapping!r}")
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in cfg:
            raise ConfigError(f"{source}: unknown config key {key} (see clipkd/config/defaults.py)")
        if isinstance(cfg[name], CN):
            _merge_mapping(cfg[name], value, source, prefix=f"{key}.")
        else:
            cfg[name] = _coerce(value, cfg[name], key, source)


def merge_file(cfg: CN, path: str | Path) -> None:
    """Merge one YAML config file into ``cfg`` (in place)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file such as "
                          "configs/methods/abkd_promptkd.yaml (or a run folder's config.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); save the "
                          "file as UTF-8 (config files are YAML text)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    _merge_mapping(cfg, data or {}, str(path))
    if was_frozen:
        cfg.freeze()


def _non_finite(text: str) -> bool:
    """True for the words float() reads as nan or +-inf (literal_eval leaves them strings)."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _non_finite_items(text: str) -> bool:
    """True for a tuple or list written as text with nan or inf among its items, e.g. "(nan, 0.4, 0.4)"
    (literal_eval cannot read those words, so the whole text stays a string)."""
    text = text.strip()
    if len(text) < 2 or (text[0], text[-1]) not in (("(", ")"), ("[", "]")):
        return False
    return any(_non_finite(item.strip()) for item in text[1:-1].split(","))


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string, as in yacs


def merge_overrides(cfg: CN, opts: Sequence[str]) -> None:
    """Merge ``KEY VALUE`` pairs from the command line (in place)."""
    if len(opts) % 2:
        pairs = [f"{shlex.quote(k)} {shlex.quote(v)}" for k, v in zip(opts[0:-1:2], opts[1:-1:2])]
        read = ", ".join([*pairs, shlex.quote(opts[-1])])
        raise ConfigError(
            f"overrides come in KEY VALUE pairs, got {len(opts)} tokens: {read}; '{opts[-1]}' has no value"
        )
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    for key, text in zip(opts[0::2], opts[1::2]):
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, CN) or part not in node:
                raise ConfigError(f"command line: unknown config key {key}")
            if i < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], CN):
            raise ConfigError(f"command line: {key} is a group of keys, give one of its keys")
        node[parts[-1]] = _coerce(_parse_value(text), node[parts[-1]], key, "command line")
    if was_frozen:
        cfg.freeze()


# Keys whose value, when set, is a path: made absolute when a config is built, so a run's config.yaml names the
# same files from any working directory (clipkd eval --run, --resume elsewhere never pick up other data).
PATH_KEYS = ("OUTPUT_DIR", "DATASET.ROOT", "MODEL.TEACHER.CHECKPOINT", "DISTILL.TEACHER_CACHE", "KDPL.DICTIONARY")
# Keys that hold an open_clip tag ("openai") or a local weights file: a path when it looks like one or exists.
WEIGHT_KEYS = ("MODEL.TEACHER.PRETRAINED", "MODEL.STUDENT.PRETRAINED")


def _is_path(value: str) -> bool:
    return "/" in value or os.sep in value or value.startswith(("~", ".")) or os.path.exists(value)


def absolute_paths(cfg: CN) -> None:
    """Rewrite relative paths in ``cfg`` (in place, unfrozen) as absolute ones, read from the working directory;
    ``~`` is expanded. Symlinks are kept as written."""
    for key in PATH_KEYS + WEIGHT_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        value = node[leaf]
        if not isinstance(value, str) or value.strip() in ("", ZERO_SHOT):
            continue
        if key in WEIGHT_KEYS and not _is_path(value):
            continue
        node[leaf] = os.path.abspath(os.path.expanduser(value))


def build_config(
    files: Iterable[str | Path] = (), overrides: Sequence[str] = (), freeze: bool = True
) -> CN:
    """Defaults <- each file in order (dataset yaml, then method yaml) <- command-line overrides; paths made
    absolute (:func:`absolute_paths`)."""
    cfg = get_cfg_defaults()
    for f in files:
        merge_file(cfg, f)
    merge_overrides(cfg, list(overrides))
    absolute_paths(cfg)
    validate(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _get(cfg: CN, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def flatten(cfg: CN, prefix: str = "") -> dict[str, Any]:
    """``{"OPTIM.LR": 0.005, ...}`` for every key (lists as tuples, so values compare as the config means)."""
    out: dict[str, Any] = {}
    for name, value in cfg.items():
        if isinstance(value, CN):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tuple(value) if isinstance(value, list) else value
    return out


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, (tuple, list)) else repr(value)


# Fixes to add when a key's value is not one of its choices.
_CHOICE_HINTS = {
    "DATASET.SUBSAMPLE_CLASSES": "base trains on the base classes and evaluates on base and new",
}

# The largest SEED. The seed itself would do up to 2**32 - 1 (numpy's limit; Python's random takes any int,
# torch.manual_seed up to 2**64 - 1), but each epoch seeds torch with SEED * 100003 + epoch and each image's
# augmentation with that * 1000003 + image index (clipkd.engine.runtime.epoch_seed, clipkd.data.loaders), which
# must stay below 2**64: with SEED < 10**8 they do for any run up to a million epochs and a billion images.
SEED_MAX = 10**8 - 1

# (key, test, what the value must be, how to fix it): checked in order by validate(); "" means no hint.
_RULES: tuple[tuple[str, Callable[[Any], bool], str, str], ...] = (
    ("SEED", lambda v: v >= 0, ">= 0", "e.g. 1, 2, 3 (the seed picks the few-shot split and every draw)"),
    ("SEED", lambda v: v <= SEED_MAX, f"<= {SEED_MAX}",
     "the torch seeds of each epoch and image are made from it and must stay below 2**64 (the range also "
     "suits numpy's 0..2**32 - 1 and Python's random); use e.g. 1, 2, 3"),
    ("DATASET.NUM_SHOTS", lambda v: v >= 0, ">= 0", "K images per class, or 0 for the full train set"),
    ("INPUT.SIZE", lambda v: all(x >= 1 for x in v), "2 positive ints", "(height, width), e.g. (224, 224)"),
    ("INPUT.RRCROP_SCALE", lambda v: 0 < v[0] <= v[1] <= 1, "(lo, hi) with 0 < lo <= hi <= 1",
     "the area range of the random resized crop, e.g. (0.08, 1.0)"),
    ("INPUT.FLIP_PROB", lambda v: 0 <= v <= 1, "in [0, 1]", "a probability"),
    ("INPUT.PIXEL_STD", lambda v: all(x > 0 for x in v), "> 0 in every channel", "images are divided by it"),
    ("DATALOADER.NUM_WORKERS", lambda v: v >= 0, ">= 0", "0 loads in the main process"),
    ("DATALOADER.TRAIN_X.BATCH_SIZE", lambda v: v >= 1, ">= 1", ""),
    ("DATALOADER.TEST.BATCH_SIZE", lambda v: v >= 1, ">= 1", ""),
    ("DISTILL.WEIGHT", lambda v: v >= 0, ">= 0", "0 turns distillation off"),
    ("DISTILL.CE_WEIGHT", lambda v: v >= 0, ">= 0", "0 turns the label loss off"),
    *[(spec.key, spec.ok, spec.bound, spec.fix) for spec in PARAMS.values() if spec.bound],  # the loss parameters
    ("KDPL.K_MAX", lambda v: v >= 1, ">= 1", "the dictionary names distilled per batch (KDPL: 1000)"),
    ("MODEL.PROMPT.N_CTX_VISION", lambda v: v >= 0, ">= 0", "prompt tokens per layer; 0 means no vision prompts"),
    ("MODEL.PROMPT.N_CTX_TEXT", lambda v: v >= 0, ">= 0", "prompt tokens per layer; 0 means no text prompts"),
    ("MODEL.PROMPT.DEPTH_VISION", lambda v: v >= 0, ">= 0", "prompted layers; 0 means no vision prompts"),
    ("MODEL.PROMPT.DEPTH_TEXT", lambda v: v >= 0, ">= 0", "prompted layers; 0 means no text prompts"),
    ("OPTIM.LR", lambda v: v > 0, "> 0", "e.g. 0.005"),
    ("OPTIM.WEIGHT_DECAY", lambda v: v >= 0, ">= 0", "0 turns it off"),
    ("OPTIM.MOMENTUM", lambda v: 0 <= v < 1, "in [0, 1)", "e.g. 0.9"),
    ("OPTIM.MAX_EPOCH", lambda v: v >= 1, ">= 1",
     "to evaluate untrained prompts use clipkd eval --zero-shot student"),
    ("OPTIM.WARMUP_EPOCH", lambda v: v >= 0, ">= 0", "0 means no warm-up"),
    ("OPTIM.WARMUP_CONS_LR", lambda v: v >= 0, ">= 0", "the constant lr of the warm-up epochs"),
    ("OPTIM.GRAD_CLIP", lambda v: v >= 0, ">= 0", "0 turns clipping off"),
)


def validate(cfg: CN) -> None:
    """Check the merged values: floats are finite, choices are known names, numbers are in range.

    The first problem raises ConfigError with one line naming the key, the value and the fix.
    """
    for key, value in flatten(cfg).items():
        floats = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(x, float) and not math.isfinite(x) for x in floats):
            raise ConfigError(f"{key} must be a finite number, got {_show(value)}")
    for key, allowed in choices().items():
        value = _get(cfg, key)
        if value not in allowed:
            hint = f" ({_CHOICE_HINTS[key]})" if key in _CHOICE_HINTS else ""
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}{hint}")
    for key, ok, must, fix in _RULES:
        _check_rule(_get(cfg, key), ok, must, fix, key)


def _check_rule(value: Any, ok: Callable[[Any], bool], must: str, fix: str, name: str) -> None:
    try:
        good = ok(value)
    except (TypeError, IndexError):  # a value of the wrong type or length set by hand, not merged
        good = False
    if not good:
        raise ConfigError(f"{name} must be {must} (got {_show(value)})" + (f"; {fix}" if fix else ""))


def check_value(key: str, value: Any, name: str) -> None:
    """validate()'s rule for config ``key``, applied to a value given another way (``name``, e.g. the
    ``--shots`` of ``clipkd data split`` for DATASET.NUM_SHOTS): every entry point refuses the same values with
    the same words."""
    rules = [rule for rule in _RULES if rule[0] == key]
    if not rules:
        raise KeyError(f"no rule for config key {key}")
    for _, ok, must, fix in rules:
        _check_rule(value, ok, must, fix, f"{name} ({key})")
