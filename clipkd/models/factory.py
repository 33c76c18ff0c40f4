"""Create open_clip CLIP models from a name plus a pretrained tag or local weights file, offline-safe.

What this adds over ``open_clip.create_model``:

* QuickGELU is declared, never guessed. A model runs with QuickGELU (what OpenAI's CLIP was trained with)
  when (a) its name ends in ``-quickgelu`` (open_clip's own configs, e.g. ``ViT-B-16-quickgelu``, set it),
  (b) the pretrained tag is ``openai`` or open_clip's config of the tag says ``quick_gelu``, (c) the weights
  file is OpenAI's original TorchScript archive (recognised by its content, :func:`is_torchscript_archive`),
  or (d) the caller says so: ``create_clip(..., quick_gelu=True)``, from ``MODEL.TEACHER.QUICK_GELU`` /
  ``MODEL.STUDENT.QUICK_GELU``. Otherwise it runs with nn.GELU, whatever the file's path says. A local file
  loaded into a GELU architecture that OpenAI released weights for gets a warning (logger
  ``clipkd.models.factory``) saying how to switch QuickGELU on if these are OpenAI's weights.
* Weights files are loaded strictly by open_clip's own ``load_checkpoint`` (``weights_only=True``: data,
  never pickled code). Only OpenAI's TorchScript archives, which that function cannot read safely, are read
  here, with ``torch.jit.load``.
* Failures are :class:`clipkd.errors.ModelError` naming the file or cache and the fix (no network, missing
  file, a folder, an unknown tag or architecture, pickled objects, weights that do not fit the architecture).
* open_clip's "No pretrained weights loaded ... initialized randomly" notice is kept out when random weights
  were asked for (``pretrained=""``) or clipkd loads the weights right after building.
* clipkd's test-size architectures (``clipkd-tiny-teacher``, ``clipkd-tiny-student``) are registered.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import operator
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from clipkd.errors import ModelError
from clipkd.models.state import key_list, state_misfits

log = logging.getLogger(__name__)

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
# A source checkout's configs/models/ (sibling of the package) may hold user-added architectures.
REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".tar", ".ckpt")

# What open_clip.create_model logs (through the root logger, open_clip 3.x) when it loaded no weights.
_RANDOM_INIT_NOTICES = ("No pretrained weights loaded", "initialized randomly")
# Keys OpenAI's TorchScript archives carry besides the weights (open_clip drops the same ones).
_OPENAI_ARCHIVE_SCALARS = ("input_resolution", "context_length", "vocab_size")
_MAX_SHAPES_SHOWN = 5

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


def image_size(clip_model: nn.Module) -> tuple[int, int]:
    """The (height, width) of the images the model's visual tower expects (open_clip's ``visual.image_size``).

    Accepts a CLIP model or its visual tower; a square size given as one int comes back as ``(n, n)``.
    """
    visual = getattr(clip_model, "visual", clip_model)
    size = getattr(visual, "image_size", None)
    try:
        if isinstance(size, bool):
            raise TypeError
        if isinstance(size, Sequence):
            height, width = size
        else:
            height = width = size
        return (operator.index(height), operator.index(width))
    except (TypeError, ValueError):
        raise ModelError(
            f"cannot tell the input size of {type(clip_model).__name__}: its visual tower "
            f"({type(visual).__name__}) has no image_size of the form n or (height, width) (got {size!r})"
        ) from None


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the model's MLPs use QuickGELU (what OpenAI weights need)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(WEIGHT_SUFFIXES)
    )


def _sibling_key(config_key: str, leaf: str) -> str:
    """``MODEL.TEACHER.PRETRAINED`` -> ``MODEL.TEACHER.<leaf>`` (for messages)."""
    return f"{config_key.rsplit('.', 1)[0]}.{leaf}" if "." in config_key else leaf


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


@contextlib.contextmanager
def _no_random_init_notice() -> Iterator[None]:
    """Drop open_clip's 'No pretrained weights loaded ... initialized randomly' record during the block.

    Only records created by open_clip's own modules with that text are dropped, and only while the block runs;
    the global logging configuration is not touched. open_clip 3.x logs through the root logger; its own
    loggers are covered too in case a release switches to them (a logger's filters only see its own records).
    """
    import open_clip

    package_dir = os.path.dirname(os.path.abspath(open_clip.__file__))

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not os.path.abspath(record.pathname).startswith(package_dir + os.sep):
                return True
            message = record.getMessage()
            return not any(notice in message for notice in _RANDOM_INIT_NOTICES)

    drop = _Drop()
    loggers = [logging.getLogger(), logging.getLogger("open_clip"), logging.getLogger("open_clip.factory")]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


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


# ------------------------------------------------------------------------------------------------ loading


def _torch_defaults_to_weights_only() -> bool:
    major, minor = (int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return (major, minor) >= (2, 6)


def _read_torchscript(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, read by torch.jit.load (which unpickles no Python objects)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return dict(torch.jit.load(path, map_location="cpu").state_dict())


def _without_extras(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` less OpenAI's archive scalars and the non-persistent buffers a scripted model saves."""
    own = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - set(own)
    return {k: v for k, v in sd.items() if k not in transient and k not in _OPENAI_ARCHIVE_SCALARS}


def _load_torchscript(model: nn.Module, path: str) -> None:
    """Load an OpenAI TorchScript archive into ``model`` strictly.

    Why not ``open_clip.load_checkpoint``: (1) torch.load refuses TorchScript archives with
    ``weights_only=True``, and ``weights_only=False`` would unpickle arbitrary Python objects from any file
    that is not one, so it is not a switch to flip on a guess; torch.jit.load reads the archive without
    Python unpickling. (2) Archives of scripted open_clip models also hold non-persistent buffers
    (``attn_mask``) that open_clip's strict load rejects.
    """
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    sd = _without_extras(model, _read_torchscript(path))
    try:  # another resolution / context length: interpolate as open_clip does; misfits are reported below
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
    except (AssertionError, RuntimeError, ValueError):
        pass
    model.load_state_dict(sd, strict=True)


def _unpickling_error(path: str, err: pickle.UnpicklingError) -> ModelError:
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found or "global" in text.lower():
        what = f" ({found.group(1)})" if found else ""
        return ModelError(
            f"weights file {path} is not a plain state dict: it stores Python objects{what}, which clipkd does "
            "not unpickle (only OpenAI's TorchScript archives may carry code). Convert it once, if you trust it: "
            f"python -c \"import torch; sd = torch.load('{path}', weights_only=False); "
            "sd = sd.get('state_dict', sd); torch.save(sd, 'weights.pt')\""
        )
    # torch's own first line suggests weights_only=False, which would not help here: quote the cause instead.
    cause = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return ModelError(
        f"cannot read weights file {path}: it is not a file torch.load reads"
        + (f" ({cause.group(1).strip()})" if cause else "")
        + "; give safetensors, a torch.save'd state dict, or OpenAI's original TorchScript .pt"
    )


def _load_failure(model: nn.Module, path: str, arch: str, torchscript: bool, err: BaseException,
                  hint: str) -> ModelError:
    """Explain why loading ``path`` failed: unreadable, no state dict, or which tensors do not fit."""
    from open_clip.convert import convert_state_dict
    from open_clip.factory import load_state_dict

    # The file is read again (only on failure) to name the tensors at fault: open_clip's loader reports
    # misfits as torch's unbounded key lists, or as an assertion from its position-embedding resizing.
    try:
        sd = _read_torchscript(path) if torchscript else load_state_dict(path, device="cpu", weights_only=True)
    except (AttributeError, StopIteration):  # open_clip's reader found no non-empty dict
        sd = None
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types for unreadable files
        return ModelError(f"cannot read weights file {path}: {type(e).__name__}: {_first_line(e)}")
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = f" (its top-level keys: {key_list([str(k) for k in sd])})" if isinstance(sd, Mapping) else ""
        return ModelError(
            f"weights file {path} holds no state dict (a dict of named tensors, possibly under 'state_dict')"
            f"{keys}; re-save the model's state dict"
        )
    with contextlib.suppress(Exception):
        sd = convert_state_dict(model, dict(sd))  # third-party layouts, as load_checkpoint converts them
    problems = state_misfits(model.state_dict(), _without_extras(model, sd) if torchscript else sd,
                             source="the file", max_shapes=_MAX_SHAPES_SHOWN)
    if problems:
        return ModelError(f"weights file {path} does not fit the model {arch}: {'; '.join(problems)}. {hint}")
    detail = " ".join(str(err).split())
    detail = detail if len(detail) <= 500 else detail[:500] + " ..."
    return ModelError(f"cannot load weights file {path} into {arch}: {type(err).__name__}: {detail}. {hint}")


def _load_weights(model: nn.Module, path: str, arch: str, *, torchscript: bool, name_key: str) -> None:
    """Load the weights file at ``path`` into ``model`` strictly (open_clip's loader, weights_only)."""
    import open_clip

    hint = f"Check that {name_key} ({arch}) is the architecture these weights were trained for"
    try:
        if torchscript:
            _load_torchscript(model, path)
            return
        if not path.endswith(".safetensors") and not _torch_defaults_to_weights_only():
            # open_clip's load_state_dict retries torch.load *without* weights_only when it raises TypeError.
            # From torch 2.6 that retry is weights_only too (the default); before, it would unpickle arbitrary
            # objects. So on older torch, read weights_only first: if that works, open_clip's first try (and
            # the re-read in _load_failure) does too, and the retry never runs.
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise
            except Exception as e:  # noqa: BLE001 - not to be handed to open_clip's unsafe retry
                raise ModelError(f"cannot read weights file {path}: {type(e).__name__}: {_first_line(e)}") from e
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True, device="cpu")
        return
    except ModelError:
        raise
    except pickle.UnpicklingError as e:  # weights_only refused the file
        raise _unpickling_error(path, e) from e
    except Exception as e:  # noqa: BLE001 - unreadable file, or weights that do not fit: sorted out below
        failure = e
    raise _load_failure(model, path, arch, torchscript, failure, hint) from failure


# ------------------------------------------------------------------------------------------------ models


def create_clip(
    name: str,
    pretrained: str = "",
    *,
    quick_gelu: bool = False,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    config_key: str = "MODEL.TEACHER.PRETRAINED",
) -> tuple[nn.Module, Tokenizer]:
    """An open_clip CLIP model (eval mode, fp32) and its tokenizer.

    ``pretrained``: an open_clip tag ("openai", "laion2b_s34b_b88k", ...), a local weights file (safetensors,
    a state dict .pt/.bin, a dict with ``state_dict``, or OpenAI's TorchScript .pt), or "" for random init.
    ``quick_gelu``: build with QuickGELU (set it for OpenAI-trained weights in a local file). It is also on,
    whatever this says, for a ``-quickgelu`` name, the ``openai`` tag (or any tag open_clip marks
    quick_gelu) and a TorchScript archive. ``config_key`` only names the config keys in messages.
    """
    import open_clip

    register_model_configs()
    name = name.strip()
    pretrained = (pretrained or "").strip()
    declared = bool(quick_gelu)
    gelu_key = _sibling_key(config_key, "QUICK_GELU")

    if name.startswith(("hf-hub:", "local-dir:")):
        # open_clip reads these configs (quick_gelu included) and weights itself.
        try:
            model = open_clip.create_model(name, force_quick_gelu=declared, device="cpu")
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

    # (a) open_clip's -quickgelu configs (and any config that says quick_gelu) build QuickGELU by themselves.
    arch_quick = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu")) or arch.endswith("-quickgelu")
    use_quick = declared or arch_quick  # (d) declared by the caller
    weights_path: str | None = None
    local_file = False
    if pretrained:
        pcfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if pcfg:
            # (b) OpenAI (and a few other) releases were trained with QuickGELU; never build them with GELU.
            tag_quick = bool(pcfg.get("quick_gelu")) or pretrained.lower() == "openai"
            if declared and not tag_quick and not arch_quick:
                log.warning("%s is True but open_clip's '%s' weights of %s were trained with nn.GELU; building "
                            "with QuickGELU anyway, as declared", gelu_key, pretrained, arch)
            use_quick = use_quick or tag_quick
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
                weights_path, local_file = path, True
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

    # (c) OpenAI's original TorchScript archives, recognised by their content (never by their path).
    torchscript = bool(weights_path) and is_torchscript_archive(weights_path)
    use_quick = use_quick or torchscript
    if local_file and not use_quick and open_clip.get_pretrained_cfg(arch, "openai"):
        log.warning(
            "loading %s into %s with nn.GELU. If these are OpenAI's weights (trained with QuickGELU), set %s "
            "True or use the model name %s-quickgelu", weights_path, arch, gelu_key, arch)

    # Random weights were asked for, or clipkd loads the weights right after: open_clip's notice would mislead.
    quiet = not pretrained or weights_path is not None
    with _no_random_init_notice() if quiet else contextlib.nullcontext():
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=use_quick, device="cpu")
    if weights_path:
        _load_weights(model, weights_path, arch, torchscript=torchscript,
                      name_key=_sibling_key(config_key, "NAME"))
    tokenizer = open_clip.get_tokenizer(arch)
    log.debug("built %s (%s, %s)", arch, f"weights {weights_path}" if weights_path else "random init",
             "QuickGELU" if use_quick else "GELU")
    return model.to(device).eval(), tokenizer
