"""Create open_clip CLIP models from a name plus a pretrained tag or local weights file, offline-safe.

What this adds over ``open_clip.create_model``:

* OpenAI weights always run with QuickGELU. open_clip builds ``ViT-B-16`` with nn.GELU even for
  ``pretrained='openai'`` and only warns (and says nothing for a local file), which silently costs accuracy.
  Here QuickGELU is forced for the ``openai`` tag (and any tag open_clip marks quick_gelu), for files declared
  OpenAI (``openai_weights=True``), for OpenAI's original TorchScript ``.pt`` archives, and for files whose
  path names OpenAI (e.g. the HF cache folder ``models--timm--vit_base_patch16_clip_224.openai``).
* Failures are :class:`clipkd.errors.ModelError` naming the file or cache and the fix (no network, missing
  file, weights that do not fit the architecture).
* clipkd's test-size architectures (``clipkd-tiny-teacher``, ``clipkd-tiny-student``) are registered.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from clipkd.errors import ModelError

log = logging.getLogger(__name__)

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# A source checkout's configs/models/ (sibling of the package) may hold user-added architectures.
REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".tar", ".ckpt")

_registered = False

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def register_model_configs() -> None:
    """Make clipkd's JSON architectures known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    for folder in (PACKAGE_CONFIG_DIR, REPO_CONFIG_DIR):
        if folder.is_dir() and any(folder.glob("*.json")):
            open_clip.add_model_config(folder)
    _registered = True


def hf_cache_dir() -> str:
    """Where huggingface_hub keeps downloads now (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/...)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
    )
    return os.path.expanduser(os.path.join(home, "hub"))


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """True for TorchScript zip archives (OpenAI's original CLIP ``.pt`` files), not torch.save files."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())
    except OSError:
        return False


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(WEIGHT_SUFFIXES)
    )


def _path_names_openai(path: str) -> bool:
    return any("openai" in part.lower() for part in Path(path).parts)


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Hide open_clip's 'initialized randomly' warning when clipkd loads the weights right after."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    f = _Drop()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _offline_message(name: str, tag: str, err: BaseException, cache_dir: str | None, config_key: str,
                     pretrained_cfg: dict) -> str:
    where = cache_dir or hf_cache_dir()
    url_only = bool(pretrained_cfg.get("url")) and not pretrained_cfg.get("hf_hub")
    if url_only and not cache_dir:
        where = os.path.expanduser(os.path.join("~", ".cache", "clip"))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"cannot fetch pretrained weights '{tag}' for {name} ({first}). Either "
        f"(1) fill the cache on a machine with internet (python -c \"import open_clip; "
        f"open_clip.create_model('{name}', pretrained='{tag}')\"), copy it to this machine's cache at {where} "
        "(Hugging Face cache: HF_HUB_CACHE, or $HF_HOME/hub; default ~/.cache/huggingface/hub) and run with "
        "HF_HUB_OFFLINE=1; or (2) pass a local weights file instead of the tag: "
        f"{config_key} /path/to/file (safetensors, a state dict .pt/.bin, or OpenAI's original TorchScript .pt)"
    )


def _read_weights(path: str, torchscript: bool) -> dict[str, torch.Tensor]:
    """A weights file's state dict: safetensors, torch.save'd (weights_only) or a TorchScript archive."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if torchscript:
        # Code-carrying archive: only ever reached for a file the user named (OpenAI's original .pt).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"weights file {path} holds no state dict (a dict of named tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_weights_file(model: nn.Module, path: str, name: str, torchscript: bool) -> None:
    """Load a weights file into ``model`` strictly, with open_clip's own format conversions."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    from clipkd.models.state import copy_state_strict

    try:
        sd = _read_weights(path, torchscript)
    except ModelError:
        raise
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"weights file {path} is not a plain state dict (it stores Python objects, which clipkd only "
            "loads from OpenAI's TorchScript archives). Convert it once, if you trust it: "
            f"python -c \"import torch; sd = torch.load('{path}', weights_only=False); "
            "sd = sd.get('state_dict', sd); torch.save(sd, 'weights.pt')\""
        ) from e
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for unreadable files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"cannot read weights file {path}: {type(e).__name__}: {first}") from e

    # The conversions open_clip.load_checkpoint applies (third-party layouts, old text layout, resizes).
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        target = getattr(model, key, None)
        if key in sd and target is not None and target.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(target.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    # OpenAI archives carry scalars (input_resolution, ...) and scripted models their non-persistent buffers.
    own = model.state_dict(keep_vars=True)
    transient = {n for n, _ in model.named_buffers()} - set(own)
    for key in ("input_resolution", "context_length", "vocab_size", *transient):
        sd.pop(key, None)
    try:  # other resolution / context length: interpolate like open_clip; misfits are reported below
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
    except (AssertionError, RuntimeError, ValueError):
        pass
    copy_state_strict(
        own, sd, source=f"weights file {path}",
        hint=f"Check that MODEL.*.NAME ({name}) is the architecture these weights were trained for",
    )


def create_clip(
    name: str,
    pretrained: str = "",
    *,
    openai_weights: bool | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    config_key: str = "MODEL.TEACHER.PRETRAINED",
) -> tuple[nn.Module, Tokenizer]:
    """An open_clip CLIP model (eval mode, fp32) and its tokenizer.

    ``pretrained``: an open_clip tag ("openai", "laion2b_s34b_b88k", ...), a local weights file (safetensors,
    a state dict .pt/.bin, a dict with ``state_dict``, or OpenAI's TorchScript .pt), or "" for random init.
    ``openai_weights``: declare a local file's origin; None detects it (TorchScript archive, or "openai" in
    the path). ``config_key`` only names the config key in error messages.
    """
    import open_clip

    register_model_configs()
    name = name.strip()
    pretrained = (pretrained or "").strip()

    if name.startswith(("hf-hub:", "local-dir:")):
        try:
            model = open_clip.create_model(name, force_quick_gelu=bool(openai_weights), device="cpu")
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot create model '{name}': {type(e).__name__}: {e}") from e
        return model.to(device).eval(), tokenizer

    arch = name.replace("/", "-")  # OpenAI spells ViT-B/16
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5)
        raise ModelError(
            f"unknown model architecture '{name}'"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f". Use an open_clip name (open_clip.list_models()) or add an open_clip JSON config to {REPO_CONFIG_DIR}"
        )

    quick_gelu = bool(openai_weights)
    weights_path: str | None = None
    torchscript = False
    if pretrained:
        pcfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if pcfg:
            # OpenAI (and a few other) releases were trained with QuickGELU; never build them with GELU.
            quick_gelu = bool(pcfg.get("quick_gelu")) or pretrained.lower() == "openai" or quick_gelu
            try:
                weights_path = open_clip.pretrained.download_pretrained(pcfg, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001 - network, hub and cache errors all mean "not here"
                raise ModelError(_offline_message(arch, pretrained, e, cache_dir, config_key, pcfg)) from e
            if not weights_path or not os.path.isfile(weights_path):
                raise ModelError(_offline_message(
                    arch, pretrained, FileNotFoundError(weights_path or "no file"), cache_dir, config_key, pcfg))
        else:
            path = os.path.expanduser(pretrained)
            if os.path.isfile(path):
                weights_path = path
                torchscript = is_torchscript_archive(path)
                if openai_weights is None:
                    quick_gelu = torchscript or _path_names_openai(os.path.abspath(path))
                    if not quick_gelu and open_clip.get_pretrained_cfg(arch, "openai") and not arch.endswith(
                        "-quickgelu"
                    ):
                        log.warning(
                            "loading %s into %s with nn.GELU; if these are OpenAI's weights, use the model "
                            "name %s-quickgelu (OpenAI CLIP was trained with QuickGELU)", path, arch, arch)
            elif os.path.isdir(path):
                raise ModelError(
                    f"{config_key} '{pretrained}' is a folder; give the weights file inside it (e.g. "
                    "open_clip_model.safetensors)"
                )
            elif _looks_like_path(pretrained):
                raise ModelError(
                    f"weights file not found: {path} (from {config_key}); check the path, or give an "
                    "open_clip pretrained tag such as 'openai'"
                )
            else:
                tags = open_clip.list_pretrained_tags_by_model(arch)
                raise ModelError(
                    f"'{pretrained}' is neither a pretrained tag of {arch} "
                    f"({', '.join(tags) if tags else 'it has none'}) nor an existing file; fix {config_key}"
                )

    ctx = _no_random_init_warning() if weights_path else contextlib.nullcontext()
    with ctx:
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, device="cpu")
    if weights_path:
        _load_weights_file(model, weights_path, arch, torchscript)
    tokenizer = open_clip.get_tokenizer(arch)
    log.info("built %s (%s, %s)", arch, f"weights {weights_path}" if weights_path else "random init",
             "QuickGELU" if quick_gelu else "GELU")
    return model.to(device).eval(), tokenizer


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the model's MLPs use QuickGELU (what OpenAI weights need)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())
