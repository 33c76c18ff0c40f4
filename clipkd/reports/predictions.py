"""Read a run's per-image predictions (``predictions.npz``, written beside results.json).

Format 1: for each evaluated half H of results.json (base, new or all) the arrays ``H.label``, ``H.pred``
(int32), ``H.prob``, ``H.confidence``, ``H.entropy``, ``H.top5_out`` (float32), optionally ``H.teacher_pred``,
one entry per test image in the half's test-list order, plus ``format``. A file that cannot be read or does not
match results.json (its halves, n or accuracy) is an error naming it: a stale file is never used silently.
Torch-free (numpy only), so reports can read it.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np

from clipkd.errors import ClipkdError
from clipkd.rundir import RESULTS_FILE

PREDICTIONS_FILE = "predictions.npz"
FORMAT = 1
HALVES = ("base", "new", "all")
ARRAYS = ("label", "pred", "prob", "confidence", "entropy", "top5_out")
OPTIONAL_ARRAYS = ("teacher_pred",)


class PredictionsError(ClipkdError):
    """A predictions.npz that is missing, unreadable or does not match its results.json."""


def read_predictions(run_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{half: {name: array}}`` for the halves results.json reports, checked against it."""
    run_dir = Path(run_dir)
    file = run_dir / PREDICTIONS_FILE

    def fail(why: str) -> PredictionsError:
        return PredictionsError(f"{file}: {why}; re-evaluate the run to rewrite it (clipkd eval), or remove it")

    try:
        results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise fail(f"no readable {RESULTS_FILE} beside it to check it against ({type(exc).__name__})") from None
    if not file.is_file():
        raise PredictionsError(f"{file}: no such file (runs evaluated before clipkd wrote per-image predictions "
                               "have none; re-evaluate the run to write it)")
    try:
        with np.load(file, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise fail(f"unreadable ({type(exc).__name__}: {exc})") from None
    fmt = data.get("format")
    if fmt is None or fmt.shape != () or int(fmt) != FORMAT:
        raise fail(f"format {None if fmt is None else fmt.tolist()!r}, expected {FORMAT}")
    halves = [h for h in HALVES if isinstance(results, dict) and isinstance(results.get(h), dict)]
    in_file = sorted({k.split(".", 1)[0] for k in data if "." in k})
    if sorted(halves) != in_file:
        raise fail(f"holds halves {in_file}, but {RESULTS_FILE} reports {sorted(halves)} (stale file)")
    out: dict[str, dict[str, np.ndarray]] = {}
    for half in halves:
        arrays = {}
        for name in ARRAYS + OPTIONAL_ARRAYS:
            key = f"{half}.{name}"
            if key not in data:
                if name in OPTIONAL_ARRAYS:
                    continue
                raise fail(f"no array {key!r}")
            arr = data[key]
            if arr.ndim != 1:
                raise fail(f"{key!r} has shape {arr.shape}, expected one value per image")
            arrays[name] = arr
        n = {a.shape[0] for a in arrays.values()}
        if len(n) != 1:
            raise fail(f"the {half} arrays have different lengths {sorted(n)}")
        count = n.pop()
        for name in ("label", "pred", "teacher_pred"):
            if name in arrays and not np.issubdtype(arrays[name].dtype, np.integer):
                raise fail(f"'{half}.{name}' has dtype {arrays[name].dtype}, expected integers")
        block = results[half]
        if "n" in block and block["n"] != count:
            raise fail(f"{count} {half} images, but {RESULTS_FILE} says n = {block['n']} (stale file)")
        acc = 100.0 * float(np.count_nonzero(arrays["pred"] == arrays["label"])) / count if count else 0.0
        expected = block.get("accuracy")
        if not isinstance(expected, (int, float)) or not math.isclose(acc, expected, rel_tol=0, abs_tol=1e-9):
            raise fail(f"{half} accuracy recomputed from it is {acc!r}, but {RESULTS_FILE} says {expected!r} "
                       "(stale file)")
        out[half] = arrays
    return out
