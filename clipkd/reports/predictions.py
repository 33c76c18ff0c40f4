"""A run's per-image predictions (``predictions.npz``, the format in :mod:`clipkd.rundir`), read back and checked
against the results.json beside it, so that a statistic over images (a paired bootstrap, a calibration curve)
never uses a file that does not hold the predictions behind the run's reported accuracy. Torch-free: numpy only.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from clipkd.errors import ClipkdError
from clipkd.rundir import PER_IMAGE, PREDICTIONS_FILE, PREDICTIONS_FORMAT, RESULTS_FILE, TEACHER_PRED

__all__ = ["PREDICTIONS_FILE", "PredictionsError", "read_predictions"]

HALVES = ("base", "new", "all")
_INTEGER = ("label", "pred", TEACHER_PRED)


class PredictionsError(ClipkdError):
    """A predictions.npz that is missing, unreadable or does not match its results.json."""


def read_predictions(run_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``{half: {name: array}}`` of the prediction file in ``run_dir`` (a run folder or an ``eval/<stem>``
    folder), for each half results.json holds; a PredictionsError (a ClipkdError) naming the file when it is
    missing, unreadable, or does not match results.json (a half's n or accuracy, recomputed exactly as the
    evaluation computes it)."""
    folder = Path(run_dir)
    path, results_path = folder / PREDICTIONS_FILE, folder / RESULTS_FILE
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PredictionsError(f"{path}: cannot check it against {results_path} ({_reason(exc)}); the prediction file "
                          "is only used beside the results.json it was written with") from None
    if not path.is_file():
        raise PredictionsError(f"{path} not found (runs finished by clipkd before per-image predictions have none); "
                          "rerun the run or evaluation to get one")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise _stale(path, f"it cannot be read as a .npz file: {_reason(exc)}") from None
    fmt = arrays.pop("format", None)
    if fmt is None or fmt.shape != () or int(fmt) != PREDICTIONS_FORMAT:
        raise _stale(path, f"its format is {None if fmt is None else fmt.tolist()!r}, not {PREDICTIONS_FORMAT}")
    halves = [h for h in HALVES if isinstance(results.get(h), dict)] if isinstance(results, dict) else []
    out: dict[str, dict[str, np.ndarray]] = {h: {} for h in halves}
    for key, value in arrays.items():
        half, _, name = key.partition(".")
        if half not in out or name not in (*PER_IMAGE, TEACHER_PRED):
            raise _stale(path, f"it holds {key!r}, which {results_path.name} (halves {', '.join(halves)}) does not "
                               "explain")
        out[half][name] = value
    for half in halves:
        _check_half(path, half, out[half], results[half])
    return out


def _check_half(path: Path, half: str, arrays: dict[str, np.ndarray], metrics: dict) -> None:
    missing = [name for name in PER_IMAGE if name not in arrays]
    if missing:
        raise _stale(path, f"the {half} half has no {', '.join(missing)}")
    n = metrics.get("n")
    for name, value in arrays.items():
        if value.ndim != 1 or value.shape[0] != n:
            raise _stale(path, f"{half}.{name} has shape {value.shape}, and results.json's {half} has n = {n}")
        integer = name in _INTEGER
        if integer != np.issubdtype(value.dtype, np.integer) or not (integer or np.isfinite(value).all()):
            raise _stale(path, f"{half}.{name} holds {value.dtype} values"
                               + ("" if integer else " that are not all finite"))
    correct = int((arrays["pred"] == arrays["label"]).sum())
    accuracy = 100.0 * float(correct) / n if n else 0.0  # as the evaluation computes it
    reported = metrics.get("accuracy")
    if isinstance(reported, bool) or not isinstance(reported, (int, float)) or accuracy != reported:  # exactly
        raise _stale(path, f"its {half} accuracy is {accuracy!r}%, and results.json says {reported!r}%")


def _stale(path: Path, what: str) -> PredictionsError:
    return PredictionsError(f"{path} does not hold this run's predictions ({what}); it is not used: delete it, "
                            "or rerun the run or evaluation to write it again")


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
