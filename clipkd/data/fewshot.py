"""Few-shot sampling and the base/new class split, exactly as the Dassl/CoOp family does them.

Published base-to-new numbers are only comparable if a run sees the same images, so the order of every
step matters: the draw uses Python's Mersenne Twister seeded with the run seed, classes are visited in order
of first appearance, and the base/new split filters the draw afterwards.
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Sequence

from clipkd.data.records import Datum
from clipkd.errors import DataError

SUBSAMPLES = ("all", "base", "new")
MAX_VAL_SHOTS = 4  # val draws min(K, 4) per class


def group_by_label(items: Sequence[Datum]) -> dict[int, list[Datum]]:
    """Items per label, labels in order of first appearance (a dict keeps insertion order)."""
    groups: dict[int, list[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def sample_per_class(
    items: Sequence[Datum], shots: int, rng: random.Random, short: list[int] | None = None
) -> list[Datum]:
    """Draw ``shots`` items per class without replacement; a smaller class is taken whole (no draw).

    Labels of classes taken whole are appended to ``short`` when given.
    """
    if shots <= 0:
        return list(items)
    out: list[Datum] = []
    for label, group in group_by_label(items).items():
        if len(group) >= shots:
            out.extend(rng.sample(group, shots))
        else:
            if short is not None:
                short.append(label)
            out.extend(group)
    return out


def sample_few_shot(
    train: Sequence[Datum],
    val: Sequence[Datum],
    shots: int,
    seed: int,
    sample_val: bool = True,
    warn_source: str = "",
) -> tuple[list[Datum], list[Datum]]:
    """The K-shot train draw then the min(K, 4)-shot val draw from one stream seeded with ``seed``.

    ``random.Random(seed)`` yields the same stream as ``random.seed(seed)`` without touching global state.
    ``shots <= 0`` keeps the full lists. ``sample_val=False`` (ImageNet) draws nothing for val.
    Classes smaller than K are taken whole, as Dassl does, with one warning for the draw.
    """
    if shots <= 0:
        return list(train), list(val)
    rng = random.Random(seed)
    short: list[int] = []
    new_train = sample_per_class(train, shots, rng, short)
    if short:
        warnings.warn(
            f"{warn_source}{len(short)} class(es) have fewer than {shots} train images (labels "
            f"{short[:5]}{'...' if len(short) > 5 else ''}); all their images are used, as Dassl does",
            stacklevel=2,
        )
    new_val = sample_per_class(val, min(shots, MAX_VAL_SHOTS), rng) if sample_val else list(val)
    return new_train, new_val


def base_new_labels(train: Sequence[Datum], subsample: str) -> list[int]:
    """The label ids of one half: sorted train labels, base = first ceil(n/2), new = the rest."""
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of {SUBSAMPLES}, got {subsample!r}")
    labels = sorted({item.label for item in train})
    if subsample == "all":
        return labels
    m = math.ceil(len(labels) / 2)
    return labels[:m] if subsample == "base" else labels[m:]


def subsample_classes(
    train: Sequence[Datum], *others: Sequence[Datum], subsample: str = "all"
) -> list[list[Datum]]:
    """Keep one half's items (in order) and relabel them 0..m-1; ``all`` returns the lists unchanged."""
    lists = [list(train), *(list(o) for o in others)]
    if subsample == "all":
        return lists
    relabel = {old: new for new, old in enumerate(base_new_labels(train, subsample))}
    return [
        [Datum(item.relpath, relabel[item.label], item.classname) for item in items if item.label in relabel]
        for items in lists
    ]


def classnames_for_prompts(train: Sequence[Datum], what: str = "train") -> list[str]:
    """Class names ordered by label, ``_`` replaced by a space, case kept (what prompts are built from).

    ``what`` names the list in errors (``test`` for the evaluation-only datasets, which have no train list)."""
    names: dict[int, str] = {}
    for item in train:
        names.setdefault(item.label, item.classname)
    if names and sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names) + 1)) - set(names))
        raise DataError(
            f"labels {missing[:5]} have no {what} image, so they have no class name; check the split file"
        )
    return [names[i].replace("_", " ") for i in sorted(names)]
