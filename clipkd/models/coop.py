"""CoOp (Zhou et al., IJCV 2022) and KgCoOp (Yao et al., CVPR 2023) students: a learnable text context in front of
the class name, everything else frozen (checked side by side against ``KaiyangZhou/CoOp`` trainers/coop.py and
``htyao89/KgCoOp`` trainers/kgcoop.py).

CoOp's class prompt is ``[SOS] ctx_1 .. ctx_n <class name> . [EOS]`` (class token at the end, one context shared
by all classes: CoOp's ``CLASS_TOKEN_POSITION end``, ``CSC False``), run through CLIP's frozen text tower; the
image tower is CLIP's, untouched. That is an IVLP text tower of depth 1 with no visual prompts, so the student is
:class:`~clipkd.models.student.IVLPStudent` with those sizes: the same code path, and its one learnable tensor is
saved as CoOp's ``prompt_learner.ctx``. It reads MODEL.PROMPT.N_CTX_TEXT and MODEL.PROMPT.CTX_INIT only (the
other MODEL.PROMPT sizes are not used).

Files: CoOp's Dassl trainer saves the prompt learner module alone (``prompt_learner/model.pth.tar-N`` holds
``ctx``, ``token_prefix``, ``token_suffix``; KgCoOp's also its never-trained ``bias_vectors`` and ``meta_net.*``).
Such a file loads here under ``prompt_learner.*`` with the class-dependent and never-trained tensors dropped;
clipkd's file is ``{"prompt_learner.ctx": ...}``, which CoOp's CustomCLIP loads as it is and its PromptLearner
loads with the ``prompt_learner.`` prefix removed.

KgCoOp adds, to the same student, the frozen hand-crafted class embeddings it pulls the learned ones towards:
CLIP's text features of the dataset's CoOp template (e.g. ``"a photo of a {}, a type of pet."``), L2-normalised
(:meth:`KgCoOpStudent.handcrafted_text_features`; its loss is :mod:`clipkd.methods.kgcoop`). KgCoOp computes them
with a second, fp16 copy of CLIP; here the student's own frozen text tower runs without the context, in its
weights' precision (the same network; fp32 on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from clipkd.errors import ConfigError
from clipkd.models.prompts import PromptedTextEncoder
from clipkd.models.state import KEY_TEXT_CTX
from clipkd.models.student import IVLPStudent

if TYPE_CHECKING:
    from yacs.config import CfgNode

    from clipkd.models.teacher import Teacher

# What CoOp's Dassl trainer names its one saved module; its file's keys are relative to it.
DASSL_MODULE = "prompt_learner."
# Tensors of KgCoOp's prompt learner that are never trained (only names containing "ctx" are): random at build,
# saved in its files, never read.
UNTRAINED_KEYS = ("prompt_learner.bias_vectors", "prompt_learner.meta_net.")


class CoOpStudent(IVLPStudent):
    """CoOp: a learnable context of N_CTX_TEXT tokens before the class name, CLIP's towers frozen."""

    # Declared here, not only inherited, so the config reads them from this file without importing torch.
    needs_teacher = False
    own_text_tower = True
    min_images_per_process = 0

    def __init__(self, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor], *,
                 n_ctx: int = 4, ctx_init: str = "a photo of a") -> None:
        if n_ctx < 1:
            raise ConfigError(f"MODEL.PROMPT.N_CTX_TEXT is {n_ctx} but a CoOp student learns its text context: "
                              "set it to at least 1 (CoOp's base-to-new runs use 4, with CTX_INIT \"a photo of a\")")
        words = len(ctx_init.replace("_", " ").split())
        if words and words != n_ctx:  # CoOp takes its context length from CTX_INIT's words, never fewer
            raise ConfigError(f"MODEL.PROMPT.CTX_INIT '{ctx_init}' is {words} words but MODEL.PROMPT.N_CTX_TEXT is "
                              f"{n_ctx}; CoOp's context is as long as its init phrase: set N_CTX_TEXT {words}, or "
                              "CTX_INIT \"\" for randomly initialised context")
        super().__init__(clip_model, tokenizer, n_ctx_text=n_ctx, n_ctx_vision=0, depth_text=1, depth_vision=0,
                         ctx_init=ctx_init)

    @classmethod
    def from_clip(cls, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                  prompt: CfgNode, teacher: Teacher | None) -> CoOpStudent:
        return cls(clip_model, tokenizer, n_ctx=prompt.N_CTX_TEXT, ctx_init=prompt.CTX_INIT)

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], *,
                                  source: str = "the student checkpoint",
                                  ignore_frozen_clip_weights: bool = False) -> None:
        """As :meth:`Student.load_trainable_state_dict`, also for CoOp's / KgCoOp's Dassl files (keys relative to
        the prompt learner); with ``ignore_frozen_clip_weights`` (a reference file), KgCoOp's never-trained
        tensors are skipped as well."""
        sd = dict(state_dict)
        if sd and not any(k.startswith(DASSL_MODULE) for k in sd) and KEY_TEXT_CTX[len(DASSL_MODULE):] in sd:
            sd = {DASSL_MODULE + k: v for k, v in sd.items()}
        if ignore_frozen_clip_weights:
            sd = {k: v for k, v in sd.items() if not k.startswith(UNTRAINED_KEYS)}
        super().load_trainable_state_dict(sd, source=source, ignore_frozen_clip_weights=ignore_frozen_clip_weights)


class KgCoOpStudent(CoOpStudent):
    """CoOp plus the frozen hand-crafted class embeddings KgCoOp regularises the learned ones towards."""

    objectives = ("kgcoop",)
    objectives_reason = "it is CoOp trained with KgCoOp's knowledge-guided term; for CoOp without it use coop"

    def __init__(self, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor], *,
                 n_ctx: int = 4, ctx_init: str = "a photo of a") -> None:
        super().__init__(clip_model, tokenizer, n_ctx=n_ctx, ctx_init=ctx_init)
        self._handcrafted: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def handcrafted_text_features(self, classnames: Sequence[str], template: str) -> torch.Tensor:
        """KgCoOp's ``ori_embedding``: the frozen CLIP's L2-normalised text features of ``template`` filled with
        each class name ``[C, D]`` (float32), through this student's own text tower run without the context."""
        key = (tuple(classnames), template, self.device)
        if key not in self._handcrafted:
            plain = PromptedTextEncoder(self.text_encoder, self.text_encoder.tokenizer)  # shared, frozen weights
            texts = plain.class_prompts(list(classnames), template)
            self._handcrafted = {key: F.normalize(plain.encode(texts).float(), dim=-1)}
        return self._handcrafted[key]
