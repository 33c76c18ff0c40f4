"""The one record type every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Datum:
    """One image: ``relpath`` is relative to the dataset's folder under DATA (relocatable, printable)."""

    relpath: str
    label: int
    classname: str  # as stored in the split (underscores kept); see prompt_classnames()


@dataclass(frozen=True)
class Split:
    """Train / val / test lists of one dataset, in file order, plus where the images live."""

    dataset_dir: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]

    def impath(self, item: Datum) -> str:
        import os

        return os.path.join(self.dataset_dir, item.relpath)
