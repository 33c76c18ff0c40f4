"""Readers for the on-disk layouts (CoOp split JSON, FGVCAircraft txt files, ImageNet folders, and the folders of
the evaluation-only ImageNet variants).

Each returns a :class:`Split` with the lists in file order (few-shot sampling depends on it) and checks what
it reads, so that a broken dataset fails here with the file and the fix rather than deep in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clipkd.data.records import Datum, Split
from clipkd.data.specs import (
    FGVC_CLASSES_FILE,
    FGVC_SPLIT_FILES,
    IMAGENET_CLASSNAMES_FILE,
    IMAGENET_SPLIT_DIRS,
    LAYOUT_FGVC,
    LAYOUT_IMAGENET,
    LAYOUT_INDEX_FOLDERS,
    LAYOUT_SPLIT_JSON,
    LAYOUT_WNID_FOLDERS,
    DatasetSpec,
)
from clipkd.errors import DataError

README_HINT = "see datasets/README.md for the expected layout"


def data_root(root: str | os.PathLike) -> Path:
    """DATA (the folder that holds one folder per dataset), or a DataError that says what it is instead."""
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"DATA root {path} is a file, not a folder; pass the folder that holds the dataset folders")
    if not path.is_dir():
        raise DataError(f"DATA root {path} does not exist; pass the folder that holds the dataset folders")
    return path


def dataset_dir(root: str | os.PathLike, spec: DatasetSpec) -> Path:
    """The dataset's folder under DATA, or a DataError that says what is missing."""
    path = data_root(root) / spec.folder
    if not path.is_dir():
        raise DataError(
            f"{spec.name}: folder {path} not found; put the dataset at DATA/{spec.folder}/ ({README_HINT})"
        )
    return path


def _check_classnames(items: list[Datum], source: str) -> None:
    """Every label must carry one class name, or prompts would be ambiguous."""
    seen: dict[int, str] = {}
    for item in items:
        known = seen.setdefault(item.label, item.classname)
        if known != item.classname:
            raise DataError(
                f"{source}: label {item.label} is called both '{known}' and '{item.classname}'; "
                "fix the file so each label has one class name"
            )


def read_split_json(path: Path, prefix: str) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """A CoOp ``split_zhou_*.json``: ``{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}``."""
    if not path.is_file():
        raise DataError(
            f"split file {path} not found; download it from the CoOp dataset instructions and place it "
            f"there ({README_HINT}); clipkd never regenerates splits"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-download the split file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with keys train, val, test")
    out = []
    for key in ("train", "val", "test"):
        entries = data.get(key)
        if not isinstance(entries, list):
            raise DataError(f"{path}: missing list '{key}'; expected keys train, val, test")
        items = []
        for i, entry in enumerate(entries):
            if (
                not isinstance(entry, (list, tuple))
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], (int, str))
                or not isinstance(entry[2], str)
            ):
                raise DataError(
                    f"{path}: entry {key}[{i}] = {entry!r} is not [relative path, label, class name]"
                )
            try:
                label = int(entry[1])
            except ValueError:
                raise DataError(f"{path}: entry {key}[{i}] has label {entry[1]!r}, not an integer") from None
            if label < 0:
                raise DataError(f"{path}: entry {key}[{i}] has negative label {label}")
            relpath = f"{prefix}/{entry[0]}" if prefix else entry[0]
            items.append(Datum(relpath, label, entry[2]))
        _check_classnames(items, f"{path} ({key})")
        out.append(items)
    _check_classnames(out[0] + out[1] + out[2], str(path))
    return out[0], out[1], out[2]


def read_fgvc(folder: Path, spec: DatasetSpec) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """FGVCAircraft: labels are line indices in variants.txt (file order, not sorted)."""
    variants = folder / FGVC_CLASSES_FILE
    if not variants.is_file():
        raise DataError(f"{spec.name}: {variants} not found ({README_HINT})")
    classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    cname2lab: dict[str, int] = {}
    for name in classnames:
        cname2lab.setdefault(name, len(cname2lab))
    if len(cname2lab) != len(classnames):
        raise DataError(f"{variants}: class names repeat; each line must name a different class")
    out = []
    for key, fname in FGVC_SPLIT_FILES.items():
        path = folder / fname
        if not path.is_file():
            raise DataError(f"{spec.name}: {path} not found ({README_HINT})")
        items = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.strip().split(" ")
            if not parts or not parts[0]:
                continue
            if len(parts) < 2:
                raise DataError(
                    f"{path}:{lineno}: '{line.strip()}' has no class name; lines are '<image id> <class name>'"
                )
            classname = " ".join(parts[1:])
            if classname not in cname2lab:
                raise DataError(f"{path}:{lineno}: class '{classname}' is not listed in {variants}")
            items.append(Datum(f"{spec.image_dir}/{parts[0]}.jpg", cname2lab[classname], classname))
        out.append(items)
    return out[0], out[1], out[2]


def read_imagenet_classnames(path: Path) -> dict[str, str]:
    """``classnames.txt``: lines ``<wnid> <class name>``."""
    if not path.is_file():
        raise DataError(
            f"ImageNet: {path} not found; write it with 'clipkd data imagenet-classnames --root DATA' "
            f"({README_HINT})"
        )
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.strip().split(" ")
        if not parts[0]:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: '{line.strip()}' has no class name; lines are '<wnid> <class name>'")
        mapping[parts[0]] = " ".join(parts[1:])
    return mapping


def list_wnid_folders(split_dir: Path) -> list[str]:
    """Class folders in sorted order: the label is the index in this list (as in CoOp)."""
    if not split_dir.is_dir():
        raise DataError(f"ImageNet: {split_dir} not found; expected images/train/<wnid>/ and images/val/<wnid>/")
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def read_imagenet(folder: Path, spec: DatasetSpec) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """ImageNet: the val images serve as the test set; there is no held-out val (returned empty).

    Dassl lists the images of a class in os.listdir order, which depends on the file system; clipkd sorts
    them so that a seed gives the same draw everywhere (so draws can differ from a Dassl run's).
    Dassl also uses test as val; clipkd leaves val empty so nothing can select a model on the test split.
    """
    classnames = read_imagenet_classnames(folder / IMAGENET_CLASSNAMES_FILE)
    out = {}
    for key, sub in IMAGENET_SPLIT_DIRS.items():
        split_dir = folder / spec.image_dir / sub
        items = []
        for label, wnid in enumerate(list_wnid_folders(split_dir)):
            if wnid not in classnames:
                raise DataError(
                    f"ImageNet: folder {split_dir / wnid} has no line in {folder / IMAGENET_CLASSNAMES_FILE}; "
                    "rewrite it with 'clipkd data imagenet-classnames --root DATA'"
                )
            names = sorted(n for n in os.listdir(split_dir / wnid) if not n.startswith("."))
            rel = f"{spec.image_dir}/{sub}/{wnid}"
            items.extend(Datum(f"{rel}/{n}", label, classnames[wnid]) for n in names)
        out[key] = items
    return out["train"], [], out["test"]


def _variant_classnames(folder: Path, spec: DatasetSpec) -> list[tuple[str, str]]:
    """An ImageNet variant's ``classnames.txt`` (CoOp: a copy of ImageNet's) as (wnid, name) pairs in file order."""
    path = folder / IMAGENET_CLASSNAMES_FILE
    if not path.is_file():
        raise DataError(
            f"{spec.name}: {path} not found; copy DATA/imagenet/classnames.txt there, or write it with "
            f"'clipkd data imagenet-classnames --root DATA --dataset {spec.stem}' ({README_HINT})"
        )
    pairs = list(read_imagenet_classnames(path).items())
    if not pairs:
        raise DataError(f"{path} holds no '<wnid> <class name>' line; copy DATA/imagenet/classnames.txt there")
    return pairs


def _image_names(class_dir: Path) -> list[str]:
    """The images of one class folder, sorted (CoOp lists them in os.listdir order; the order of a test list
    changes no number, sorting only makes it the same everywhere)."""
    return sorted(entry.name for entry in os.scandir(class_dir) if not entry.name.startswith(".") and entry.is_file())


def read_wnid_folders(folder: Path, spec: DatasetSpec) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """ImageNet-Sketch, -A, -R (test only): ``<image_dir>/<wnid>/*``; the label is the wnid's index in the sorted
    list of folders present (A and R hold 200 of ImageNet's classes), the name its line in classnames.txt.
    Files beside the folders (ImageNet-A/-R ship a README.txt) are not classes."""
    names = dict(_variant_classnames(folder, spec))
    image_dir = folder / spec.image_dir
    if not image_dir.is_dir():
        raise DataError(f"{spec.name}: {image_dir} not found; expected {spec.folder}/{spec.image_dir}/<wnid>/ "
                        f"({README_HINT})")
    wnids = sorted(entry.name for entry in os.scandir(image_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not wnids:
        raise DataError(f"{spec.name}: no class folders under {image_dir}; expected one folder per wnid "
                        f"({README_HINT})")
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DataError(
            f"{spec.name}: folder {image_dir / unknown[0]} has no line in {folder / IMAGENET_CLASSNAMES_FILE}"
            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; the file must be ImageNet's "
            "classnames.txt (all 1000 wnids)"
        )
    test = []
    for label, wnid in enumerate(wnids):
        rel = f"{spec.image_dir}/{wnid}"
        test.extend(Datum(f"{rel}/{n}", label, names[wnid]) for n in _image_names(image_dir / wnid))
    return [], [], test


def read_index_folders(folder: Path, spec: DatasetSpec) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """ImageNetV2 (test only): ``<image_dir>/<i>/*`` for i = 0..N-1, where class i is line i of classnames.txt
    (ImageNet's class-index order) and N the number of lines."""
    pairs = _variant_classnames(folder, spec)
    image_dir = folder / spec.image_dir
    if not image_dir.is_dir():
        raise DataError(f"{spec.name}: {image_dir} not found; expected {spec.folder}/{spec.image_dir}/0/ .. "
                        f"/{len(pairs) - 1}/ ({README_HINT})")
    present = {entry.name for entry in os.scandir(image_dir) if entry.is_dir() and not entry.name.startswith(".")}
    expected = [str(i) for i in range(len(pairs))]
    extra = sorted(present - set(expected))
    if extra:
        raise DataError(f"{spec.name}: folder {image_dir / extra[0]} is not a class index 0..{len(pairs) - 1} "
                        f"({folder / IMAGENET_CLASSNAMES_FILE} has {len(pairs)} lines)")
    missing = [i for i in expected if i not in present]
    if missing:
        raise DataError(
            f"{spec.name}: {image_dir / missing[0]} not found"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
            f"{folder / IMAGENET_CLASSNAMES_FILE} has {len(pairs)} lines, so class folders 0..{len(pairs) - 1} "
            "are expected (folder i holds ImageNet class i)"
        )
    test = []
    for label, (_, name) in enumerate(pairs):
        rel = f"{spec.image_dir}/{label}"
        test.extend(Datum(f"{rel}/{n}", label, name) for n in _image_names(image_dir / str(label)))
    return [], [], test


def read_dataset(root: str | os.PathLike, spec: DatasetSpec) -> Split:
    """Read one dataset's full split (all classes, all images) from DATA."""
    folder = dataset_dir(root, spec)
    if spec.layout == LAYOUT_SPLIT_JSON:
        assert spec.split_file is not None
        train, val, test = read_split_json(folder / spec.split_file, spec.image_dir)
    elif spec.layout == LAYOUT_FGVC:
        train, val, test = read_fgvc(folder, spec)
    elif spec.layout == LAYOUT_IMAGENET:
        train, val, test = read_imagenet(folder, spec)
    elif spec.layout == LAYOUT_WNID_FOLDERS:
        train, val, test = read_wnid_folders(folder, spec)
    elif spec.layout == LAYOUT_INDEX_FOLDERS:
        train, val, test = read_index_folders(folder, spec)
    else:  # pragma: no cover - specs are data in this package
        raise DataError(f"{spec.name}: unknown layout {spec.layout}")
    if spec.test_only:
        if not test:
            raise DataError(f"{spec.name}: no test images under {folder / spec.image_dir} ({README_HINT})")
    elif not train:
        raise DataError(f"{spec.name}: the train split under {folder} is empty ({README_HINT})")
    return Split(str(folder), train, val, test)
