"""The lists one run trains and evaluates on, from DATASET.*, SEED and DISTILL.PROTOCOL."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from yacs.config import CfgNode

from clipkd.data.specs import DatasetSpec, get_spec
from clipkd.data.splits import ResolvedSplit, resolve_halves
from clipkd.errors import ConfigError


@dataclass
class RunData:
    """The lists one run trains and evaluates on."""

    spec: DatasetSpec
    train: ResolvedSplit  # what the student learns from
    halves: dict[str, ResolvedSplit]  # evaluated halves: base + new (base-to-new) or all (few-shot setting)
    # What is derived from these lists once for every run that shares them (a fused group's cells), e.g. the
    # record of their files that inputs.json keeps (clipkd.runs.inputs).
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def select(self) -> ResolvedSplit:
        """The half whose split picks the epoch when TEST.FINAL_MODEL is not last: its few-shot val list for
        ``val``; its test list only for ``best_base_test`` (the reference code's choice, marked as such)."""
        return self.halves.get("base") or self.halves["all"]


def prepare_data(cfg: CfgNode) -> RunData:
    """DATASET.SUBSAMPLE_CLASSES base = the base-to-new setting (train on base, evaluate base and new);
    all = the few-shot setting (train and evaluate on all classes)."""
    if not cfg.DATASET.ROOT:
        raise ConfigError("DATASET.ROOT is empty; pass --root DATA")
    spec = get_spec(cfg.DATASET.NAME)
    shots, seed = cfg.DATASET.NUM_SHOTS, cfg.SEED
    names = ("base", "new") if cfg.DATASET.SUBSAMPLE_CLASSES == "base" else ("all",)
    inductive = cfg.DISTILL.PROTOCOL == "inductive"
    # transductive (PromptKD): train images of all classes, labels unused, logits over all classes
    needed = names if inductive or "all" in names else (*names, "all")
    resolved = resolve_halves(cfg.DATASET.ROOT, spec, shots, seed, needed)  # one read, one draw
    halves = {h: resolved[h] for h in names}
    train = (halves.get("base") or halves["all"]) if inductive else resolved["all"]
    return RunData(spec, train, halves)
