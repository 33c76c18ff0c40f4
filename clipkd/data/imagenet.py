"""ImageNet's ``classnames.txt``, written from what the libraries ship instead of a file fetched by hand.

timm ships the 1000 ILSVRC-2012 wnids in class-index order and open_clip ships CLIP's class names in the
same order, so wnid i is called ``IMAGENET_CLASSNAMES[i]`` (the names CoOp's classnames.txt holds).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from clipkd.data.readers import dataset_dir, list_wnid_folders
from clipkd.data.specs import (
    DG_STEMS,
    IMAGENET_CLASSNAMES_FILE,
    IMAGENET_SPLIT_DIRS,
    LAYOUT_INDEX_FOLDERS,
    LAYOUT_WNID_FOLDERS,
    get_spec,
)
from clipkd.errors import DataError
from clipkd.fileio import atomic_write_text


def imagenet_wnids() -> list[str]:
    """The 1000 wnids in class-index order, read from timm's data files (without importing timm)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("timm is not installed; 'pip install timm' (open_clip depends on it)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info" / "imagenet_synsets.txt"
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(wnids) != 1000:
        raise DataError(f"{path}: expected 1000 wnids, found {len(wnids)}")
    return wnids


def clip_classnames() -> list[str]:
    """CLIP's 1000 ImageNet class names, as open_clip ships them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_classnames_lines(wnids: list[str]) -> list[str]:
    """``<wnid> <class name>`` for the given wnids (sorted), or a DataError for a wnid outside ILSVRC-2012."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    names = clip_classnames()
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise DataError(
            f"ImageNet: folder(s) {', '.join(unknown[:5])} are not ILSVRC-2012 wnids; "
            "images/train/ and images/val/ must hold one folder per wnid"
        )
    return [f"{w} {names[index[w]]}" for w in sorted(wnids)]


def write_imagenet_classnames(root: str | Path, force: bool = False, dataset: str = "imagenet") -> Path:
    """Write ``classnames.txt`` into DATA/imagenet (one line per wnid folder found under images/train and
    images/val) or into an ImageNet variant's folder (all 1000 wnids in class-index order: what CoOp's copy of
    ImageNet's file holds, whose line i names ImageNetV2's folder i)."""
    spec = get_spec(dataset)
    if spec.stem != "imagenet" and spec.layout not in (LAYOUT_WNID_FOLDERS, LAYOUT_INDEX_FOLDERS):
        raise DataError(f"{spec.name} has no classnames.txt; this writes ImageNet's and its variants' "
                        f"(imagenet, {', '.join(DG_STEMS)})")
    folder = dataset_dir(root, spec)
    if spec.stem == "imagenet":
        wnids: set[str] = set()
        for sub in IMAGENET_SPLIT_DIRS.values():
            wnids.update(list_wnid_folders(folder / spec.image_dir / sub))
        if not wnids:
            raise DataError(f"ImageNet: no wnid folders under {folder / spec.image_dir}/train or /val")
    else:
        wnids = set(imagenet_wnids())
    lines = imagenet_classnames_lines(sorted(wnids))
    path = folder / IMAGENET_CLASSNAMES_FILE
    text = "\n".join(lines) + "\n"
    if path.exists() and path.read_text() != text and not force:
        raise DataError(f"{path} exists and differs; pass --force to replace it")
    atomic_write_text(path, text)
    return path
