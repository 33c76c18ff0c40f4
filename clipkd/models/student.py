"""The Student base class and the first two students, PromptKD's (prompted image encoder + projector into the
teacher's space) and IVLP (prompts in both towers, its own text encoder), plus the cfg builder of any student (the
others have a module each: coop, cocoop, vpt, maple, promptsrc; ``build_teacher`` lives with the Teacher).

Every model here (and :class:`~clipkd.models.teacher.Teacher`) offers the interface a trainer needs:
``image_features(images)`` (L2-normalised ``[B, D]``), ``text_features(classnames)`` (L2-normalised
``[C, D]``), ``logit_scale`` (float), ``trainable_state_dict()`` / ``load_trainable_state_dict(sd)``, and a
``train()`` that leaves frozen CLIP parts in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from clipkd.errors import ConfigError, ModelError
from clipkd.models.factory import create_clip
from clipkd.models.prompts import (
    PromptedTextEncoder,
    PromptedVisionEncoder,
    ivlp_prompt_parameters,
    ivlp_state_dict,
)
from clipkd.models.state import copy_state_strict, infer_ivlp_sizes, prompt_keys
from clipkd.models.teacher import Teacher, clip_logit_scale
from clipkd.registry import STUDENTS

if TYPE_CHECKING:
    from yacs.config import CfgNode

ClassEmbedder = Callable[[Sequence[str]], torch.Tensor]
# Where PromptKD's student keeps its projector (Feature_Trans_Module_two_layer's Sequential ``conv1``): the
# projector's checkpoint keys are VPT_image_trans.conv1.{0,1,3}.* (0 = Conv 1x1, 1 = BatchNorm, 3 = Conv 1x1).
PROJECTOR_KEY = "VPT_image_trans.conv1"


def tensor_versions(tensors: Iterable[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """A key that changes whenever one of ``tensors`` is changed in place or replaced: torch's in-place version
    counter and the storage address of each (what an eval-mode cache of values computed from them is keyed on)."""
    return tuple((t._version, t.data_ptr()) for t in tensors)


class Projector(nn.Module):
    """PromptKD's feature projector: Conv1x1 -> BatchNorm -> ReLU -> Conv1x1 on a ``[B, C, 1, 1]`` view.

    ``hidden_dim`` defaults to ``out_dim`` (the teacher's embedding size): with ViT-B/16 -> ViT-L/14
    (512 -> 768 -> 768) this gives the ~1.01M trainable parameters PromptKD reports together with the visual
    prompts. BatchNorm needs more than one image per batch in train mode.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = int(hidden_dim or out_dim)
        self.layers = nn.Sequential(
            nn.Conv2d(in_dim, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x[:, :, None, None]).flatten(1)


class Student(nn.Module):
    """Shared parts of the students, and what each declares to the code that builds and trains it.

    A student class is what ``clipkd.registry.STUDENTS`` names; the run asks the class (never the name) what it
    needs: ``needs_teacher`` with ``needs_teacher_reason`` (the teacher is built even without distillation, e.g.
    as the classifier), ``own_text_tower`` (it learns its own class embeddings, as PromptSRC's objective
    requires), ``min_images_per_process`` with ``min_images_reason`` (the smallest per-process batch a training
    step takes; 0: no minimum), ``conditional`` (its class features depend on the image, as CoCoOp's: training
    and evaluation classify with :meth:`conditional_text_features`, ``[B, C, D]``, instead of one ``[C, D]``),
    ``objectives`` with ``objectives_reason`` (the DISTILL.OBJECTIVE values it trains with, when its method is an
    objective as much as an architecture, e.g. PromptSRC; empty: any).
    """

    image_encoder: PromptedVisionEncoder
    needs_teacher: bool = False
    needs_teacher_reason: str = ""
    own_text_tower: bool = False
    min_images_per_process: int = 0
    min_images_reason: str = ""
    conditional: bool = False
    objectives: tuple[str, ...] = ()
    objectives_reason: str = ""
    # Key prefixes of earlier clipkd files, mapped to the ones written (read, never written).
    _LEGACY_PREFIXES: dict[str, str] = {}

    @classmethod
    def from_cfg(cls, cfg: CfgNode, teacher: Teacher | None = None, *,
                 device: str | torch.device = "cpu") -> Student:
        """The student ``cfg.MODEL.STUDENT`` / ``cfg.MODEL.PROMPT`` describe, on ``device``."""
        s = cfg.MODEL.STUDENT
        if cls.needs_teacher and teacher is None:
            raise ConfigError(f"MODEL.STUDENT.TYPE {str(s.TYPE).lower()} needs the teacher "
                              f"({cls.needs_teacher_reason})")
        clip_model, tokenizer = create_clip(s.NAME, s.PRETRAINED, quick_gelu=s.QUICK_GELU, device=device,
                                            config_key="MODEL.STUDENT.PRETRAINED")
        return cls.from_clip(clip_model, tokenizer, cfg.MODEL.PROMPT, teacher).to(device)

    @classmethod
    def from_clip(cls, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                  prompt: CfgNode, teacher: Teacher | None) -> Student:
        """The student around a freshly built frozen CLIP, with the prompt sizes of ``prompt`` (MODEL.PROMPT)."""
        raise NotImplementedError(f"{cls.__name__} does not say how it is built from a CLIP model")

    def _trainable_modules(self) -> dict[str, nn.Module]:
        """Trainable submodules (besides the prompts) whose whole state is saved, keyed by the prefix their
        keys are saved under, e.g. the projector under PromptKD's ``VPT_image_trans.conv1``."""
        return {}

    @property
    def logit_scale(self) -> float:
        return self._logit_scale

    @property
    def device(self) -> torch.device:
        return self.image_encoder.visual.class_embedding.device

    @property
    def embed_dim(self) -> int:
        """The image features' size: the prompted image tower's output (a student with a projector overrides)."""
        return self.image_encoder.output_dim

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features ``[B, D]`` of the prompted image tower."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that training changes: prompts under PromptSRC's names, then the PromptKD student's
        projector under PromptKD's (``VPT_image_trans.conv1.{0,1,3}.*``).

        Names are stable across runs and versions and are those of the reference code, so each tool reads the
        other's files: an IVLP student's dict is a PromptSRC checkpoint that
        :class:`~clipkd.models.teacher.Teacher` can load as a prompted teacher, a PromptKD student's loads into
        PromptKD's student.
        """
        out = ivlp_state_dict(self)
        for prefix, module in self._trainable_modules().items():
            out.update({f"{prefix}.{k}": v.detach() for k, v in module.state_dict().items()})
        return out

    def _trainable_targets(self) -> dict[str, torch.Tensor]:
        targets: dict[str, torch.Tensor] = dict(ivlp_prompt_parameters(self))
        for prefix, module in self._trainable_modules().items():
            targets.update({f"{prefix}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
        return targets

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], *,
                                  source: str = "the student checkpoint",
                                  ignore_frozen_clip_weights: bool = False) -> None:
        """Strict inverse of :meth:`trainable_state_dict` (all problems listed in one ModelError).

        Keys older clipkd versions wrote (``projector.layers.*``) load too. With
        ``ignore_frozen_clip_weights`` (for whole-model files such as PromptKD's ``model-best.pth.tar``), the
        frozen CLIP weights and class-dependent buffers such files carry are skipped: the frozen weights come
        from MODEL.STUDENT.PRETRAINED and the file's copy is not used. Every prompt and projector tensor is
        still required, with the model's shape.
        """
        sd = self._rename_legacy(state_dict, source)
        if ignore_frozen_clip_weights:
            sd = prompt_keys(sd)
        copy_state_strict(
            self._trainable_targets(),
            sd,
            source=source,
            hint="MODEL.STUDENT.* / MODEL.PROMPT.* must match the run that saved it" + self._size_hint(sd),
        )

    def _rename_legacy(self, state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        out = dict(state_dict)
        for old, new in self._LEGACY_PREFIXES.items():
            for key in [k for k in out if k.startswith(old)]:
                renamed = new + key[len(old):]
                if renamed in out:
                    raise ModelError(f"{source} holds both '{key}' (an older clipkd name) and '{renamed}'; "
                                     "keep one of them")
                out[renamed] = out.pop(key)
        return out

    def _size_hint(self, state_dict: Mapping[str, torch.Tensor]) -> str:
        """What the file's prompts are, where they differ from this model's (to say which settings to use)."""
        try:
            sizes = infer_ivlp_sizes(state_dict)
        except Exception:  # noqa: BLE001 - a malformed tensor is reported by the strict copy itself
            return ""
        towers = [("VISION", self.image_encoder)]
        if hasattr(self, "text_encoder"):
            towers.append(("TEXT", self.text_encoder))
        notes = []
        for key, enc in towers:
            n, d = sizes[f"n_ctx_{key.lower()}"], sizes[f"depth_{key.lower()}"]
            if (n, d) != (enc.n_ctx, enc.depth):
                notes.append(f"MODEL.PROMPT.N_CTX_{key} {n} MODEL.PROMPT.DEPTH_{key} {d}")
        return f"; the file's prompts are {' '.join(notes)}" if notes else ""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer should update."""
        return [p for p in self.parameters() if p.requires_grad]

    def conditional_text_features(self, image_features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Each image's L2-normalised class features ``[B, C, D]`` given its features ``[B, D]``; a conditional
        student computes them from the image, the others repeat ``text_features`` (the same for every image)."""
        feats = self.text_features(classnames)
        return feats.unsqueeze(0).expand(image_features.shape[0], -1, -1)

    def setup_lines(self, batch_size: int, n_classes: int) -> list[str]:
        """Lines for the run log about what this student costs at this batch size and class count (none here)."""
        return []


class PromptKDStudent(Student):
    """PromptKD's student: frozen CLIP image encoder + deep visual prompts + projector, no text encoder.

    Its image features live in the teacher's embedding space; its classifier is the teacher's class
    embeddings (``class_embedder``, normally ``teacher.text_features``), so it has no text tower of its own
    (the CLIP text tower is not kept).
    """

    needs_teacher = True
    needs_teacher_reason = "its classifier is the teacher's text features"
    min_images_per_process = 2
    min_images_reason = "the PromptKD projector uses BatchNorm"

    def __init__(
        self,
        clip_model: nn.Module,
        *,
        out_dim: int,
        n_ctx: int = 4,
        depth: int = 9,
        hidden_dim: int | None = None,
        class_embedder: ClassEmbedder | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = PromptedVisionEncoder(clip_model.visual, n_ctx, depth)
        self.projector = Projector(self.image_encoder.output_dim, int(out_dim), hidden_dim)
        self.projector.to(device=self.device, dtype=self.image_encoder.visual.class_embedding.dtype)
        self._logit_scale = clip_logit_scale(clip_model)
        # A plain attribute, not a submodule: the teacher is not part of the student's state.
        self._class_embedder = class_embedder

    @classmethod
    def from_clip(cls, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                  prompt: CfgNode, teacher: Teacher | None) -> PromptKDStudent:
        assert teacher is not None  # from_cfg refuses a missing teacher (needs_teacher)
        return cls(clip_model, out_dim=teacher.embed_dim, n_ctx=prompt.N_CTX_VISION, depth=prompt.DEPTH_VISION,
                   class_embedder=teacher.text_features)

    # Files naming the projector projector.layers.* load too; PromptKD and clipkd write VPT_image_trans.conv1.*
    _LEGACY_PREFIXES = {"projector.layers.": f"{PROJECTOR_KEY}."}

    def _trainable_modules(self) -> dict[str, nn.Module]:
        return {PROJECTOR_KEY: self.projector.layers}

    def __deepcopy__(self, memo: dict) -> PromptKDStudent:
        """Copy the student but share its class embedder: a copy must not drag a copy of the teacher along."""
        memo[id(self._class_embedder)] = self._class_embedder
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @property
    def embed_dim(self) -> int:
        return self.projector.layers[-1].out_channels

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features ``[B, D_teacher]`` (prompted encoder, then projector)."""
        return F.normalize(self.projector(self.image_encoder(images)), dim=-1)

    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """The teacher's class embeddings (PromptKD's classifier)."""
        if self._class_embedder is None:
            raise ModelError("this PromptKD student has no class embedder; build it with the teacher's "
                             "text_features (build_student(cfg, teacher))")
        return self._class_embedder(classnames)


class IVLPStudent(Student):
    """Frozen CLIP with learnable deep prompts in both towers and its own text encoder (PromptSRC's IVLP).

    ``text_features`` is differentiable through the text prompts and recomputed on every call while training.
    In eval mode under ``torch.no_grad()`` it is cached per class list; the cache is keyed on the prompts'
    version counters, so any in-place update (optimizer step, load) invalidates it.
    """

    own_text_tower = True

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        *,
        n_ctx_text: int = 4,
        n_ctx_vision: int = 4,
        depth_text: int = 9,
        depth_vision: int = 9,
        ctx_init: str = "a photo of a",
    ) -> None:
        super().__init__()
        self.image_encoder = PromptedVisionEncoder(clip_model.visual, n_ctx_vision, depth_vision)
        self.text_encoder = PromptedTextEncoder(clip_model, tokenizer, n_ctx_text, depth_text, ctx_init)
        self._logit_scale = clip_logit_scale(clip_model)
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_clip(cls, clip_model: nn.Module, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                  prompt: CfgNode, teacher: Teacher | None) -> IVLPStudent:
        return cls(clip_model, tokenizer, n_ctx_text=prompt.N_CTX_TEXT, n_ctx_vision=prompt.N_CTX_VISION,
                   depth_text=prompt.DEPTH_TEXT, depth_vision=prompt.DEPTH_VISION, ctx_init=prompt.CTX_INIT)

    def text_features(self, classnames: Sequence[str]) -> torch.Tensor:
        """L2-normalised class embeddings ``[C, D]`` of ``"<ctx> <name>."`` through the prompted text tower."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable:
            key = (tuple(classnames), tensor_versions(self.text_encoder.prompt_parameters().values()), self.device)
            feats = self._text_cache.get(key)
            if feats is not None:
                return feats
        feats = F.normalize(self.text_encoder.encode(self.text_encoder.class_prompts(list(classnames))), dim=-1)
        if cacheable:
            self._text_cache = {key: feats}  # keep only the latest class list
        return feats

    def train(self, mode: bool = True) -> IVLPStudent:
        self._text_cache = {}
        return super().train(mode)


# ------------------------------------------------------------------------------------------------ builders


def build_student(cfg: CfgNode, teacher: Teacher | None = None, *,
                  device: str | torch.device = "cpu") -> Student:
    """The student that ``cfg.MODEL.STUDENT`` / ``cfg.MODEL.PROMPT`` describe: the class MODEL.STUDENT.TYPE names
    in ``clipkd.registry.STUDENTS``, built by its ``from_cfg``."""
    kind = STUDENTS.check(str(cfg.MODEL.STUDENT.TYPE).lower())  # ConfigError for a name the registry does not hold
    return STUDENTS.entrypoint(kind, "from_cfg")(cfg, teacher, device=device)
