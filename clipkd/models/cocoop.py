"""CoCoOp's student (Zhou et al., CVPR 2022): CoOp's learnable context plus a meta-net that shifts it per image.

Every class prompt is ``"<ctx words> <name>."``; the context tokens of image ``b`` are ``ctx + meta_net(f_b)``
(``f_b`` its L2-normalised image feature; meta-net Linear(D, D // 16) -> ReLU -> Linear(D // 16, width), the same
bias added to every context token). So the class features depend on the image: the text tower runs once per
(image, class) pair, ``B x C`` prompts a batch, which the student batches in chunks of ``prompts_per_pass`` rows
(not a loop over images). It is a *conditional* student (``conditional = True``): the Distiller and evaluation
classify with :meth:`CoCoOpStudent.conditional_text_features` (``[B, C, D]``), logits
``scale * <f_b, t_bc>``. Its ``text_features`` is the unshifted context's (what the prompts are without an image).

Saved names are CoCoOp's CustomCLIP names: ``prompt_learner.ctx``, ``prompt_learner.meta_net.linear{1,2}.*``.
The file CoCoOp's Dassl trainer writes (``prompt_learner/model.pth.tar-N``: the PromptLearner's own state dict,
``ctx``, ``meta_net.*``, ``token_prefix``, ``token_suffix``) loads too; its class-dependent token buffers are
rebuilt from the class names, as CoCoOp's own ``load_model`` does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from clipkd.errors import ConfigError
from clipkd.models.prompts import PromptedTextEncoder, PromptedVisionEncoder
from clipkd.models.state import KEY_TEXT_CTX
from clipkd.models.student import Student
from clipkd.models.teacher import Teacher, clip_logit_scale

if TYPE_CHECKING:
    from yacs.config import CfgNode

META_NET_KEY = "prompt_learner.meta_net"  # CoCoOp's PromptLearner.meta_net inside its CustomCLIP
# CoCoOp's Dassl file is the PromptLearner's state dict: its keys lack CustomCLIP's "prompt_learner." prefix.
_DASSL_BARE_KEYS = ("ctx", "meta_net.", "token_prefix", "token_suffix")


class CoCoOpStudent(Student):
    """Frozen CLIP, learnable text context (depth 1, CoOp's) and CoCoOp's meta-net on the image features."""

    own_text_tower = True
    conditional = True
    # Rows (image, class prompts) per text-tower pass: bounds evaluation's memory (training keeps every row's
    # activations for backward whatever the chunk; the run log prints that estimate).
    prompts_per_pass = 512

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        *,
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        prompts_per_pass: int | None = None,
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ConfigError(f"the cocoop student shifts its context tokens per image: it needs "
                              f"MODEL.PROMPT.N_CTX_TEXT >= 1 (got {n_ctx}); CoCoOp's is 4")
        self.image_encoder = PromptedVisionEncoder(clip_model.visual)  # no visual prompts: open_clip's forward
        self.text_encoder = PromptedTextEncoder(clip_model, tokenizer, n_ctx, 1, ctx_init)
        vis_dim, width = self.image_encoder.output_dim, self.text_encoder.width
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(vis_dim // 16, width)),
        ])).to(device=self.device, dtype=self.image_encoder.visual.class_embedding.dtype)
        if prompts_per_pass is not None:
            self.prompts_per_pass = int(prompts_per_pass)
        self._logit_scale = clip_logit_scale(clip_model)
        self._tokens: tuple[tuple[str, ...], torch.Tensor] | None = None

    @classmethod
    def from_clip(cls, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                  prompt: CfgNode, teacher: Teacher | None) -> CoCoOpStudent:
        return cls(clip_model, tokenizer, n_ctx=prompt.N_CTX_TEXT, ctx_init=prompt.CTX_INIT)

    def _trainable_modules(self) -> dict[str, nn.Module]:
        return {META_NET_KEY: self.meta_net}

    def _rename_legacy(self, state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """CoCoOp's Dassl file (the PromptLearner's bare keys) under CustomCLIP's names."""
        if not any(k.startswith(_DASSL_BARE_KEYS) for k in state_dict) or KEY_TEXT_CTX in state_dict:
            return super()._rename_legacy(state_dict, source)
        return {(f"prompt_learner.{k}" if k.startswith(_DASSL_BARE_KEYS) else k): v for k, v in state_dict.items()}

    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """L2-normalised ``[C, D]`` of the prompts with the unshifted context (no image: no meta-net bias)."""
        return F.normalize(self.text_encoder(self._class_tokens(classnames)), dim=-1)

    def _class_tokens(self, classnames: Sequence[str]) -> torch.Tensor:
        names = tuple(classnames)
        if self._tokens is None or self._tokens[0] != names or self._tokens[1].device != self.device:
            self._tokens = (names, self.text_encoder.tokenize(self.text_encoder.class_prompts(list(names))))
        return self._tokens[1]

    def context(self, image_features: torch.Tensor) -> torch.Tensor:
        """Each image's context tokens ``[B, n_ctx, width]``: ``ctx + meta_net(f_b)``."""
        bias = self.meta_net(image_features.to(self.text_encoder.ctx.dtype))
        return self.text_encoder.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def conditional_text_features(self, image_features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """L2-normalised ``[B, C, D]``: class ``c``'s prompt with image ``b``'s context, all ``B x C`` prompts
        through the text tower in chunks of :attr:`prompts_per_pass` rows."""
        tokens = self._class_tokens(classnames)
        ctx = self.context(image_features)
        b, c = ctx.shape[0], tokens.shape[0]
        rows_tokens = tokens.repeat(b, 1)  # row b*C + c: class c
        rows_ctx = ctx.repeat_interleave(c, dim=0)  # row b*C + c: image b
        step = max(1, self.prompts_per_pass)
        feats = [self.text_encoder(rows_tokens[i:i + step], rows_ctx[i:i + step])
                 for i in range(0, b * c, step)]
        return F.normalize(torch.cat(feats), dim=-1).view(b, c, -1)

    def setup_lines(self, batch_size: int, n_classes: int) -> list[str]:
        """The cost of CoCoOp's per-image text pass: a rough estimate of the text tower's activations that
        training keeps for backward (``B x C`` prompts), in fp32 (about half under 16-bit autocast)."""
        enc = self.text_encoder
        blocks = enc.transformer.resblocks
        length, width = int(enc.positional_embedding.shape[0]), enc.width
        heads = int(getattr(blocks[0].attn, "num_heads", 1))
        rows = batch_size * n_classes
        # per prompt, block and token: ~10 width-sized vectors (norm inputs, qkv, attention output, the MLP's 4x
        # hidden before and after its activation) plus the attention weights (heads x length, twice); within a few
        # percent of the tensors autograd saves for ViT-B/16's text tower (fp32, CPU, counted with saved-tensor hooks)
        values = rows * len(blocks) * length * (10 * width + 2 * heads * length)
        gib = values * 4 / 2**30
        return [f"{type(self).__name__}: one text pass per (image, class): {batch_size} images x {n_classes} "
                f"classes = {rows:,} prompts a training step, ~{gib:.2f} GiB of text-tower activations kept for "
                f"backward (fp32; about half under 16-bit autocast); evaluation runs them {self.prompts_per_pass} "
                "prompts at a time"]
