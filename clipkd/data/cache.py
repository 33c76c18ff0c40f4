"""A readable cache of few-shot draws.

Dassl pickles draws next to the data with absolute paths; clipkd writes JSON with paths relative to the
dataset folder, in a cache folder of its own (so read-only data roots work), keyed by K, seed and a hash of
the parsed split, so a changed split file never serves a stale draw. Deleting the folder is always safe.

Location: ``$CLIPKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipkd``, else ``~/.cache/clipkd``; draws live in
``<cache>/fewshot/<stem>/shot_<K>-seed_<S>-<hash>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Sequence

from clipkd.data.records import Datum
from clipkd.fileio import atomic_write_text

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """Where clipkd keeps caches unless told otherwise."""
    if os.environ.get("CLIPKD_CACHE_DIR"):
        return Path(os.environ["CLIPKD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipkd"


def split_digest(*lists: Sequence[Datum]) -> str:
    """A hash of the parsed lists (paths, labels, class names, order): any change gives a new key."""
    h = hashlib.sha256()
    for items in lists:
        h.update(b"\x00list\x00")
        for d in items:
            h.update(f"{d.relpath}\x01{d.label}\x01{d.classname}\x02".encode())
    return h.hexdigest()


def draw_path(cache_dir: Path, stem: str, shots: int, seed: int, digest: str) -> Path:
    return cache_dir / "fewshot" / stem / f"shot_{shots}-seed_{seed}-{digest[:16]}.json"


def load_draw(
    path: Path, digest: str, train: Sequence[Datum], val: Sequence[Datum]
) -> tuple[list[Datum], list[Datum]] | None:
    """The cached draw from the full ``train``/``val`` lists, or None when absent, unreadable or stale."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or data.get("split_sha256") != digest:
        return None
    out = []
    for key, full in (("train", train), ("val", val)):
        lookup = {d.relpath: d for d in full}
        try:
            items = [lookup[rel] for rel, _ in data[key]]
            labels = [label for _, label in data[key]]
        except (KeyError, TypeError, ValueError):
            return None
        if [d.label for d in items] != labels:
            return None
        out.append(items)
    return out[0], out[1]


def save_draw(
    path: Path, digest: str, stem: str, shots: int, seed: int, train: list[Datum], val: list[Datum]
) -> None:
    """Write atomically (temp file + rename) so an interrupted run never leaves a half-written draw."""
    payload = {
        "version": FORMAT_VERSION,
        "dataset": stem,
        "shots": shots,
        "seed": seed,
        "split_sha256": digest,
        "train": [[d.relpath, d.label] for d in train],
        "val": [[d.relpath, d.label] for d in val],
    }
    atomic_write_text(path, json.dumps(payload, indent=0))


def cached_draw(cache_dir: str | os.PathLike | None | bool, stem: str, shots: int, seed: int,
                train: Sequence[Datum], val: Sequence[Datum],
                draw: Callable[[], tuple[list[Datum], list[Datum]]]) -> tuple[list[Datum], list[Datum]]:
    """The K-shot draw of ``shots`` and ``seed`` from the full ``train``/``val`` lists: read from the cache when
    it holds one for these lists, else ``draw()`` and cached (a cache that cannot be written only warns).
    ``cache_dir``: None (or True) = :func:`default_cache_dir`, False = no cache, else a folder."""
    digest = split_digest(train, val)
    path = None
    if cache_dir is not False:
        base = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)  # type: ignore[arg-type]
        path = draw_path(base, stem, shots, seed, digest)
    drawn = load_draw(path, digest, train, val) if path is not None else None
    if drawn is None:
        drawn = draw()
        if path is not None:
            try:
                save_draw(path, digest, stem, shots, seed, *drawn)
            except OSError as exc:  # a read-only cache must not stop a run
                warnings.warn(f"could not cache the few-shot draw at {path}: {exc}", stacklevel=3)
    return drawn
