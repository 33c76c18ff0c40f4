"""Checkpoints hold the learnable tensors only (prompts, projector), never the frozen CLIP weights.

``DIR/checkpoints/last.pt`` (written every epoch) carries what ``--resume`` needs: optimiser, scheduler and
epoch. ``DIR/model.pt`` is the run's final model (last or best-on-val epoch): ``{"state_dict": ...}`` whose
keys for an ivlp student are PromptSRC's, so a later run can load it as a prompted teacher. Every write is
atomic (temp file + rename): an interrupted run never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from clipkd.errors import ModelError
from clipkd.fileio import atomic_write
from clipkd.models.state import load_error_cause

FORMAT = "clipkd-checkpoint"
VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | os.PathLike, state_dict: dict, **extra: Any) -> None:
    """Learnable tensors plus whatever the caller adds (epoch, optimizer, scheduler, metrics)."""
    atomic_save({"format": FORMAT, "version": VERSION, "state_dict": state_dict, **extra}, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A clipkd checkpoint as a dict, or a ModelError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is the file's fault
        cause = "an empty file" if path.stat().st_size == 0 else load_error_cause(exc)
        raise ModelError(f"checkpoint {path} cannot be read ({cause}): it is damaged or not a "
                         f"checkpoint clipkd wrote (clipkd never runs code from one); {_fix(path)}") from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise ModelError(f"checkpoint {path} has no 'state_dict': it is damaged or not a checkpoint clipkd wrote; "
                         f"{_fix(path)}")
    return data


def _fix(path: Path) -> str:
    if path.name == "last.pt":
        return ("put back a good copy, or delete it and rerun with --resume to train the run again from its "
                "first epoch")
    return "put back a good copy, or train the run again"
