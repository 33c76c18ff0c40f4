"""Strict state-dict loading and checkpoint reading (clipkd's and Dassl's PromptSRC / PromptKD files, read
without running code from them), with errors a user can act on; and PromptSRC's checkpoint key names, which
clipkd writes too, with what else such a file holds (frozen CLIP weights, class-dependent buffers).

torch's own ``load_state_dict`` messages name neither the file nor the fix, and ``strict=False`` (what the
Dassl trainers use) silently ignores prompts that do not load. Everything here is strict and raises
:class:`clipkd.errors.ModelError` naming the file, the tensors and what to change.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from clipkd.data.specs import get_spec
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


# ------------------------------------------------------------------------------------------------ reading files
#

# ------------------------------------------------------------------------------------------------ PromptSRC keys
# PromptSRC checkpoint keys.
KEY_TEXT_CTX = "prompt_learner.ctx"
KEY_VISION_VPT = "image_encoder.VPT"
KEY_TEXT_SHALLOW = "text_encoder.transformer.resblocks.{}.VPT_shallow"
KEY_VISION_SHALLOW = "image_encoder.transformer.resblocks.{}.VPT_shallow"
# Class-dependent buffers of PromptSRC's prompt learner (PromptKD's adds the ``2`` pair for the new classes):
# rebuilt from the class names, never loaded.
DROPPED_KEYS = frozenset({"prompt_learner.token_prefix", "prompt_learner.token_suffix",
                          "prompt_learner.token_prefix2", "prompt_learner.token_suffix2"})

_SHALLOW_RE = re.compile(r"^(image_encoder|text_encoder)\.transformer\.resblocks\.(\d+)\.VPT_shallow$")


def is_frozen_clip_key(key: str) -> bool:
    """Keys of frozen CLIP weights that Dassl saves along with the prompts (whole-model state dicts).

    PromptSRC/PromptKD save ``model.state_dict()`` of their whole CustomCLIP, so a released
    ``model-best.pth.tar`` also holds the frozen encoders (``image_encoder.*``, ``text_encoder.*``,
    ``logit_scale``) and PromptSRC's frozen zero-shot copy (``prompt_learner.ZS_image_encoder.*``).
    Prompt keys (``*VPT*``, ``prompt_learner.ctx``) are never frozen-CLIP keys.
    """
    if key.endswith("VPT") or key.endswith("VPT_shallow") or key == KEY_TEXT_CTX:
        return False
    return (
        key.startswith(("image_encoder.", "text_encoder.", "prompt_learner.ZS_image_encoder."))
        or key in ("logit_scale", "logit_bias")
    )


def prompt_keys(state_dict: Mapping[str, torch.Tensor], *,
                ignore_frozen_clip_weights: bool = True) -> dict[str, torch.Tensor]:
    """``state_dict`` without the class-dependent buffers (:data:`DROPPED_KEYS`) and, with
    ``ignore_frozen_clip_weights``, without the frozen CLIP weights a whole-model Dassl file carries."""
    return {k: v for k, v in state_dict.items()
            if k not in DROPPED_KEYS and not (ignore_frozen_clip_weights and is_frozen_clip_key(k))}


def _prompt_rows(state_dict: Mapping[str, object], key: str, source: str) -> int:
    """The number of prompt tokens ``state_dict[key]`` holds; a file may hold anything there (a list, a string, a
    scalar), which is named as the model error it is rather than failing on ``.shape``."""
    value = state_dict[key]
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        what = f"a {value.dim()}-d tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise ModelError(f"{source}: '{key}' is {what}, not a tensor of prompts (n_ctx x width); "
                         "the file is damaged or was not written by PromptSRC, PromptKD or clipkd")
    return int(value.shape[0])


def infer_ivlp_sizes(state_dict: Mapping[str, torch.Tensor], *,
                     source: str = "the prompt state dict") -> dict[str, int]:
    """n_ctx and depth of each tower as a PromptSRC-named state dict describes them.

    Depth is 1 + the highest block index with a ``VPT_shallow`` (gaps are caught by the strict loader).
    ``source`` names the state dict in the error about a prompt that is not a 2-d tensor.
    """
    sizes = {"n_ctx_text": 0, "depth_text": 0, "n_ctx_vision": 0, "depth_vision": 0}
    if KEY_TEXT_CTX in state_dict:
        sizes["n_ctx_text"] = _prompt_rows(state_dict, KEY_TEXT_CTX, source)
        sizes["depth_text"] = 1
    if KEY_VISION_VPT in state_dict:
        sizes["n_ctx_vision"] = _prompt_rows(state_dict, KEY_VISION_VPT, source)
        sizes["depth_vision"] = 1
    for key in state_dict:
        m = _SHALLOW_RE.match(key)
        if m:
            tower = "vision" if m.group(1) == "image_encoder" else "text"
            sizes[f"depth_{tower}"] = max(sizes[f"depth_{tower}"], int(m.group(2)) + 1)
    return sizes


# Dassl (PromptSRC / PromptKD) checkpoints are ``torch.save({"state_dict", "epoch", "optimizer", "scheduler",
# "val_result"})``. Next to the tensors they pickle Python objects: the SGD momentum state sits in a
# ``collections.defaultdict`` and the warm-up scheduler's state holds a whole ``CosineAnnealingLR`` object (which
# holds the ``SGD`` object). ``torch.load(weights_only=True)`` refuses both, and ``weights_only=False`` would
# import and run whatever the file names. clipkd does neither: it lists the globals the pickle names (by reading
# its opcodes, importing nothing), then unpickles with torch's weights-only unpickler, with each of those names
# bound to an inert stand-in. The stand-ins are created here and never look the name up, so the pickled
# classes are not imported, and no ``__init__``/``__setstate__``/``__reduce__`` of theirs runs. Only the
# tensors of ``state_dict`` are used.


def _plain_dict(*_args: object) -> dict:
    """Stands in for ``collections.defaultdict``: a plain dict (the unpickler only fills plain dicts)."""
    return {}


# Globals that are plain containers, bound to themselves (or, for defaultdict, a plain dict).
_CONTAINER_GLOBALS: dict[str, object] = {
    "builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple, "builtins.set": set,
    "builtins.frozenset": frozenset, "collections.OrderedDict": OrderedDict,
    "collections.defaultdict": _plain_dict,
}


def _inert_stand_in(qualified_name: str) -> type:
    """A do-nothing class standing in for a global that weights_only loading does not allow.

    Calling it, creating it with ``__new__`` and building it from state only store what it was given.
    """

    class Unloaded:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.__dict__["_args"] = args

        def __setstate__(self, state: object) -> None:
            self.__dict__["_state"] = state

        def __repr__(self) -> str:
            return f"<not loaded: {qualified_name}>"

    Unloaded.__qualname__ = Unloaded.__name__ = qualified_name.rsplit(".", 1)[-1]
    Unloaded.__module__ = __name__
    return Unloaded


def _load_tolerant(path: str | os.PathLike[str]) -> object:
    """``torch.load(weights_only=True)`` that also opens Dassl checkpoints, executing nothing from the file.

    Plain files load as they are. Otherwise every global the file names that torch does not allow is bound to
    an inert stand-in (containers to themselves, ``defaultdict`` to a plain dict): see the comment above.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        scope = getattr(torch.serialization, "safe_globals", None)
        if finder is None or scope is None:  # torch < 2.5
            raise pickle.UnpicklingError(
                "this file pickles Python objects (e.g. a Dassl optimizer/scheduler); reading only its tensors "
                f"needs torch >= 2.5 (this is {torch.__version__})") from None
        names = finder(path)  # reads the pickle's opcodes; imports nothing
    pairs = [(_CONTAINER_GLOBALS.get(n) or _inert_stand_in(n), n) for n in names]
    with scope(pairs):
        return torch.load(path, map_location="cpu", weights_only=True)


# Torch's advice in its loading errors (retry with weights_only=False, allow-list the file's globals): both would
# run code the file names, so clipkd never passes them on.
_UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|allowlist|trust", re.IGNORECASE)


def load_error_cause(exc: BaseException) -> str:
    """What went wrong reading a file, as ``Type: first sentence`` of torch's informative line (its weights-only
    errors start with a generic paragraph), never torch's advice to load it unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((x for x in lines if "GLOBAL" in x or x.startswith(("Can only", "Unsupported", "Trying to"))),
                lines[0] if lines else "")
    sentence = re.split(r"\.\s", line.removeprefix("WeightsUnpickler error:").strip(), maxsplit=1)[0].rstrip(".")
    if not sentence or _UNSAFE_ADVICE.search(sentence):
        return type(exc).__name__
    return f"{type(exc).__name__}: {sentence}"


def read_state_dict(path: str | os.PathLike[str], *, what: str = "checkpoint",
                    hint: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a clipkd or Dassl (PromptSRC / PromptKD) checkpoint file, read without running code.

    Accepts a dict with a ``state_dict`` entry (clipkd's ``model.pt``, Dassl's ``model-best.pth.tar`` /
    ``model.pth.tar-N``) or a bare state dict; a leading ``module.`` (DataParallel) is stripped. Everything
    else in the file (optimizer, scheduler, metrics) is skipped. ``what`` names the file in errors.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ModelError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    try:
        obj = _load_tolerant(path)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        raise ModelError(
            f"cannot read {what} {path}: {load_error_cause(e)}. clipkd reads tensors and plain "
            "containers only and never runs code from a checkpoint; if the file is truncated, copy it again, "
            "or save just its state dict as {'state_dict': ...} with the tool that wrote it"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ModelError(f"{what} {path} holds no state dict (expected a dict of named tensors)")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_prompt_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a prompt checkpoint (MODEL.TEACHER.CHECKPOINT), see :func:`read_state_dict`."""
    return read_state_dict(
        path, what="prompt checkpoint",
        hint="set MODEL.TEACHER.CHECKPOINT to a clipkd ivlp run's checkpoint or a PromptKD/PromptSRC "
        "model-best.pth.tar (or a folder holding one)")


# ------------------------------------------------------------------------------------------------ finding files
CLIPKD_MODEL_FILE = "model.pt"  # a clipkd run folder's final model
DASSL_MODEL_DIR = "VLPromptLearner"  # Dassl's per-model folder in PromptSRC / PromptKD output
COOP_MODEL_DIR = "prompt_learner"  # CoOp's / KgCoOp's (their trainers register the prompt learner alone)
DASSL_BEST_FILE = "model-best.pth.tar"
_DASSL_EPOCH_RE = re.compile(r"^model\.pth\.tar-(\d+)$")


def _dataset_folder_names(dataset: str | None) -> list[str]:
    """Folder names a dataset may have in PromptKD's teacher layout: Dassl's name first, then clipkd's stem."""
    if not dataset:
        return []
    try:
        spec = get_spec(dataset)
        names = [spec.name, spec.stem, dataset]
    except Exception:  # noqa: BLE001 - an unknown name is looked for as given
        names = [dataset]
    return list(dict.fromkeys(names))


def _model_file_in(folder: Path, looked: list[str]) -> Path | None:
    """clipkd's ``model.pt``, else Dassl's ``model-best.pth.tar``, else its highest ``model.pth.tar-N``."""
    looked.append(str(folder / f"{{{CLIPKD_MODEL_FILE},{DASSL_BEST_FILE},model.pth.tar-N}}"))
    if not folder.is_dir():
        return None
    for name in (CLIPKD_MODEL_FILE, DASSL_BEST_FILE):
        if (folder / name).is_file():
            return folder / name
    epochs = [(int(m.group(1)), f) for f in folder.iterdir()
              if (m := _DASSL_EPOCH_RE.match(f.name)) and f.is_file()]
    return max(epochs)[1] if epochs else None


def resolve_checkpoint_file(path: str | os.PathLike[str], *, dataset: str | None = None,
                            key: str = "MODEL.TEACHER.CHECKPOINT", per_dataset: bool = True) -> Path:
    """The checkpoint file that ``path`` names: the file itself, or in a folder, the first of

    * ``path/model.pt`` (a clipkd run folder), ``path/model-best.pth.tar``, the highest ``path/model.pth.tar-N``
      (a Dassl model folder such as ``.../VLPromptLearner``),
    * the same inside ``path/VLPromptLearner`` (a Dassl output folder), then ``path/prompt_learner`` (CoOp's),
    * the same inside ``path/<dataset>/VLPromptLearner`` (PromptKD's released teachers, ``teacher_model/``;
      ``<dataset>`` is Dassl's name of ``dataset``, e.g. OxfordPets, or clipkd's stem).

    A ModelError lists every place looked at when nothing fits. ``key`` names the setting in errors;
    ``per_dataset`` False (a student file) skips PromptKD's per-dataset teacher layout.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_file():
        return p
    if not p.exists():
        raise ModelError(f"{key}: {p} not found")
    if not p.is_dir():
        raise ModelError(f"{key}: {p} is neither a file nor a folder")
    looked: list[str] = []
    folders = [p, p / DASSL_MODEL_DIR, p / COOP_MODEL_DIR,
               *(p / name / DASSL_MODEL_DIR for name in _dataset_folder_names(dataset))]
    for folder in folders:
        found = _model_file_in(folder, looked)
        if found is not None:
            return found
    more = ("" if dataset or not per_dataset
            else " (DATASET.NAME is empty, so no <DatasetName>/VLPromptLearner was tried)")
    empty = " (it is empty)" if not any(p.iterdir()) else ""
    raise ModelError(f"{key}: the folder {p} holds no checkpoint{empty}{more}; looked for: " + "; ".join(looked))
