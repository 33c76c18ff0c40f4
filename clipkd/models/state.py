"""Strict state-dict loading and prompt-checkpoint reading, with errors a user can act on.

torch's own ``load_state_dict`` messages name neither the file nor the fix, and ``strict=False`` (what the
Dassl trainers use) silently ignores prompts that do not load. Everything here is strict and raises
:class:`clipkd.errors.ModelError` naming the file, the tensors and what to change.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict, defaultdict
from collections.abc import Mapping

import torch

from clipkd.errors import ModelError

# Shown at most this many keys per list in an error message.
_MAX_KEYS_SHOWN = 12


def key_list(keys: list[str]) -> str:
    """At most a dozen keys, then how many more."""
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


def state_misfits(targets: Mapping[str, torch.Tensor], state_dict: Mapping[str, object], *, source: str,
                  max_shapes: int | None = None) -> list[str]:
    """Every way ``state_dict`` does not fit ``targets``: missing and unexpected keys, then non-tensors and
    shape mismatches (at most ``max_shapes`` of those, then a count)."""
    missing = [k for k in targets if k not in state_dict]
    unexpected = [k for k in state_dict if k not in targets]
    problems = []
    if missing:
        problems.append(f"missing keys: {key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {key_list(unexpected)}")
    shapes = []
    for name, target in targets.items():
        if name not in state_dict:
            continue
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            shapes.append(f"'{name}' is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(target.shape):
            shapes.append(f"tensor '{name}' has shape {tuple(value.shape)} in {source} but the model expects "
                          f"{tuple(target.shape)}")
    if max_shapes is not None and len(shapes) > max_shapes:
        shapes = [*shapes[:max_shapes], f"{len(shapes) - max_shapes} more tensors differ in shape"]
    return problems + shapes


def copy_state_strict(
    targets: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    hint: str = "",
) -> None:
    """Copy ``state_dict`` into the ``targets`` tensors (same names), all or nothing.

    Every problem is collected first (missing keys, unexpected keys, shape mismatches) so the user sees the
    whole picture in one message; nothing is modified unless everything fits. Values are cast to the
    target's dtype and device, so fp16 checkpoints and GPU models load alike.
    """
    problems = state_misfits(targets, state_dict, source=source)
    if problems:
        msg = f"{source} does not fit the model: " + "; ".join(problems)
        raise ModelError(msg + (f". {hint}" if hint else ""))
    with torch.no_grad():
        for name, target in targets.items():
            # In-place copy under no_grad bumps the tensor's version counter, which caches key on.
            target.copy_(state_dict[name])


# Globals a checkpoint may use that are plain containers: loaded as themselves, never stubbed.
_CONTAINER_GLOBALS = {"builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple,
                      "builtins.set": set, "collections.OrderedDict": OrderedDict,
                      "collections.defaultdict": defaultdict}


def _inert_stand_in(qualified_name: str) -> type:
    """A do-nothing class standing in for a global that weights_only loading does not allow."""

    class Unloaded:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __setstate__(self, state: object) -> None:
            self.__dict__["_state"] = state

        def __repr__(self) -> str:
            return f"<not loaded: {qualified_name}>"

    Unloaded.__qualname__ = Unloaded.__name__ = qualified_name.rsplit(".", 1)[-1]
    return Unloaded


def _load_tolerant(path: str) -> object:
    """``torch.load(weights_only=True)`` that also opens Dassl checkpoints.

    Dassl saves the optimizer and LR-scheduler objects next to the state dict (its warmup scheduler pickles
    a whole CosineAnnealingLR with its optimizer), which weights_only refuses and which would otherwise need
    Dassl installed plus full unpickling. Those globals are replaced by inert stand-ins: they execute
    nothing, and only the tensors of ``state_dict`` are used.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if finder is None:  # torch < 2.5
            raise
        names = finder(path)
    pairs = [(_CONTAINER_GLOBALS.get(n) or _inert_stand_in(n), n) for n in names]
    with torch.serialization.safe_globals(pairs):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_prompt_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a clipkd or Dassl (PromptSRC / PromptKD) checkpoint file.

    Loaded with ``weights_only=True``: a checkpoint is data, and a prompt checkpoint never needs code to
    load (Dassl's pickled optimizer/scheduler objects are skipped, see :func:`_load_tolerant`). Accepts a
    dict with a ``state_dict`` entry (clipkd, Dassl ``model-best.pth.tar``) or a bare state dict; a leading
    ``module.`` (DataParallel) is stripped.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ModelError(
            f"prompt checkpoint not found: {path}; set MODEL.TEACHER.CHECKPOINT to a clipkd ivlp run's "
            "checkpoint or a PromptKD/PromptSRC model-best.pth.tar"
        )
    try:
        obj = _load_tolerant(path)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(
            f"cannot read prompt checkpoint {path}: {type(e).__name__}: {first}. "
            "If it is a trusted file, re-save just its state dict once: "
            f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save({{'state_dict': c['state_dict']}}, '{path}.clean.pth')\""
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ModelError(f"prompt checkpoint {path} holds no state dict (expected a dict of named tensors)")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
