"""The ``toy`` dataset: the benchmark domain of the toy world, written in the CoOp split-JSON layout."""

from __future__ import annotations

import json
import random
from pathlib import Path

from clipkd.data.specs import TOY_SPEC
from clipkd.errors import DataError
from clipkd.fileio import atomic_write_text
from clipkd.toy.world import all_classes, render

SPLIT_SIZES = {"train": 20, "val": 8, "test": 25}  # images per class
WORLD_SEED = 0  # the dataset is part of the benchmark: one fixed world for every user
WORLD_VERSION = 2  # bump when world.py draws differently, so caches of an older world are not reused


def write_toy_dataset(root: str | Path, seed: int = WORLD_SEED) -> Path:
    """Write DATA/toy/ (images + split_toy.json); a finished dataset is reused, a partial one refused."""
    folder = Path(root) / TOY_SPEC.folder
    split_path = folder / str(TOY_SPEC.split_file)
    if split_path.is_file():
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} exists without {split_path.name} (an interrupted write?); remove it and rerun")
    rng = random.Random(seed)
    classes = all_classes()
    labels = list(range(len(classes)))
    rng.shuffle(labels)  # base and new halves both mix colours and shapes
    split: dict[str, list] = {key: [] for key in SPLIT_SIZES}
    image_dir = folder / TOY_SPEC.image_dir
    for cls, label in zip(classes, labels):
        (image_dir / cls.name).mkdir(parents=True, exist_ok=True)
        for key, count in SPLIT_SIZES.items():
            for i in range(count):
                rel = f"{cls.name}/{key}_{i:03d}.jpg"
                render(cls, rng, "benchmark").save(image_dir / rel, quality=95)
                split[key].append([rel, label, cls.name])
    for entries in split.values():
        rng.shuffle(entries)
    atomic_write_text(split_path, json.dumps(split))  # the split file last: its presence means the dataset is complete
    return folder
