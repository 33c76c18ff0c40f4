"""From DATA to the lists a run uses: read -> few-shot draw (cached) -> base/new split -> class names."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

from clipkd.data.cache import cached_draw
from clipkd.data.fewshot import classnames_for_prompts, sample_few_shot, subsample_classes
from clipkd.data.readers import read_dataset
from clipkd.data.records import Datum
from clipkd.data.specs import LAYOUT_IMAGENET, DatasetSpec, get_spec
from clipkd.errors import DataError


@dataclass(frozen=True)
class ResolvedSplit:
    """What a run trains and evaluates on; labels are 0..len(classnames)-1 after relabelling."""

    spec: DatasetSpec
    dataset_dir: str
    classnames: list[str]  # prompt-ready: ordered by label, "_" -> " "
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]

    def impaths(self, items: list[Datum]) -> list[str]:
        """The image files of ``items`` (Datums of this split)."""
        return [os.path.join(self.dataset_dir, item.relpath) for item in items]

    def impath(self, item: Datum) -> str:
        return self.impaths([item])[0]

    def to_json(self) -> dict:
        """The shape ``clipkd data split --json`` prints: paths relative to the dataset folder."""
        return {
            "classnames": self.classnames,
            **{
                key: [[d.relpath, d.label] for d in getattr(self, key)]
                for key in ("train", "val", "test")
            },
        }


def resolve_split(
    root: str | os.PathLike,
    dataset: str | DatasetSpec,
    shots: int,
    seed: int,
    subsample: str = "all",
    cache_dir: str | os.PathLike | None | bool = None,
) -> ResolvedSplit:
    """The Dassl/CoOp procedure: K-shot draw over all classes (shared by base and new runs), then the half.

    ``cache_dir``: None = default cache location, False = no cache, else a folder.
    """
    return resolve_halves(root, dataset, shots, seed, (subsample,), cache_dir)[subsample]


def resolve_halves(
    root: str | os.PathLike,
    dataset: str | DatasetSpec,
    shots: int,
    seed: int,
    halves: Sequence[str],
    cache_dir: str | os.PathLike | None | bool = None,
) -> dict[str, ResolvedSplit]:
    """:func:`resolve_split` of each of ``halves`` (e.g. base and new), from one read of the dataset and one
    draw: the draw is over all classes, so every half of a run shares it."""
    spec = dataset if isinstance(dataset, DatasetSpec) else get_spec(dataset)
    if spec.test_only:
        return {half: _resolve_test_only(root, spec, half) for half in halves}
    full = read_dataset(root, spec)
    sample_val = spec.layout != LAYOUT_IMAGENET
    if shots > 0:
        draw = functools.partial(sample_few_shot, full.train, full.val, shots, seed, sample_val=sample_val,
                                 warn_source=f"{spec.name}: ")
        train, val = cached_draw(cache_dir, spec.stem, shots, seed, full.train, full.val, draw)
    else:
        train, val = list(full.train), list(full.val)
    out = {}
    for half in halves:
        half_train, half_val, half_test = subsample_classes(train, val, full.test, subsample=half)
        out[half] = ResolvedSplit(spec, full.dataset_dir, classnames_for_prompts(half_train), half_train, half_val,
                                  half_test)
    return out


def _resolve_test_only(root: str | os.PathLike, spec: DatasetSpec, subsample: str) -> ResolvedSplit:
    """An evaluation set: its test images over all its classes (no draw: there is no train list to draw from;
    class names come from the test list)."""
    if subsample != "all":
        raise DataError(f"{spec.name} is an evaluation set (test images only): it has no base/new halves; use "
                        "all classes (--subsample all, DATASET.SUBSAMPLE_CLASSES all)")
    full = read_dataset(root, spec)
    return ResolvedSplit(spec, full.dataset_dir, classnames_for_prompts(full.test, what="test"), [], [],
                         list(full.test))
