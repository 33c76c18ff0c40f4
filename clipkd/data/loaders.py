"""torch Dataset / DataLoader over resolved splits, and the image transforms their items go through."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from clipkd.data.records import Datum
from clipkd.errors import DataError

if TYPE_CHECKING:
    from yacs.config import CfgNode


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, or a DataError that names the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; restore it or re-download the dataset") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {path} cannot be read ({exc}); replace the file") from None


def _interpolation(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}[name]


def build_transform(cfg: "CfgNode", is_train: bool) -> Any:
    """The train or test transform for ``cfg.INPUT``, as the CLIP configs of the Dassl family (CoOp, PromptSRC,
    PromptKD) have it. Train: RandomResizedCrop(size, scale) -> RandomHorizontalFlip -> ToTensor -> Normalize (no
    resize first). Test: Resize(shorter side = size) -> CenterCrop(size) -> ToTensor -> Normalize."""
    from torchvision import transforms as T

    size = tuple(cfg.INPUT.SIZE)
    interp = _interpolation(cfg.INPUT.INTERPOLATION)
    normalize = T.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD))
    if is_train:
        steps = [
            T.RandomResizedCrop(size, scale=tuple(cfg.INPUT.RRCROP_SCALE), interpolation=interp),
            T.RandomHorizontalFlip(p=cfg.INPUT.FLIP_PROB),
        ]
    else:
        steps = [T.Resize(max(size), interpolation=interp), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), normalize])


class ImageListDataset(Dataset):
    """Items -> (image tensor, label, index); the index lets a trainer look up cached per-image values."""

    def __init__(self, items: Sequence[Datum], dataset_dir: str, transform: Callable[[Any], Any]):
        import os

        self.items = list(items)
        self.paths = [os.path.join(dataset_dir, d.relpath) for d in self.items]
        self.transform = transform
        self.aug_seed: int | None = None  # set per epoch: each item's augmentation then depends on (seed, index)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image = load_image(self.paths[index])
        if self.aug_seed is None:
            image = self.transform(image)
        else:
            # the same random crop/flip for an image whichever process or worker loads it, so multi-process
            # training sees exactly the batches a single process would
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.aug_seed * 1_000_003 + index)
                image = self.transform(image)
        return image, self.items[index].label, index


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds derive from ``seed`` alone (reproducible on CPU)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
