"""The frozen teacher: zero-shot CLIP (one template or CLIP's 80-template ensemble) or an IVLP-prompted CLIP.

The teacher never changes, so its class embeddings are computed once per class list and reused by every
training and test batch (the reference code recomputed them per batch, PromptKD issue #33; with a ViT-L/14
teacher this makes a training step 1.6x faster at 100 classes and 7x at 1000, benchmarks/README.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from clipkd.config.defaults import ZERO_SHOT  # noqa: F401 - re-exported: MODEL.TEACHER.CHECKPOINT "zero-shot"
from clipkd.data.specs import get_spec
from clipkd.errors import ConfigError, ModelError
from clipkd.models.factory import create_clip
from clipkd.models.prompts import (
    PromptedTextEncoder,
    PromptedVisionEncoder,
    load_ivlp_state_dict,
)
from clipkd.models.state import infer_ivlp_sizes, read_prompt_checkpoint, resolve_checkpoint_file
from clipkd.registry import TEMPLATES

if TYPE_CHECKING:
    from yacs.config import CfgNode

Template = str | Callable[[str], str]
LOGIT_SCALE_MAX = 100.0  # CLIP clamps exp(logit_scale) at 100


def clip_logit_scale(clip_model: nn.Module) -> float:
    """CLIP's exp(logit_scale), clamped at 100 as CLIP does (about 100 for trained CLIP)."""
    return float(clip_model.logit_scale.detach().float().exp().clamp(max=LOGIT_SCALE_MAX).reshape(-1)[0])


def ensemble_templates(cfg: CfgNode | None = None, template: str | None = None) -> tuple[Callable[[str], str], ...]:
    """MODEL.TEACHER.TEMPLATES ensemble: CLIP's 80 ImageNet prompt templates (the usual zero-shot ensemble);
    the arguments, which the dataset's template needs, are not used."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(OPENAI_IMAGENET_TEMPLATES)


def photo_template(cfg: CfgNode | None = None, template: str | None = None) -> tuple[str, ...]:
    """MODEL.TEACHER.TEMPLATES photo: "a photo of a {}." for every dataset (KDPL-CA's teacher prompt, which must
    not name the dataset's domain); the arguments are not used."""
    return ("a photo of a {}.",)


class Teacher(nn.Module):
    """Frozen CLIP teacher with cached class embeddings.

    Modes: ``template`` (one template, e.g. the dataset's CoOp template), ``ensemble`` (several templates:
    mean of the normalised per-template features, renormalised), or ``prompted`` (IVLP prompts in both towers,
    from a PromptSRC-named state dict; sizes are read from the state dict itself).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        *,
        templates: Sequence[Template] = ("a photo of a {}.",),
        prompts: Mapping[str, torch.Tensor] | None = None,
        prompts_source: str = "the teacher's prompt checkpoint",
        text_batch_size: int = 256,
    ) -> None:
        super().__init__()
        if prompts:
            sizes = infer_ivlp_sizes(prompts, source=prompts_source)
            for tower, blocks in (("vision", clip_model.visual.transformer.resblocks),
                                  ("text", clip_model.transformer.resblocks if hasattr(clip_model, "transformer")
                                   else clip_model.text.transformer.resblocks)):
                if sizes[f"depth_{tower}"] > len(blocks):
                    raise ModelError(
                        f"{prompts_source} has {tower} prompts for {sizes[f'depth_{tower}']} blocks but the teacher's "
                        f"{tower} transformer has {len(blocks)}; MODEL.TEACHER.NAME must be the architecture "
                        "the prompts were trained on"
                    )
            self.mode = "prompted"
            self.templates: tuple[Template, ...] = ()
        else:
            sizes = {"n_ctx_text": 0, "depth_text": 0, "n_ctx_vision": 0, "depth_vision": 0}
            if not templates:
                raise ModelError("a zero-shot teacher needs at least one prompt template")
            self.templates = tuple(templates)
            self.mode = "template" if len(self.templates) == 1 else "ensemble"
        self.image_encoder = PromptedVisionEncoder(clip_model.visual, sizes["n_ctx_vision"], sizes["depth_vision"])
        self.text_encoder = PromptedTextEncoder(clip_model, tokenizer, sizes["n_ctx_text"], sizes["depth_text"])
        if prompts:
            load_ivlp_state_dict(self, prompts, source=prompts_source)
        self._logit_scale = clip_logit_scale(clip_model)
        self.text_batch_size = int(text_batch_size)
        self._cache: dict[tuple, torch.Tensor] = {}
        self.requires_grad_(False)
        super().train(False)

    # ---------------------------------------------------------------- common interface
    @property
    def logit_scale(self) -> float:
        return self._logit_scale

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.output_dim

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def train(self, mode: bool = True) -> Teacher:
        """The teacher is frozen: it stays in eval mode whatever the trainer asks."""
        return super().train(False)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]``."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """L2-normalised class embeddings ``[C, D]``, computed once per class list and cached."""
        key = (tuple(classnames), self.mode)
        feats = self._cache.get(key)
        if feats is None or feats.device != self.device:
            feats = self._compute_text_features(list(classnames))
            self._cache[key] = feats
        return feats

    def clear_cache(self) -> None:
        self._cache.clear()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing of the teacher is trained."""
        return {}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        if state_dict:
            raise ModelError(f"the teacher has no trainable tensors; unexpected keys: {', '.join(state_dict)}")

    # ---------------------------------------------------------------- internals
    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        chunks = [
            self.text_encoder(self.text_encoder.tokenize(texts[i : i + self.text_batch_size]))
            for i in range(0, len(texts), self.text_batch_size)
        ]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    @torch.no_grad()
    def _compute_text_features(self, classnames: list[str]) -> torch.Tensor:
        if not classnames:
            raise ModelError("text_features needs at least one class name")
        if self.mode == "prompted":
            return self._encode(self.text_encoder.class_prompts(classnames))
        # All templates in one pass (chunked), then CLIP's ensembling: mean of unit vectors, renormalised.
        texts = [t for template in self.templates for t in self.text_encoder.class_prompts(classnames, template)]
        per_template = self._encode(texts).view(len(self.templates), len(classnames), -1)
        return F.normalize(per_template.mean(dim=0), dim=-1)


# ------------------------------------------------------------------------------------------------ builders
def dataset_templates(cfg: CfgNode, template: str | None = None) -> tuple[Template, ...]:
    """MODEL.TEACHER.TEMPLATES dataset: ``template``, else DATASET.NAME's (its CoOp template)."""
    if template is None:
        if not cfg.DATASET.NAME:
            raise ConfigError("MODEL.TEACHER.TEMPLATES 'dataset' needs DATASET.NAME (or an explicit template)")
        template = get_spec(cfg.DATASET.NAME).template
    return (template,)


def templates_for(cfg: CfgNode, template: str | None = None) -> tuple[Template, ...]:
    """The templates MODEL.TEACHER.TEMPLATES names, from its registered function (``clipkd.registry.TEMPLATES``)."""
    return tuple(TEMPLATES.entrypoint(cfg.MODEL.TEACHER.TEMPLATES)(cfg, template))


def zero_shot_clip(name: str, pretrained: str, templates: Sequence[Template], *, quick_gelu: bool = False,
                   device: str | torch.device = "cpu", config_key: str = "MODEL.TEACHER.PRETRAINED") -> Teacher:
    """A frozen CLIP that classifies with its own text tower over ``templates``."""

    clip_model, tokenizer = create_clip(name, pretrained, quick_gelu=quick_gelu, device=device,
                                        config_key=config_key)
    return Teacher(clip_model, tokenizer, templates=templates)


def build_teacher(cfg: CfgNode, template: str | None = None, *, device: str | torch.device = "cpu") -> Teacher:
    """The teacher that ``cfg.MODEL.TEACHER`` describes: prompted when it names a ``CHECKPOINT``, else zero-shot
    with ``TEMPLATES`` (the dataset template ``template``, else DATASET.NAME's, or CLIP's ensemble)."""

    t = cfg.MODEL.TEACHER
    if t.CHECKPOINT in ("", ZERO_SHOT):  # no prompts: zero-shot with the templates
        return zero_shot_clip(t.NAME, t.PRETRAINED, templates_for(cfg, template), quick_gelu=t.QUICK_GELU,
                              device=device)
    # The file (or folder) is read without running code from it; only its prompt tensors are used: frozen CLIP
    # weights a Dassl file carries are ignored (they come from PRETRAINED), class-dependent buffers dropped,
    # and every prompt must have the shape the teacher's CLIP gives it (mismatches are named).
    path = resolve_teacher_checkpoint(cfg)
    prompts = read_prompt_checkpoint(path)
    student_keys = [k for k in prompts if k.startswith(("VPT_image_trans.", "projector."))]
    if student_keys:
        raise ModelError(f"MODEL.TEACHER.CHECKPOINT {path} holds a PromptKD student (projector "
                         f"{student_keys[0]}, ...), not a teacher's prompts; evaluate it with clipkd eval "
                         "--checkpoint, or point MODEL.TEACHER.CHECKPOINT at an IVLP/PromptSRC teacher")
    clip_model, tokenizer = create_clip(t.NAME, t.PRETRAINED, quick_gelu=t.QUICK_GELU, device=device,
                                        config_key="MODEL.TEACHER.PRETRAINED")
    if not t.PRETRAINED:
        warnings.warn("MODEL.TEACHER.CHECKPOINT is set but MODEL.TEACHER.PRETRAINED is empty: the prompts will run "
                      "on a randomly initialised CLIP", stacklevel=2)
    return Teacher(clip_model, tokenizer, prompts=prompts, prompts_source=f"checkpoint {path}")


def teacher_description(cfg: CfgNode) -> str:
    """What results.json records as the teacher: "zero-shot" or "prompted: <checkpoint>"."""
    ckpt = cfg.MODEL.TEACHER.CHECKPOINT
    return f"prompted: {ckpt}" if ckpt and ckpt != ZERO_SHOT else "zero-shot"


def resolve_teacher_checkpoint(cfg: CfgNode) -> Path:
    """The file MODEL.TEACHER.CHECKPOINT names: a checkpoint file (clipkd ``model.pt``, Dassl
    ``model-best.pth.tar`` / ``model.pth.tar-N``), a clipkd run folder, a Dassl ``VLPromptLearner`` folder (or
    the output folder above it), or PromptKD's teacher root ``<root>/<DatasetName>/VLPromptLearner/`` with
    DatasetName from DATASET.NAME (e.g. OxfordPets). See :func:`clipkd.models.state.resolve_checkpoint_file`."""

    return resolve_checkpoint_file(cfg.MODEL.TEACHER.CHECKPOINT, dataset=cfg.DATASET.NAME or None,
                                   key="MODEL.TEACHER.CHECKPOINT")
