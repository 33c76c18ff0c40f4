"""The KD family's objective: a divergence between the teacher's and the student's class distributions
(DISTILL.LOSS, bound once by :func:`clipkd.losses.build_distill_loss_from_cfg`), optionally plus cross-entropy
on the labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from yacs.config import CfgNode

from clipkd.losses.build import STEP_ARGS, DistillLoss, build_distill_loss_from_cfg
from clipkd.methods.distiller import StudentFeatures


class KDObjective:
    """``WEIGHT * D(teacher || student) + CE_WEIGHT * CE(student, labels)`` (either part may be off).

    A divergence that splits by class (DKD) gets a target per sample: the labels, or with
    ``target_from_teacher`` (the transductive protocol's default, whose labels are then unused) the teacher's
    argmax. ``all_images`` only names the labels in the log: those of every training image, base and new classes
    (the transductive protocol with DISTILL.DKD_TARGET label, as ABKD's CLIP code). Every call passes the target
    and the epoch (1-based, counted here and kept in the checkpoint so resume is exact); a loss that uses neither
    ignores them (:func:`clipkd.losses.build_distill_loss` binds it so, and this calls the bound function
    itself).
    """

    def __init__(self, divergence: Callable[..., Tensor] | None, weight: float, ce_weight: float = 0.0,
                 target_from_teacher: bool = False, all_images: bool = False) -> None:
        self.divergence = divergence if weight > 0 else None
        # A built loss is called as its bound function with the data arguments it takes (no wrapper per step);
        # another callable gets both.
        loss = self.divergence
        self._loss, self._data_args = ((loss.bound, loss.data_args) if isinstance(loss, DistillLoss)
                                       else (loss, STEP_ARGS))
        self.weight = float(weight)
        self.ce_weight = float(ce_weight)
        self.needs_target = bool(getattr(self.divergence, "needs_target", False))
        self.target_from_teacher = target_from_teacher and self.needs_target
        self.all_images = all_images and self.needs_target and not self.target_from_teacher
        self.needs_teacher = self.divergence is not None
        self.needs_labels = self.ce_weight > 0 or (self.needs_target and not self.target_from_teacher)
        self.needs_features = False
        self.epoch = 1  # the epoch being trained, 1-based

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                 features: StudentFeatures | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        loss = torch.zeros((), device=student_logits.device)
        terms: dict[str, Tensor] = {}
        if self.divergence is not None:
            assert teacher_logits is not None
            s, t = student_logits.float(), teacher_logits.float()
            target = t.argmax(-1) if self.target_from_teacher else labels
            given = {"target": target, "epoch": self.epoch}
            kd = self._loss(s, t, **{k: given[k] for k in self._data_args})
            loss = loss + self.weight * kd
            terms["kd"] = kd.detach()
        if self.ce_weight > 0:
            ce = F.cross_entropy(student_logits.float(), labels)
            loss = loss + self.ce_weight * ce
            terms["ce"] = ce.detach()
        return loss, terms

    def end_epoch(self, epoch: int, student: nn.Module) -> None:
        self.epoch = epoch + 1

    def final_state(self) -> dict[str, Tensor] | None:
        return None  # the student as trained

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", self.epoch))

    def __repr__(self) -> str:
        parts = [f"{self.divergence} x {self.weight:g}"] if self.divergence is not None else []
        if self.needs_target:
            parts[-1] += (" (target: the teacher's argmax, labels unused)" if self.target_from_teacher
                          else " (target: the labels of all training images (ABKD's CLIP code))"
                          if self.all_images else " (target: the labels)")
        if self.ce_weight > 0:
            parts.append(f"CE x {self.ce_weight:g}")
        return " + ".join(parts)


def build_kd_objective(cfg: CfgNode, student: nn.Module | None = None,
                       classnames: Sequence[str] = ()) -> KDObjective:
    """DISTILL.OBJECTIVE kd: ``DISTILL.WEIGHT * DISTILL.LOSS + DISTILL.CE_WEIGHT * CE`` (student and class names
    unused). In the transductive protocol and in label-free runs a loss that needs a target class (DKD) takes the
    teacher's argmax, or (transductive) with DISTILL.DKD_TARGET label the label of every training image (ABKD's
    CLIP code)."""
    d = cfg.DISTILL
    transductive = d.PROTOCOL == "transductive"
    label_free = d.LABEL_FREE or d.CLASS_AGNOSTIC  # no labels reach the objective: DKD's target is the teacher's
    return KDObjective(build_distill_loss_from_cfg(cfg) if d.WEIGHT > 0 else None, d.WEIGHT, d.CE_WEIGHT,
                       target_from_teacher=(transductive or label_free) and d.DKD_TARGET == "teacher",
                       all_images=transductive)
