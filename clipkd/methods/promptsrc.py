"""PromptSRC (Khattak et al., ICCV 2023): how PromptKD's prompted ViT-L/14 teachers are trained, and PromptSRC
combined with distillation.

``DISTILL.OBJECTIVE promptsrc`` trains an IVLP student (prompts in both towers of a frozen CLIP; the ivlp or the
promptsrc student) on labelled base classes. Per batch, with ``s`` the prompted model and ``zs`` the same CLIP
without prompts (PROTOCOL.md section 2b; checked against PromptSRC's ``trainers/promptsrc.py``)::

    loss = WEIGHT * LOSS(teacher || s)                  the KD part: DISTILL.OBJECTIVE kd's KDObjective, whose
         + CE_WEIGHT * CE(logits, y)                    divergence is off (no teacher) when DISTILL.WEIGHT is 0
         + TEXT_LOSS_WEIGHT  * mean |t_s - fixed|       t_s: s's class text features, L2-normalised [C, D]
         + IMAGE_LOSS_WEIGHT * mean |f_s - f_zs|        f_s, f_zs: image features, both L2-normalised [B, D]
         + sum KL(softmax(zs_logits) || softmax(logits)) / logits.numel()

where ``fixed`` (PromptSRC's ``fixed_embeddings``) is the mean over PromptSRC's 60 ImageNet templates of the
frozen CLIP's *unnormalised* text features of each class, then L2-normalised; ``logits = scale * f_s @ t_s^T``
and ``zs_logits = scale * f_zs @ fixed^T`` with the CLIP's logit scale (temperature 1). The three L1/KL terms
are PromptSRC's L_SCL; its CE weight is 1 (DISTILL.CE_WEIGHT here). With DISTILL.WEIGHT 0 this is PromptSRC as
published, bit for bit what this objective computed before it had a KD part. KDPL (``miccunifi/KDPL``,
``trainers/promptsrc_kdpl.py``) distils into PromptSRC the same way: its loss is its divergence plus L_SCL with
no CE (``0.5 KL(t||s) + 0.5 KL(s||t)``, batch mean: DISTILL.LOSS skl x 0.5, CE_WEIGHT 0).

Gaussian prompt aggregation (GPA): after epoch k of N the prompts are added with weight
``g(k) = pdf(k; GPA_MEAN, GPA_STD) / sum_j pdf(j; GPA_MEAN, GPA_STD)`` (j = 1..N), and the final model is that
weighted sum. PromptSRC sums its whole ``state_dict`` (frozen weights included, which the weights, summing to 1,
leave as they are); here only the trainable tensors, the prompts, are summed.

The frozen zero-shot CLIP is not a second copy of the weights, as in PromptSRC: it is the student's own frozen
CLIP run without prompts (:class:`ZeroShotReference`), which is the same network by construction (also with
random-init test models), costs no memory, and gives exactly open_clip's forward (the prompted encoders with
no prompts are open_clip's forward, bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from yacs.config import CfgNode

from clipkd.config.checks import check_promptsrc_config, gpa_weights  # noqa: F401 - checked without torch
from clipkd.errors import ConfigError, TrainingError
from clipkd.methods.distiller import StudentFeatures
from clipkd.methods.kd import KDObjective, build_kd_objective
from clipkd.models.prompts import PromptedTextEncoder, PromptedVisionEncoder

# PromptSRC's IMAGENET_TEMPLATES are the first 60 of CLIP's 80 ImageNet templates, with this one listed first.
N_PROMPTSRC_TEMPLATES = 60
FIRST_TEMPLATE = "a photo of a {}."
TEXT_BATCH_SIZE = 256  # texts per forward pass when the frozen class embeddings are computed


def promptsrc_templates() -> tuple[Callable[[str], str], ...]:
    """PromptSRC's template list, from open_clip's copy of CLIP's 80 (the same 60 templates in its order)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    chosen = list(OPENAI_IMAGENET_TEMPLATES[:N_PROMPTSRC_TEMPLATES])
    first = [t for t in chosen if t("{}") == FIRST_TEMPLATE]
    if len(first) != 1:
        raise RuntimeError(f"open_clip's ImageNet templates changed: {FIRST_TEMPLATE!r} is not among the first "
                           f"{N_PROMPTSRC_TEMPLATES}")
    return (first[0], *(t for t in chosen if t is not first[0]))


# ------------------------------------------------------------------------------------------------ the terms
def scl_text_loss(text_features: Tensor, fixed_embeddings: Tensor) -> Tensor:
    """Mean absolute difference between the prompted and the frozen (template-averaged) class embeddings."""
    return F.l1_loss(text_features.float(), fixed_embeddings.float(), reduction="mean")


def scl_image_loss(image_features: Tensor, zero_shot_features: Tensor) -> Tensor:
    """Mean absolute difference between the prompted and the zero-shot image features (both normalised)."""
    return F.l1_loss(image_features.float(), zero_shot_features.float(), reduction="mean")


def scl_logits_loss(logits: Tensor, zero_shot_logits: Tensor) -> Tensor:
    """KL(zero-shot || prompted) over classes, summed over the batch and divided by ``logits.numel()``."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(zero_shot_logits.float(), dim=1),
                    reduction="sum", log_target=True) / logits.numel()


# ------------------------------------------------------------------------------------------------ GPA
class GaussianPromptAggregation:
    """The running sum ``sum_k g(k) * state_k`` over the epochs added so far (float32)."""

    def __init__(self, n_epochs: int, mean: float, std: float) -> None:
        self.weights = gpa_weights(n_epochs, mean, std)
        self.sum: dict[str, Tensor] = {}
        self.epochs: list[int] = []

    def add(self, epoch: int, state: Mapping[str, Tensor]) -> None:
        """Add the state at the end of ``epoch`` (1-based), weighted by g(epoch)."""
        if not 1 <= epoch <= len(self.weights) or epoch in self.epochs:
            raise TrainingError(f"Gaussian prompt aggregation: epoch {epoch} is outside 1..{len(self.weights)} "
                                f"or added twice (added so far: {self.epochs})")
        w = self.weights[epoch - 1]
        with torch.no_grad():
            for key, value in state.items():
                weighted = value.detach().float() * w
                self.sum[key] = self.sum[key].to(value.device) + weighted if key in self.sum else weighted
        self.epochs.append(epoch)

    def result(self) -> dict[str, Tensor]:
        """The aggregated state; every epoch 1..N must have been added."""
        if self.epochs != list(range(1, len(self.weights) + 1)):
            raise TrainingError(
                f"Gaussian prompt aggregation saw epochs {self.epochs}, not 1..{len(self.weights)}: the run was "
                "resumed from a checkpoint without the aggregate (older clipkd?); train it again from the start")
        return {k: v.clone() for k, v in self.sum.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sum": {k: v.detach().cpu() for k, v in self.sum.items()}, "epochs": list(self.epochs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sum = {k: v.clone() for k, v in state.get("sum", {}).items()}
        self.epochs = [int(e) for e in state.get("epochs", [])]


# ------------------------------------------------------------------------------------------------ frozen CLIP
@torch.no_grad()
def template_averaged_embeddings(text_encoder: nn.Module, classnames: Sequence[str],
                                 templates: Sequence[str | Callable[[str], str]]) -> Tensor:
    """PromptSRC's ``fixed_embeddings``: per class, the mean over templates of the unnormalised text features,
    then L2-normalised ``[C, D]`` (float32). ``text_encoder`` is a prompt-free PromptedTextEncoder."""
    names = list(classnames)
    total = None
    for template in templates:
        texts = text_encoder.class_prompts(names, template)
        feats = torch.cat([text_encoder.encode(texts[i : i + TEXT_BATCH_SIZE]).float()
                           for i in range(0, len(texts), TEXT_BATCH_SIZE)])
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


class ZeroShotReference:
    """The frozen CLIP PromptSRC regularises towards: the student's own CLIP without prompts.

    ``fixed_embeddings`` (class embeddings over PromptSRC's templates) are computed once, here; the zero-shot
    image features are computed per batch without gradients. Not an ``nn.Module`` of the Distiller: it holds
    no state of its own (DDP and checkpoints see only the student).
    """

    def __init__(self, student: nn.Module, classnames: Sequence[str],
                 templates: Sequence[str | Callable[[str], str]] | None = None) -> None:
        self.image_encoder = PromptedVisionEncoder(student.image_encoder.visual)  # no prompts, shared weights
        # no prompts over the student's frozen text tower (shared weights)
        self.text_encoder = PromptedTextEncoder(student.text_encoder, student.text_encoder.tokenizer)
        self.logit_scale = student.logit_scale
        self.classnames = list(classnames)
        self.fixed_embeddings = template_averaged_embeddings(
            self.text_encoder, self.classnames, promptsrc_templates() if templates is None else templates)

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_encoder(images), dim=-1)


# ------------------------------------------------------------------------------------------------ the objective
class PromptSRCObjective:
    """A KD part (:class:`~clipkd.methods.kd.KDObjective`: ``WEIGHT * D(teacher || student) + CE_WEIGHT * CE``)
    plus PromptSRC's three self-regularising terms; Gaussian-averaged prompts as the final model.

    Without a teacher (``kd`` None, or its WEIGHT 0) the KD part is CE x ``ce_weight`` alone: PromptSRC as
    published. With one it is KD into PromptSRC as KDPL trains it (its ``PromptSRC_KDPL``: the divergence plus
    L_SCL, CE off) or with CE kept. ``needs_teacher`` / ``needs_labels`` are the KD part's.
    """

    needs_features = True

    def __init__(self, reference: ZeroShotReference, aggregation: GaussianPromptAggregation, *,
                 kd: KDObjective | None = None, ce_weight: float = 1.0, text_weight: float = 25.0,
                 image_weight: float = 10.0) -> None:
        """``kd``: the KD part; None means CE x ``ce_weight`` alone (``ce_weight`` is used only then)."""
        self.reference = reference
        self.aggregation = aggregation
        self.kd = kd if kd is not None else KDObjective(None, 0.0, ce_weight)
        self.text_weight = float(text_weight)
        self.image_weight = float(image_weight)

    @property
    def needs_teacher(self) -> bool:
        return self.kd.needs_teacher

    @property
    def needs_labels(self) -> bool:
        return self.kd.needs_labels

    @property
    def ce_weight(self) -> float:
        return self.kd.ce_weight

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                 features: StudentFeatures | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if features is None:
            raise TrainingError("the PromptSRC objective needs the student's features (Distiller passes them)")
        ref = self.reference
        fixed = ref.fixed_embeddings.to(student_logits.device)
        zs_features = ref.image_features(features.images).float()
        zs_logits = ref.logit_scale * zs_features @ fixed.t()
        loss, terms = self.kd(student_logits, teacher_logits, labels)  # weighted KD + CE, their terms unweighted
        scl = {
            "scl_text": scl_text_loss(features.text_features, fixed),
            "scl_image": scl_image_loss(features.image_features, zs_features),
            "scl_logits": scl_logits_loss(student_logits, zs_logits),
        }
        loss = loss + self.text_weight * scl["scl_text"] + self.image_weight * scl["scl_image"] + scl["scl_logits"]
        return loss, {**terms, **{k: v.detach() for k, v in scl.items()}}  # unweighted, for logging

    def end_epoch(self, epoch: int, student: nn.Module) -> None:
        self.kd.end_epoch(epoch, student)
        self.aggregation.add(epoch, student.trainable_state_dict())

    def final_state(self) -> dict[str, Tensor]:
        return self.aggregation.result()

    def state_dict(self) -> dict[str, Any]:
        return {"gpa": self.aggregation.state_dict(), "kd": self.kd.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.aggregation.load_state_dict(state.get("gpa", {}))
        self.kd.load_state_dict(state.get("kd", {}))

    def __repr__(self) -> str:
        kd = repr(self.kd) or "nothing"
        return (f"PromptSRC: {kd} + L1 text x {self.text_weight:g} + L1 image x {self.image_weight:g} + KL logits, "
                f"GPA over {len(self.aggregation.weights)} epochs")


def build_promptsrc_objective(cfg: CfgNode, student: nn.Module | None = None,
                              classnames: Sequence[str] = ()) -> PromptSRCObjective:
    """DISTILL.OBJECTIVE promptsrc for ``student`` (an IVLP student) trained on ``classnames``; its KD part is
    DISTILL.OBJECTIVE kd's (:func:`~clipkd.methods.kd.build_kd_objective`), teacher-free when DISTILL.WEIGHT is 0."""
    check_promptsrc_config(cfg)
    if student is None or not getattr(student, "own_text_tower", False) or not classnames:
        raise ConfigError("DISTILL.OBJECTIVE promptsrc needs the ivlp student and the training class names "
                          "(build_objective(cfg, student, classnames))")
    p = cfg.PROMPTSRC
    return PromptSRCObjective(
        ZeroShotReference(student, classnames),
        GaussianPromptAggregation(cfg.OPTIM.MAX_EPOCH, p.GPA_MEAN, p.GPA_STD),
        kd=build_kd_objective(cfg), text_weight=p.TEXT_LOSS_WEIGHT, image_weight=p.IMAGE_LOSS_WEIGHT,
    )
