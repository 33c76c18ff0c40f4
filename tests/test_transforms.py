"""The transforms have exactly the parameters of the Dassl CLIP configs."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from clipkd.config import build_config
from clipkd.data.loaders import build_transform

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def test_train_transform_parameters():
    tfm = build_transform(build_config(), is_train=True)
    steps = tfm.transforms
    assert [type(s) for s in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    rrc, flip, _, norm = steps
    assert tuple(rrc.size) == (224, 224) and rrc.scale == (0.08, 1.0)
    assert rrc.interpolation == InterpolationMode.BICUBIC
    assert flip.p == 0.5
    assert list(norm.mean) == CLIP_MEAN and list(norm.std) == CLIP_STD


def test_test_transform_parameters():
    tfm = build_transform(build_config(), is_train=False)
    resize, crop, _, norm = tfm.transforms
    assert isinstance(resize, T.Resize) and resize.size == 224  # shorter side
    assert resize.interpolation == InterpolationMode.BICUBIC
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (224, 224)
    assert list(norm.mean) == CLIP_MEAN and list(norm.std) == CLIP_STD


def test_test_transform_output_matches_manual_pipeline():
    img = Image.new("RGB", (300, 200), (200, 30, 90))
    img.putpixel((150, 100), (0, 255, 0))
    out = build_transform(build_config([], ["INPUT.SIZE", "(32, 32)"]), is_train=False)(img)
    resized = img.resize((48, 32), Image.BICUBIC)  # shorter side 200 -> 32, 300 -> 48
    assert out.shape == (3, 32, 32)
    manual = T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(resized.crop((8, 0, 40, 32))))
    assert torch.allclose(out, manual, atol=0.03)
