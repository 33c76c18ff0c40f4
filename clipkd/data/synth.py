"""Small synthetic datasets written in the exact on-disk layout of each real dataset.

They exist so that every reader, the few-shot sampler and the base/new split can be exercised (and a
user can try the tool) without downloading anything. The generator deliberately makes the cases that
break naive code: split lists are shuffled, label ids are not in order of first appearance, class names mix
case and contain underscores, classes hold different numbers of images, and odd class counts are allowed.
Images are real JPEGs whose colour and shape depend on the class, so a model can learn them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from clipkd.data.imagenet import imagenet_classnames_lines, imagenet_wnids, write_imagenet_classnames
from clipkd.data.specs import (
    FGVC_CLASSES_FILE,
    FGVC_SPLIT_FILES,
    IMAGENET_CLASSNAMES_FILE,
    IMAGENET_SPLIT_DIRS,
    LAYOUT_FGVC,
    LAYOUT_IMAGENET,
    LAYOUT_INDEX_FOLDERS,
    LAYOUT_WNID_FOLDERS,
    DatasetSpec,
    get_spec,
)
from clipkd.errors import DataError

_ADJECTIVES = ["Amber", "blue", "Crimson", "dusty", "Emerald", "faded", "Golden", "hazy", "Ivory", "jade",
               "Khaki", "lilac", "Maroon", "navy", "Olive", "pale", "Quartz", "rusty", "Silver", "teal"]
_NOUNS = ["Circle", "square", "Triangle", "star", "Ring", "cross", "Diamond", "bar", "Arrow", "moon",
          "Heart", "wave", "Spiral", "grid", "Kite", "leaf", "Bolt", "drop", "Crown", "bell"]
_SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def make_classnames(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct names such as 'Amber_Circle_3': mixed case, underscores, one number for uniqueness."""
    return [f"{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}_{i}" for i in range(n)]


def draw_image(path: Path, cls: int, n_classes: int, rng: random.Random, size: tuple[int, int] = (56, 44)) -> None:
    """A JPEG whose colour and shape encode the class, with random position, scale and background."""
    import colorsys

    from PIL import Image, ImageDraw

    hue = cls / max(n_classes, 1)
    colour = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.9, 0.95))
    bg = tuple(rng.randint(0, 80) for _ in range(3))
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    s = rng.randint(min(w, h) // 4, min(w, h) // 2)
    x, y = rng.randint(0, w - s), rng.randint(0, h - s)
    shape = _SHAPES[cls % len(_SHAPES)]
    if shape == "ellipse":
        d.ellipse([x, y, x + s, y + s], fill=colour)
    elif shape == "rectangle":
        d.rectangle([x, y, x + s, y + s], fill=colour)
    elif shape == "triangle":
        d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    else:
        d.rectangle([x + s // 3, y, x + 2 * s // 3, y + s], fill=colour)
        d.rectangle([x, y + s // 3, x + s, y + 2 * s // 3], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)


def _counts(cls: int, per_class: int) -> dict[str, int]:
    """Uneven class sizes (some classes smaller than K, to exercise Dassl's take-all rule)."""
    n_train = max(1, per_class - cls % 3)
    n_eval = max(2, per_class // 2)
    return {"train": n_train, "val": n_eval, "test": n_eval}


# How a split-JSON dataset names its files, relative to its image folder: (classname, split, index) -> path.
_PATHS: dict[str, Callable[[str, str, int], str]] = {
    "caltech101": lambda c, s, i: f"{c}/image_{s}_{i:04d}.jpg",
    "oxford_pets": lambda c, s, i: f"{c}_{s}_{i}.jpg",
    "stanford_cars": lambda c, s, i: f"{'cars_test' if s == 'test' else 'cars_train'}/{c}_{s}_{i:05d}.jpg",
    "oxford_flowers": lambda c, s, i: f"image_{c}_{s}_{i:05d}.jpg",
    "food101": lambda c, s, i: f"{c.lower()}/{s}{i:07d}.jpg",
    "sun397": lambda c, s, i: f"{c[0].lower()}/{c.lower()}/sun_{s}{i:04d}.jpg",
    "dtd": lambda c, s, i: f"{c.lower()}/{c.lower()}_{s}_{i:04d}.jpg",
    "eurosat": lambda c, s, i: f"{c.replace('_', '')}/{c.replace('_', '')}_{s}{i}.jpg",
    "ucf101": lambda c, s, i: f"{c}/v_{c.replace('_', '')}_g{i:02d}_c01_{s}.jpg",
}


def synthesize(
    root: str | Path,
    dataset: str | DatasetSpec,
    classes: int = 7,
    images_per_class: int = 8,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset at ``root/<folder>`` in the real layout; returns that folder.

    Refuses to touch an existing non-empty folder, so it never overwrites real data.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_spec(dataset)
    if classes < 2:
        raise DataError(f"--classes must be at least 2 (base and new need one class each), got {classes}")
    if images_per_class < 1:
        raise DataError(f"--images-per-class must be at least 1, got {images_per_class}")
    folder = Path(root).expanduser() / spec.folder
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} already exists and is not empty; choose another --root or remove it")
    rng = random.Random(seed)
    if spec.layout == LAYOUT_IMAGENET:
        _synth_imagenet(folder, spec, classes, images_per_class, rng)
    elif spec.layout == LAYOUT_FGVC:
        _synth_fgvc(folder, spec, classes, images_per_class, rng)
    elif spec.layout == LAYOUT_WNID_FOLDERS:
        _synth_wnid_folders(folder, spec, classes, images_per_class, rng)
    elif spec.layout == LAYOUT_INDEX_FOLDERS:
        _synth_index_folders(folder, spec, classes, images_per_class, rng)
    else:
        _synth_split_json(folder, spec, classes, images_per_class, rng)
    return folder


def _synth_split_json(folder: Path, spec: DatasetSpec, n: int, k: int, rng: random.Random) -> None:
    names = make_classnames(n, rng)
    labels = list(range(n))
    rng.shuffle(labels)  # class c gets label labels[c]: names sorted != label order
    image_dir = folder / spec.image_dir if spec.image_dir else folder
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(names):
        for key, count in _counts(c, k).items():
            for i in range(count):
                rel = _PATHS[spec.stem](name, key, i)
                draw_image(image_dir / rel, labels[c], n, rng)
                split[key].append([rel, labels[c], name])
    for entries in split.values():
        rng.shuffle(entries)
    assert spec.split_file is not None
    (folder / spec.split_file).write_text(json.dumps(split, indent=1))


def _synth_fgvc(folder: Path, spec: DatasetSpec, n: int, k: int, rng: random.Random) -> None:
    names = [name.replace("_", " ") + ("-200" if i % 2 else "") for i, name in enumerate(make_classnames(n, rng))]
    order = list(range(n))
    rng.shuffle(order)  # variants.txt is not sorted: labels are line indices
    (folder / spec.image_dir).mkdir(parents=True, exist_ok=True)
    (folder / FGVC_CLASSES_FILE).write_text("".join(f"{names[c]}\n" for c in order))
    label_of = {c: order.index(c) for c in range(n)}
    next_id = 1000000 + rng.randint(0, 1000)
    lines: dict[str, list[str]] = {key: [] for key in FGVC_SPLIT_FILES}
    for c in range(n):
        for key, count in _counts(c, k).items():
            for _ in range(count):
                image_id = f"{next_id:07d}"
                next_id += rng.randint(1, 9)
                draw_image(folder / spec.image_dir / f"{image_id}.jpg", label_of[c], n, rng)
                lines[key].append(f"{image_id} {names[c]}\n")
    for key, fname in FGVC_SPLIT_FILES.items():
        rng.shuffle(lines[key])
        (folder / fname).write_text("".join(lines[key]))


def _synth_imagenet(folder: Path, spec: DatasetSpec, n: int, k: int, rng: random.Random) -> None:
    wnids = sorted(rng.sample(imagenet_wnids(), n))
    val_id = 1
    for label, wnid in enumerate(wnids):
        counts = _counts(label, k)
        for i in range(counts["train"]):
            draw_image(folder / spec.image_dir / IMAGENET_SPLIT_DIRS["train"] / wnid / f"{wnid}_{rng.randint(1, 99999)}_{i}.JPEG",
                       label, n, rng)
        for _ in range(counts["test"]):
            draw_image(folder / spec.image_dir / IMAGENET_SPLIT_DIRS["test"] / wnid / f"ILSVRC2012_val_{val_id:08d}.JPEG",
                       label, n, rng)
            val_id += rng.randint(1, 5)
    write_imagenet_classnames(folder.parent)


def _synth_wnid_folders(folder: Path, spec: DatasetSpec, n: int, k: int, rng: random.Random) -> None:
    """ImageNet-Sketch/-A/-R: test images in ``n`` wnid folders (a subset, as A and R are), a README.txt beside
    them (as A and R ship; not a class), and ImageNet's full classnames.txt (CoOp copies ImageNet's)."""
    wnids = sorted(rng.sample(imagenet_wnids(), n))
    image_dir = folder / spec.image_dir
    for label, wnid in enumerate(wnids):
        for i in range(_counts(label, k)["test"]):
            draw_image(image_dir / wnid / f"{rng.randint(0, 99999):05d}_{i}.jpg", label, n, rng)
    (image_dir / "README.txt").write_text("synthetic stand-in for the dataset's README\n")
    write_imagenet_classnames(folder.parent, dataset=spec.stem)


def _synth_index_folders(folder: Path, spec: DatasetSpec, n: int, k: int, rng: random.Random) -> None:
    """ImageNetV2: folders ``0..n-1``; classnames.txt lists ``n`` wnids in class-index order, folder i holding
    class i (the real file has all 1000 lines, and the real folders 0..999)."""
    wnids = sorted(rng.sample(imagenet_wnids(), n))
    for label in range(n):
        for i in range(_counts(label, k)["test"]):
            draw_image(folder / spec.image_dir / str(label) / f"{rng.getrandbits(40):010x}_{i}.jpeg", label, n, rng)
    (folder / IMAGENET_CLASSNAMES_FILE).write_text("\n".join(imagenet_classnames_lines(wnids)) + "\n")
