"""CLIP models for distillation: factory (open_clip + weights), IVLP prompts, frozen teacher, students.

open_clip is imported lazily (only when a model is built), so importing this package stays cheap.
"""

from clipkd.models.factory import create_clip, image_size, register_model_configs, uses_quick_gelu
from clipkd.models.prompts import (
    PromptedTextEncoder,
    PromptedVisionEncoder,
    ivlp_state_dict,
    load_ivlp_state_dict,
)
from clipkd.models.state import read_prompt_checkpoint
from clipkd.models.student import (
    IVLPStudent,
    Projector,
    PromptKDStudent,
    Student,
    build_student,
)
from clipkd.models.teacher import Teacher, build_teacher, ensemble_templates, templates_for, zero_shot_clip
from clipkd.models.zeroshot import build_zero_shot

__all__ = [
    "IVLPStudent",
    "Projector",
    "PromptKDStudent",
    "PromptedTextEncoder",
    "PromptedVisionEncoder",
    "Student",
    "Teacher",
    "build_student",
    "build_teacher",
    "build_zero_shot",
    "create_clip",
    "ensemble_templates",
    "image_size",
    "ivlp_state_dict",
    "load_ivlp_state_dict",
    "read_prompt_checkpoint",
    "register_model_configs",
    "templates_for",
    "uses_quick_gelu",
    "zero_shot_clip",
]
