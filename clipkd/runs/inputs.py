"""What a run read, recorded when it starts (``inputs.json``) and compared when it is resumed or re-evaluated.

A run's config names its inputs by absolute path (:func:`clipkd.config.merge.absolute_paths`), but the files
there can change: a dataset re-downloaded or re-split, a teacher retrained into the same folder. The record is
cheap and honest:

* the dataset: per list the run reads (each half's train / val / test, the transductive train list), the number
  of classes and images and a SHA-256 over the class names, image names, labels and image file sizes (the
  image bytes themselves are not read: an image rewritten with the same size goes unnoticed);
* each weight file the config names (``MODEL.TEACHER.CHECKPOINT``, a local ``MODEL.*.PRETRAINED``) and KDPL-CA's
  ``KDPL.DICTIONARY``: its size, modification time and, up to :data:`HASH_LIMIT` bytes, its SHA-256 (then an
  identical copy is the same file).

A difference is one error naming the key, the path, what differs and the fix. A run without the record (written
by an older clipkd) is not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from clipkd.config.defaults import ZERO_SHOT
from clipkd.errors import DataError, ModelError
from clipkd.models.teacher import resolve_teacher_checkpoint

if TYPE_CHECKING:
    from yacs.config import CfgNode

    from clipkd.data.splits import ResolvedSplit
    from clipkd.data.rundata import RunData

HASH_LIMIT = 64 * 2**20  # weight files up to this size are hashed (~0.1 s at most; a prompt checkpoint: ms)
LISTS = ("train", "val", "test")


def _list_record(split: ResolvedSplit) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(split.classnames).encode())
    for name in LISTS:
        items = getattr(split, name)
        for item, path in zip(items, split.impaths(items)):
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            digest.update(f"{name}\0{item.relpath}\0{item.label}\0{size}\n".encode())
    return {"classes": len(split.classnames), **{name: len(getattr(split, name)) for name in LISTS},
            "sha256": digest.hexdigest()}


def _data_lists(data: RunData) -> dict[str, ResolvedSplit]:
    lists = dict(data.halves)
    if all(data.train is not split for split in lists.values()):
        lists["train"] = data.train  # the transductive train list over all classes
    return lists


def _file_record(path: Path) -> dict[str, Any]:
    st = path.stat()
    record: dict[str, Any] = {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if st.st_size <= HASH_LIMIT:
        record["sha256"] = _sha256(path)
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weight_files(cfg: CfgNode, teacher: bool) -> dict[str, Path | None]:
    """Config key -> the file it names now (None when it names none any more)."""
    files: dict[str, Path | None] = {}
    if teacher and cfg.MODEL.TEACHER.CHECKPOINT not in ("", ZERO_SHOT):
        try:
            files["MODEL.TEACHER.CHECKPOINT"] = resolve_teacher_checkpoint(cfg)
        except ModelError:
            files["MODEL.TEACHER.CHECKPOINT"] = None
    for key, value in (("MODEL.TEACHER.PRETRAINED", cfg.MODEL.TEACHER.PRETRAINED),
                       ("MODEL.STUDENT.PRETRAINED", cfg.MODEL.STUDENT.PRETRAINED)):
        if os.path.isabs(value):  # a local file (clipkd.config.merge made it absolute), not an open_clip tag
            files[key] = Path(value) if os.path.isfile(value) else None
    if teacher and cfg.DISTILL.CLASS_AGNOSTIC and cfg.KDPL.DICTIONARY:  # KDPL-CA's training class names
        files["KDPL.DICTIONARY"] = Path(cfg.KDPL.DICTIONARY) if os.path.isfile(cfg.KDPL.DICTIONARY) else None
    return files


def record_inputs(cfg: CfgNode, data: RunData, teacher: bool) -> dict[str, Any]:
    """The record of a run about to start (``teacher``: whether it builds its teacher). The lists' record (a
    stat of every image) is made once per ``data``: the cells of a fused group, which share their lists, each
    write it without reading every image again."""
    lists = data.derived.get("inputs_lists")
    if lists is None:
        lists = data.derived["inputs_lists"] = {name: _list_record(split) for name, split in _data_lists(data).items()}
    return {"DATASET.ROOT": {"path": cfg.DATASET.ROOT, "lists": lists},
            **{key: _file_record(path) for key, path in _weight_files(cfg, teacher).items() if path is not None}}


def read_record(path: Path) -> dict[str, Any] | None:
    """The record in ``path``, None when there is none (a run written by an older clipkd)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is damaged ({type(exc).__name__}); delete it to skip the check of the run's "
                        "inputs") from None
    if not isinstance(saved, dict):
        raise DataError(f"{path} is not a record of a run's inputs; delete it to skip the check")
    return saved


def check_inputs(saved: dict[str, Any], cfg: CfgNode, data: Callable[[], RunData] | None, teacher: bool,
                 run: str) -> None:
    """Raise when what ``cfg`` names now is not what the run in ``run`` recorded in ``saved``; ``data`` gives
    the run's lists (read only when the root is there). ``data`` None skips the dataset (an evaluation on
    another dataset)."""
    if data is not None and "DATASET.ROOT" in saved and not os.path.isdir(cfg.DATASET.ROOT):
        raise DataError(f"DATASET.ROOT {cfg.DATASET.ROOT}, which the run in {run} used, is missing: put the data "
                        "back, or pass --root DATA where it is now (clipkd eval --run)")
    now = _weight_files(cfg, teacher)
    for key, then in saved.items():
        if key == "DATASET.ROOT" or key not in now:
            continue
        path = now[key]
        if path is None:
            raise ModelError(f"{key} {then['file']}, which the run in {run} used, is missing: put it back, or name "
                             f"its new place with {key} PATH (clipkd eval --run)")
        differs = _file_differs(then, path)
        if differs:
            raise ModelError(f"{key} {path} has changed since the run in {run} used it ({differs}): put back the "
                             "file the run used, or train a new run with this one")
    if data is not None and "DATASET.ROOT" in saved:
        _check_data(saved["DATASET.ROOT"], cfg.DATASET.ROOT, data(), run)


def _file_differs(then: dict[str, Any], path: Path) -> str:
    """'' when ``path`` holds the recorded file, else what differs."""
    st = path.stat()
    if "sha256" in then and st.st_size <= HASH_LIMIT:
        if st.st_size == then["size"] and _sha256(path) == then["sha256"]:
            return ""
        return f"then {then['size']} bytes, SHA-256 {then['sha256'][:12]}; now {st.st_size} bytes, SHA-256 " \
               f"{_sha256(path)[:12]}"
    if st.st_size == then["size"] and st.st_mtime_ns == then["mtime_ns"]:
        return ""
    return f"then {then['size']} bytes modified {_when(then['mtime_ns'])}; now {st.st_size} bytes modified " \
           f"{_when(st.st_mtime_ns)}"


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _check_data(then: dict[str, Any], root: str, data: RunData, run: str) -> None:
    now = {name: _list_record(split) for name, split in _data_lists(data).items()}
    differs = []
    for name, record in then["lists"].items():
        if name not in now or now[name] == record:
            continue
        counts = [f"{key} {record[key]} -> {now[name][key]}" for key in ("classes", *LISTS)
                  if record[key] != now[name][key]]
        differs.append(f"{name}: " + (", ".join(counts) if counts else
                                      "the same counts, other image names, labels, class names or file sizes"))
    if differs:
        raise DataError(f"DATASET.ROOT {root}: the {data.spec.name} data there is not what the run in {run} used "
                        f"({'; '.join(differs)}): point --root (DATASET.ROOT) at the data the run used, or train a "
                        "new run on this data")
