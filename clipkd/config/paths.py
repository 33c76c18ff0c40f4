"""Path-valued config keys are made absolute when a config is built, so a run's ``config.yaml`` names the same
files from any working directory (``clipkd eval --run``, ``--resume`` elsewhere never pick up other data)."""

from __future__ import annotations

import os

from yacs.config import CfgNode as CN

ZERO_SHOT = "zero-shot"  # MODEL.TEACHER.CHECKPOINT value that chooses the zero-shot teacher explicitly

# Keys whose value, when set, is a path.
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
