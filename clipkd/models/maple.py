"""MaPLe's student (Khattak et al., CVPR 2023; github muzairkhattak/multimodal-prompt-learning
``trainers/maple.py``): deep text prompts, and vision prompts that are linear projections of them.

Where the prompts go is IVLP's placement (:mod:`clipkd.models.prompts`), so both towers are clipkd's prompted
encoders:

* text: the learned ``ctx`` (n_ctx x text width) replaces token positions 1..n_ctx of ``"<CTX_INIT> <name>."``;
  blocks 1..depth-1 replace those positions with ``compound_prompts_text[i-1]`` (PromptedTextEncoder's ``ctx``
  and ``VPT_shallow``);
* vision: ``proj(ctx)`` is appended after the patch tokens before ``ln_pre``, and blocks 1..depth-1 replace the
  last n_ctx tokens with ``compound_prompt_projections[i-1](compound_prompts_text[i-1])``: the projected prompts
  are handed to PromptedVisionEncoder, which has none of its own.

Where MaPLe differs from IVLP: the vision prompts are not parameters but functions of the text prompts (so the
text prompts also learn from the image tower's gradient), and ``ctx`` initialises from the *first n_ctx* words
of a longer CTX_INIT, the others staying as fixed words: with N_CTX 2 and "a photo of a" the text is
"[ctx0] [ctx1] of a <name>." (PromptedTextEncoder asks for exactly n_ctx words). All depth-1 projections start
from one and the same initial Linear (MaPLe deep-copies one layer).

Sizes: MODEL.PROMPT.N_CTX_TEXT (MaPLe's N_CTX) and MODEL.PROMPT.DEPTH_TEXT (its PROMPT_DEPTH) set both towers; the
vision keys are not read (MaPLe has no vision sizes of its own). Saved under MaPLe's names
(``prompt_learner.ctx``, ``prompt_learner.proj.*``, ``prompt_learner.compound_prompts_text.{i}``,
``prompt_learner.compound_prompt_projections.{i}.*``), so a file its Dassl trainer writes loads here and back.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from clipkd.errors import ConfigError
from clipkd.models.state import KEY_TEXT_CTX
from clipkd.models.student import IVLPStudent

if TYPE_CHECKING:
    from yacs.config import CfgNode

    from clipkd.models.teacher import Teacher

KEY_PROJ = "prompt_learner.proj"
KEY_COMPOUND_TEXT = "prompt_learner.compound_prompts_text.{}"
KEY_COMPOUND_PROJ = "prompt_learner.compound_prompt_projections"
_COMPOUND_RE = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")


class MaPLeStudent(IVLPStudent):
    """Frozen CLIP with MaPLe's coupled prompts; text features as the IVLP student's (cached in eval mode)."""

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        *,
        n_ctx: int = 2,
        depth: int = 9,
        ctx_init: str = "a photo of a",
    ) -> None:
        if n_ctx < 1 or depth < 1:
            raise ConfigError(f"MaPLe needs at least one prompt token and depth 1 (got MODEL.PROMPT.N_CTX_TEXT "
                              f"{n_ctx}, MODEL.PROMPT.DEPTH_TEXT {depth})")
        vision_layers = len(clip_model.visual.transformer.resblocks)
        if depth > vision_layers:
            raise ConfigError(f"MODEL.PROMPT.DEPTH_TEXT {depth} exceeds the {vision_layers} blocks of this model's "
                              "image transformer, where MaPLe puts the projected prompts; set it to at most "
                              f"{vision_layers}")
        super().__init__(clip_model, tokenizer, n_ctx_text=n_ctx, n_ctx_vision=0, depth_text=depth,
                         depth_vision=0, ctx_init=ctx_init)
        text = self.text_encoder
        vision_width = self.image_encoder.width
        like = text.positional_embedding
        self.proj = nn.Linear(text.width, vision_width).to(device=like.device, dtype=like.dtype)
        layer = nn.Linear(text.width, vision_width).to(device=like.device, dtype=like.dtype)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(layer) for _ in range(depth - 1)])

    @classmethod
    def from_clip(cls, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                  prompt: CfgNode, teacher: Teacher | None) -> MaPLeStudent:
        return cls(clip_model, tokenizer, n_ctx=prompt.N_CTX_TEXT, depth=prompt.DEPTH_TEXT, ctx_init=prompt.CTX_INIT)

    def vision_prompts(self) -> list[torch.Tensor]:
        """The prompts of image blocks 0..depth-1: MaPLe's coupling functions applied to the text prompts."""
        text = self.text_encoder
        deep = [layer(text.VPT_shallow[str(i + 1)]) for i, layer in enumerate(self.compound_prompt_projections)]
        return [self.proj(text.ctx), *deep]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images, self.vision_prompts()), dim=-1)

    # -------------------------------------------------------------------------------------- state under MaPLe's names
    def _trainable_targets(self) -> dict[str, torch.Tensor]:
        text = self.text_encoder
        out: dict[str, torch.Tensor] = {KEY_TEXT_CTX: text.ctx}
        out.update({f"{KEY_PROJ}.{k}": v for k, v in self.proj.named_parameters()})
        out.update({KEY_COMPOUND_TEXT.format(int(i) - 1): p for i, p in text.VPT_shallow.items()})
        out.update({f"{KEY_COMPOUND_PROJ}.{k}": v for k, v in self.compound_prompt_projections.named_parameters()})
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything training changes, under the names MaPLe's Dassl trainer saves them (detached)."""
        return {k: v.detach() for k, v in self._trainable_targets().items()}

    def _size_hint(self, state_dict: Mapping[str, torch.Tensor]) -> str:
        ctx = state_dict.get(KEY_TEXT_CTX)
        if not isinstance(ctx, torch.Tensor) or ctx.dim() != 2:
            return ""
        depth = 1 + sum(1 for k in state_dict if _COMPOUND_RE.match(k))
        if (ctx.shape[0], depth) == (self.text_encoder.n_ctx, self.text_encoder.depth):
            return ""
        return f"; the file's prompts are MODEL.PROMPT.N_CTX_TEXT {ctx.shape[0]} MODEL.PROMPT.DEPTH_TEXT {depth}"
