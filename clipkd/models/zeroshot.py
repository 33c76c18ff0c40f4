"""Zero-shot CLIP rows: the configured teacher, or the student's CLIP with its own text tower.

One builder serves the demo's zero-shot rows and ``clipkd eval --zero-shot teacher|student``: before it, the
zero-shot "student" was a PromptKD student with random prompts and a random projector, which is not a
zero-shot model at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clipkd.models.teacher import Teacher, build_teacher, templates_for, zero_shot_clip

if TYPE_CHECKING:
    from yacs.config import CfgNode

ROLES = ("teacher", "student")


def build_zero_shot(cfg: CfgNode, role: str, template: str | None = None, *,
                    device: str | torch.device = "cpu") -> Teacher:
    """``teacher``: the teacher the config describes (prompted if MODEL.TEACHER.CHECKPOINT is set);
    ``student``: the student's CLIP (MODEL.STUDENT.NAME / PRETRAINED) zero-shot, with the teacher's templates."""
    if role == "teacher":
        return build_teacher(cfg, template, device=device)
    if role != "student":
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    s = cfg.MODEL.STUDENT
    return zero_shot_clip(s.NAME, s.PRETRAINED, templates_for(cfg, template), quick_gelu=s.QUICK_GELU,
                          device=device, config_key="MODEL.STUDENT.PRETRAINED")
