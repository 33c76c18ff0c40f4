"""Published reference numbers, as data, with their source.

All numbers are top-1 accuracy in percent, CLIP ViT-B/16 student/backbone, base-to-new generalisation,
averaged over 3 seeds, as printed in the paper. The HMs are the printed ones, not recomputed: two differ from
HM(Base, New) of the printed means (StanfordCars 83.13 vs 83.08, UCF101 86.10 vs 85.83); the deltas of
``clipkd report --compare published`` use the printed HM.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMPTKD_SOURCE = (
    "PromptKD: Unsupervised Prompt Distillation for Vision-Language Models "
    "(Li et al., CVPR 2024), Table 1 (base-to-new generalisation, ViT-B/16, 3 seeds)"
)


@dataclass(frozen=True)
class Published:
    base: float
    new: float
    hm: float


# PromptKD, per dataset, keyed by dataset stem (clipkd.data.specs.STEMS).
PROMPTKD: dict[str, Published] = {
    "imagenet": Published(80.83, 74.66, 77.62),
    "caltech101": Published(98.91, 96.65, 97.77),
    "oxford_pets": Published(96.30, 98.01, 97.15),
    "stanford_cars": Published(82.80, 83.37, 83.13),
    "oxford_flowers": Published(99.42, 82.62, 90.24),
    "food101": Published(92.43, 93.68, 93.05),
    "fgvc_aircraft": Published(49.12, 41.81, 45.17),
    "sun397": Published(83.69, 81.54, 82.60),
    "dtd": Published(85.84, 71.37, 77.94),
    "eurosat": Published(97.54, 82.08, 89.14),
    "ucf101": Published(89.71, 82.27, 86.10),
}

# The "Average over 11 datasets" rows of the same table, per method.
TABLE1_AVERAGES: dict[str, Published] = {
    "zero-shot CLIP": Published(69.34, 74.22, 71.70),
    "CoOp": Published(82.69, 63.22, 71.66),
    "CoCoOp": Published(80.47, 71.69, 75.83),
    "MaPLe": Published(82.28, 75.14, 78.55),
    "PromptSRC": Published(84.26, 76.10, 79.97),
    "PromptKD": Published(86.96, 80.73, 83.73),
}

# What `clipkd report --compare NAME` compares against: (per-dataset numbers, average, source).
REFERENCES: dict[str, tuple[dict[str, Published], Published, str]] = {
    "published": (PROMPTKD, TABLE1_AVERAGES["PromptKD"], PROMPTKD_SOURCE),
}


# ---------------------------------------------------------------- cross-dataset transfer and domain generalisation
@dataclass(frozen=True)
class PublishedTransfer:
    """One method's published row of a cross-dataset (``xd``) or domain-generalisation (``dg``) table: accuracy on
    the source (ImageNet), on each target (keyed by dataset stem) and the printed average over the targets."""

    method: str  # as the paper names it
    recipe: str  # the clipkd method folder (configs/methods/<recipe>.yaml) whose runs it is compared with
    source: float | None
    targets: dict[str, float]
    average: float | None


# What `clipkd report --xd/--dg --compare published` compares against: per setting, (rows, source). Empty on
# purpose: the tables of PromptKD (Table 2), CoOp and CoCoOp could not be read from a source available when this
# was written (their numbers are printed in the papers' PDFs only, not in their repositories or in
# reference/PROTOCOL.md), and numbers are not entered from memory. Add a row here with its source, exactly as printed,
# to make the comparison appear.
TRANSFER_REFERENCES: dict[str, dict[str, tuple[list[PublishedTransfer], str]]] = {
    "published": {"xd": ([], ""), "dg": ([], "")},
}
