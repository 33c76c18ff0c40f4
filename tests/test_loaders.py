"""Dataset and DataLoader over a resolved split: real images through the real transforms, seeded order."""

from __future__ import annotations

import torch

from clipkd.config import build_config
from clipkd.data.loaders import ImageListDataset, build_loader, build_transform
from clipkd.data.splits import resolve_split


def test_loader_batches_and_seeded_shuffle(synth_root):
    cfg = build_config([], ["INPUT.SIZE", "(32, 32)"])
    split = resolve_split(synth_root, "caltech101", 4, 1, "base")
    ds = ImageListDataset(split.train, split.dataset_dir, build_transform(cfg, is_train=False))
    images, labels, index = next(iter(build_loader(ds, batch_size=5, shuffle=False)))
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [d.label for d in split.train[:5]] and index.tolist() == [0, 1, 2, 3, 4]

    def order(seed):
        return torch.cat([b[2] for b in build_loader(ds, batch_size=4, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(1)) == list(range(len(ds)))
