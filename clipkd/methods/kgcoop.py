"""KgCoOp's knowledge-guided context optimisation (Yao et al., CVPR 2023; ``htyao89/KgCoOp`` trainers/kgcoop.py),
alone or on top of distillation.

KgCoOp keeps the learned class embeddings close to CLIP's hand-crafted ones::

    reg  = 1 - mean_c cos(t_c, h_c)       t: the student's class text features, h: KgCoOpStudent's
                                           hand-crafted ones (KgCoOp's template of the dataset), L2-normalised
    loss = kd_part + KGCOOP.W * reg

where ``kd_part`` is the KD family's objective (:class:`clipkd.methods.kd.KDObjective`, built from the same
config): ``DISTILL.CE_WEIGHT * CE`` alone is KgCoOp itself (its trainer: ``CE + W * score``, W = 8.0 in its
base-to-new runs), and ``DISTILL.WEIGHT > 0`` adds a divergence from a teacher. Whether a teacher and labels are
needed is the KD part's answer. The class embeddings regularised are those of the training classes.

KgCoOp's per-dataset templates are CoOp's zero-shot ones (``DatasetSpec.template``) except for DTD, where it
writes ``"a photo of a {}, a type of texture."`` instead of CoOp's ``"{} texture."`` (its CUSTOM_TEMPLATES).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from yacs.config import CfgNode

from clipkd.config.checks import check_kgcoop_config
from clipkd.data.specs import get_spec
from clipkd.errors import ConfigError, TrainingError
from clipkd.methods.distiller import StudentFeatures
from clipkd.methods.kd import KDObjective, build_kd_objective


# Where KgCoOp's CUSTOM_TEMPLATES differ from CoOp's (by Dassl dataset name); every other dataset: CoOp's template.
KGCOOP_TEMPLATES = {"DescribableTextures": "a photo of a {}, a type of texture."}


def kgcoop_template(dataset: str) -> str:
    """The template KgCoOp fills with each class name for its hand-crafted embeddings of ``dataset``."""
    spec = get_spec(dataset)
    return KGCOOP_TEMPLATES.get(spec.name, spec.template)


def kgcoop_score(text_features: Tensor, handcrafted: Tensor) -> Tensor:
    """``1 - mean_c cos(text_features[c], handcrafted[c])`` (both ``[C, D]``; cosine of the vectors as given)."""
    cos = torch.nn.functional.cosine_similarity(text_features.float(), handcrafted.float(), dim=1, eps=1e-7)
    return 1.0 - cos.mean()


class KgCoOpObjective:
    """``kd_part + weight * (1 - mean cos(t, h))``; KD part as :class:`KDObjective` (its state, its needs)."""

    needs_features = True

    def __init__(self, kd_part: KDObjective, handcrafted: Tensor, weight: float) -> None:
        self.kd_part = kd_part
        self.handcrafted = handcrafted
        self.weight = float(weight)
        self.needs_teacher = kd_part.needs_teacher
        self.needs_labels = kd_part.needs_labels

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                 features: StudentFeatures | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if features is None:
            raise TrainingError("the KgCoOp objective needs the student's class features (Distiller passes them)")
        loss, terms = self.kd_part(student_logits, teacher_logits, labels)
        reg = kgcoop_score(features.text_features, self.handcrafted.to(features.text_features.device))
        terms["kgcoop"] = reg.detach()
        return loss + self.weight * reg, terms

    def end_epoch(self, epoch: int, student: nn.Module) -> None:
        self.kd_part.end_epoch(epoch, student)

    def final_state(self) -> dict[str, Tensor] | None:
        return self.kd_part.final_state()

    def state_dict(self) -> dict[str, Any]:
        return self.kd_part.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kd_part.load_state_dict(state)

    def __repr__(self) -> str:
        kd = repr(self.kd_part)
        return f"{kd + ' + ' if kd else ''}KgCoOp (1 - cos to hand-crafted) x {self.weight:g}"


def build_kgcoop_objective(cfg: CfgNode, student: nn.Module | None = None,
                           classnames: Sequence[str] = ()) -> KgCoOpObjective:
    """DISTILL.OBJECTIVE kgcoop for a kgcoop student trained on ``classnames``: the KD objective of ``cfg`` plus
    KGCOOP.W times KgCoOp's term towards the class embeddings of KgCoOp's DATASET.NAME template."""
    check_kgcoop_config(cfg)
    if student is None or not hasattr(student, "handcrafted_text_features") or not classnames:
        raise ConfigError("DISTILL.OBJECTIVE kgcoop needs the kgcoop student and the training class names "
                          "(build_objective(cfg, student, classnames))")
    if not cfg.DATASET.NAME:
        raise ConfigError("DISTILL.OBJECTIVE kgcoop needs DATASET.NAME: its hand-crafted class embeddings use "
                          "the dataset's template")
    handcrafted = student.handcrafted_text_features(list(classnames), kgcoop_template(cfg.DATASET.NAME))
    return KgCoOpObjective(build_kd_objective(cfg, student, classnames), handcrafted, cfg.KGCOOP.W)
