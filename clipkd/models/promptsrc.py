"""PromptSRC's student (Khattak et al., ICCV 2023): the IVLP prompted CLIP trained with PromptSRC's
self-regularisation (MODEL.STUDENT.TYPE promptsrc).

PromptSRC's ``CustomCLIP`` is IVLP's network (deep prompts in both towers, its own text tower; PromptSRC's
``trainers/promptsrc.py``): what makes it PromptSRC is the loss (the L_SCL terms) and the Gaussian prompt
aggregation, which live in the objective (:mod:`clipkd.methods.promptsrc`, DISTILL.OBJECTIVE promptsrc), so the
PromptKD teachers it trains and this student share one implementation. The class is therefore thin: the IVLP
student, declaring that it trains with that objective (a run of this type with another objective would be IVLP
by another name, so the config refuses it and says to use MODEL.STUDENT.TYPE ivlp). Its saved keys are
PromptSRC's own (``prompt_learner.ctx``, ``image_encoder.VPT``, ``*.VPT_shallow``), as IVLP's already are.
"""

from __future__ import annotations

from clipkd.models.student import IVLPStudent


class PromptSRCStudent(IVLPStudent):
    """The IVLP student whose training objective is PromptSRC's (with or without a teacher's KD term)."""

    own_text_tower = True  # said here too, so the config reads it from this file without importing torch
    objectives = ("promptsrc",)
    objectives_reason = ("it is IVLP trained with PromptSRC's self-regularisation; for IVLP without it use "
                         "MODEL.STUDENT.TYPE ivlp")
