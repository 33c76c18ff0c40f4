"""Image transforms of the CLIP configs of the Dassl family (CoOp, PromptSRC, PromptKD).

Train: RandomResizedCrop(size, scale) -> RandomHorizontalFlip -> ToTensor -> Normalize (no resize first).
Test: Resize(shorter side = size) -> CenterCrop(size) -> ToTensor -> Normalize.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yacs.config import CfgNode


def _interpolation(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
            "nearest": InterpolationMode.NEAREST}[name]


def build_transform(cfg: "CfgNode", is_train: bool) -> Any:
    """The train or test transform for ``cfg.INPUT``."""
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
