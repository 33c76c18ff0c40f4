"""Strict merging of YAML files and ``KEY VALUE`` overrides into the defaults.

yacs already refuses unknown keys, but its messages are terse and it refuses ``OPTIM.LR 1`` (int for a
float). Here every problem names the key and where it came from, and ints widen to floats.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

from clipkd.config.defaults import CHOICES, get_cfg_defaults
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
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    _merge_mapping(cfg, data or {}, str(path))
    if was_frozen:
        cfg.freeze()


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string, as in yacs


def merge_overrides(cfg: CN, opts: Sequence[str]) -> None:
    """Merge ``KEY VALUE`` pairs from the command line (in place)."""
    if len(opts) % 2:
        raise ConfigError(
            f"overrides come in KEY VALUE pairs; '{opts[-1]}' has no value"
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


def build_config(
    files: Iterable[str | Path] = (), overrides: Sequence[str] = (), freeze: bool = True
) -> CN:
    """Defaults <- each file in order (dataset yaml, then method yaml) <- command-line overrides."""
    cfg = get_cfg_defaults()
    for f in files:
        merge_file(cfg, f)
    merge_overrides(cfg, list(overrides))
    validate(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def validate(cfg: CN) -> None:
    """Check the keys that take one of a fixed set of values."""
    for key, allowed in CHOICES.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {node!r}")
