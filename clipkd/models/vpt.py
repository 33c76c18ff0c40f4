"""VPT's student (multimodal-prompt-learning ``trainers/vpt.py``): deep visual prompts in the image tower, and the
CLIP's own frozen text tower reading one hand-crafted prompt, ``"a photo of a <class name>."``.

The visual prompts are placed exactly as IVLP / PromptSRC place them (the reference builds them with the same
``ResidualAttentionBlock_IVLP`` code), so :class:`~clipkd.models.prompts.PromptedVisionEncoder` is reused as is and
the checkpoint keys are the reference's: ``image_encoder.VPT`` and
``image_encoder.transformer.resblocks.{i}.VPT_shallow`` (i = 1..depth-1), the names of the ``VPT`` parameters of the
whole CustomCLIP that VPT's Dassl trainer registers (as ``prompt_learner``) and saves. The text features never
change, so they are computed once per class list and cached: a training step costs only the image tower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from clipkd.errors import ConfigError, ModelError
from clipkd.models.prompts import PromptedTextEncoder, PromptedVisionEncoder
from clipkd.models.student import Student
from clipkd.models.teacher import Teacher, clip_logit_scale

if TYPE_CHECKING:
    from yacs.config import CfgNode

# VPT's FixedEmbeddings: the prompt is "a photo of a" + " " + name + "." (its CTX_INIT setting is not read).
VPT_TEMPLATE = "a photo of a {}."


class VPTStudent(Student):
    """Frozen CLIP with learnable deep visual prompts; classes are the frozen text tower's ``"a photo of a {}."``.

    ``text_features`` is cached per class list (and device) in every mode: nothing the optimizer touches feeds it.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        *,
        n_ctx: int = 8,
        depth: int = 12,
        template: str = VPT_TEMPLATE,
        text_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.image_encoder = PromptedVisionEncoder(clip_model.visual, n_ctx, depth)
        if not self.image_encoder.has_prompts:
            raise ConfigError(
                f"MODEL.STUDENT.TYPE vpt learns only its visual prompts, and N_CTX_VISION {n_ctx} / DEPTH_VISION "
                f"{depth} gives none; set MODEL.PROMPT.N_CTX_VISION and MODEL.PROMPT.DEPTH_VISION to at least 1 "
                "(VPT's published values: 8 and 12)"
            )
        self.text_encoder = PromptedTextEncoder(clip_model, tokenizer)  # no prompts: open_clip's own forward
        self.template = template
        self.text_batch_size = int(text_batch_size)
        self._logit_scale = clip_logit_scale(clip_model)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_clip(cls, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                  prompt: CfgNode, teacher: Teacher | None) -> VPTStudent:
        return cls(clip_model, tokenizer, n_ctx=prompt.N_CTX_VISION, depth=prompt.DEPTH_VISION)

    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """L2-normalised ``[C, D]`` frozen features of ``"a photo of a <name>."``, computed once per class list."""
        key = (tuple(classnames), self.device)
        feats = self._text_cache.get(key)
        if feats is None:
            feats = self._encode_classes(list(classnames))
            self._text_cache = {key: feats}  # keep only the latest class list (base, then new at evaluation)
        return feats

    @torch.no_grad()
    def _encode_classes(self, classnames: list[str]) -> torch.Tensor:
        if not classnames:
            raise ModelError("text_features needs at least one class name")
        texts = self.text_encoder.class_prompts(classnames, self.template)
        chunks = [self.text_encoder.encode(texts[i: i + self.text_batch_size])
                  for i in range(0, len(texts), self.text_batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=-1)
