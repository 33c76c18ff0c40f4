"""The thing that computes a training step's loss: student, frozen teacher and objective in one module.

``Distiller(images, labels) -> StepOutput(loss, logits, terms)``, as nanoGPT's ``logits, loss = model(X, Y)``:
DistributedDataParallel wraps the Distiller itself, so the gradient sync covers exactly what the loss
depends on. The teacher is frozen and is not a submodule (DDP neither broadcasts nor watches it, and the
Distiller's state is the student's); its class embeddings are computed once, here, and reused by every
batch (the reference code recomputed them per batch).

The objective is a small pluggable piece, named by DISTILL.OBJECTIVE (``clipkd.registry.OBJECTIVES``): the KD
family (:mod:`clipkd.methods.kd`: a divergence between teacher and student class distributions, optionally plus
cross-entropy on labels), or a method's regulariser around that KD part: PromptSRC's self-regularisation
(:mod:`clipkd.methods.promptsrc`, which also trains the prompted teachers) and KgCoOp's term
(:mod:`clipkd.methods.kgcoop`). All implement the same :class:`Objective` call; an objective that sets
``needs_features`` also gets the batch's images and the student's normalised features (:class:`StudentFeatures`).

Three options serve KDPL's label-free and class-agnostic distillation (:mod:`clipkd.methods.kdpl`):
``label_free`` (the objective gets ``labels=None``, so no label can reach the loss), ``select`` (each batch
trains over the classes it picks from the teacher's logits over all the Distiller's class names; the teacher's
embeddings of all of them are still computed once) and ``teacher_scale`` (KDPL multiplies the teacher's cosines
by the student's logit scale, not the teacher's own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from yacs.config import CfgNode

from clipkd.registry import OBJECTIVES


class StepOutput(NamedTuple):
    loss: Tensor  # what backward() is called on
    logits: Tensor  # the student's, over the training classes (class-agnostic: the batch's picked classes)
    terms: dict[str, Tensor]  # detached parts of the loss, for logging


class StudentFeatures(NamedTuple):
    """What an objective with ``needs_features`` gets besides the logits (the logits are made from these)."""

    images: Tensor  # the batch, for an objective that runs a frozen model of its own on it
    image_features: Tensor  # the student's, L2-normalised [B, D]
    # the student's class embeddings for the Distiller's class names, L2-normalised [C, D] ([B, C, D] for a
    # conditional student, whose class features depend on the image)
    text_features: Tensor


class Objective(Protocol):
    """A training objective over one batch's logits (the teacher's are None when it needs no teacher; the labels
    None in a label-free run, which only objectives without ``needs_labels`` take).

    ``needs_features`` (optional, False when absent): the objective also wants :class:`StudentFeatures`,
    passed as ``features=``; the others are called with the logits and labels only.

    Besides the per-batch loss, an objective may keep state across epochs (e.g. PromptSRC's Gaussian prompt
    aggregation): the trainer calls ``end_epoch`` after every epoch, saves ``state_dict()`` in each checkpoint
    (so resume stays exact), and after the last epoch loads ``final_state()`` into the student when it is not
    None. :class:`clipkd.methods.kd.KDObjective` shows the no-op versions.
    """

    needs_teacher: bool
    needs_labels: bool
    needs_features: bool

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None,
                 features: StudentFeatures | None = None) -> tuple[Tensor, dict[str, Tensor]]: ...

    def end_epoch(self, epoch: int, student: nn.Module) -> None: ...

    def final_state(self) -> dict[str, Tensor] | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_objective(cfg: CfgNode, student: nn.Module | None = None, classnames: Sequence[str] = ()) -> Objective:
    """The objective DISTILL.OBJECTIVE names, built by its registered builder. Some objectives need the student
    and the training class names (PromptSRC's frozen reference features); the KD family needs neither."""
    return OBJECTIVES.get(cfg.DISTILL.OBJECTIVE)(cfg, student, classnames)


def build_distiller(cfg: CfgNode, student: nn.Module, teacher: nn.Module | None,
                    classnames: Sequence[str]) -> Distiller:
    """The Distiller a run's config describes: DISTILL.OBJECTIVE over the training ``classnames`` (with
    DISTILL.CLASS_AGNOSTIC, KDPL.DICTIONARY's names, K_MAX picked per batch), labels withheld when label-free, the
    teacher at the student's logit scale with DISTILL.TEACHER_LOGIT_SCALE student."""
    d = cfg.DISTILL
    names, select = list(classnames), None
    if d.CLASS_AGNOSTIC:
        from clipkd.methods.kdpl import training_classes  # noqa: PLC0415 - KDPL-CA's own part, only for it

        names, select = training_classes(cfg, classnames)
    return Distiller(student, teacher, names, build_objective(cfg, student, names), select=select,
                     label_free=d.LABEL_FREE or d.CLASS_AGNOSTIC,
                     teacher_scale=student.logit_scale if d.TEACHER_LOGIT_SCALE == "student" else None)


class Distiller(nn.Module):
    """Student + frozen teacher + objective; ``forward(images, labels)`` gives the batch's loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, classnames: Sequence[str],
                 objective: Objective, *, label_free: bool = False,
                 select: Callable[[Tensor], Tensor] | None = None, teacher_scale: float | None = None) -> None:
        super().__init__()
        if objective.needs_teacher and teacher is None:
            raise ValueError("this objective needs a teacher")
        if label_free and objective.needs_labels:
            raise ValueError("a label-free Distiller cannot train an objective that needs labels")
        if select is not None and not (objective.needs_teacher and label_free):
            raise ValueError("per-batch classes are picked by the teacher, and labels would not match them")
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # frozen, deliberately not a submodule (see module doc)
        self.classnames = list(classnames)
        self.objective = objective
        self.teacher_text = teacher.text_features(self.classnames) if objective.needs_teacher else None
        self.needs_features = bool(getattr(objective, "needs_features", False))  # optional in the Objective protocol
        self.label_free = label_free
        self.select = select  # teacher logits [B, C] -> this batch's class indices [K]
        self.teacher_scale = teacher_scale  # multiplies the teacher's cosines; None: the teacher's own logit scale

    def describe(self) -> str:
        """How its classes and labels reach the objective, for the run log ("" when as usual)."""
        if self.select is not None:
            return (f"class-agnostic (KDPL-CA): {self.select!r} of the {len(self.classnames)} names of "
                    "KDPL.DICTIONARY")
        return "label-free (the objective never sees labels)" if self.label_free else ""

    def train(self, mode: bool = True) -> Distiller:
        self.student.train(mode)  # the teacher stays in eval mode
        self.training = mode
        return self

    @torch.no_grad()
    def teacher_logits(self, images: Tensor, features: Tensor | None = None) -> Tensor:
        """The teacher's logits of a batch; ``features``: its image features when already at hand (taken once
        per batch for several students, or read from the teacher cache), else computed from ``images``."""
        if features is None:
            features = self.teacher.image_features(images)
        scale = self.teacher.logit_scale if self.teacher_scale is None else self.teacher_scale
        return scale * features @ self.teacher_text.t()

    def forward(self, images: Tensor, labels: Tensor, teacher_features: Tensor | None = None) -> StepOutput:
        # the student's logits step by step: some objectives see the features, a conditional student's class
        # features are per image, and a class-agnostic batch trains over the classes the teacher picks
        t_logits = self.teacher_logits(images, teacher_features) if self.objective.needs_teacher else None
        classnames = self.classnames
        if self.select is not None:  # this batch's classes, picked by the teacher
            picked = self.select(t_logits)
            t_logits = t_logits[:, picked]
            classnames = [self.classnames[i] for i in picked.tolist()]
        if self.label_free:
            labels = None
        image_features = self.student.image_features(images)
        if getattr(self.student, "conditional", False):  # class features per image [B, C, D] (CoCoOp)
            text_features = self.student.conditional_text_features(image_features, classnames)
            logits = self.student.logit_scale * torch.einsum("bd,bcd->bc", image_features, text_features)
        else:
            text_features = self.student.text_features(classnames)
            logits = self.student.logit_scale * image_features @ text_features.t()
        if self.needs_features:
            features = StudentFeatures(images, image_features, text_features)
            loss, terms = self.objective(logits, t_logits, labels, features=features)
        else:
            loss, terms = self.objective(logits, t_logits, labels)
        return StepOutput(loss, logits, terms)
