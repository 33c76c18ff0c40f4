"""Every config key clipkd knows, with its default.

Keys follow Dassl's names where Dassl has them (DATASET.*, INPUT.*, DATALOADER.*, OPTIM.*, TEST.*) so that
users of CoOp / PromptKD configs feel at home. A key that is not here is an error when merged.
"""

from __future__ import annotations

from math import isfinite
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from yacs.config import CfgNode as CN

from clipkd.registry import DIVERGENCES, REGISTRIES

_C = CN()
_C.OUTPUT_DIR = ""
_C.SEED = 1

# ---------------------------------------------------------------- data
_C.DATASET = CN()
_C.DATASET.ROOT = ""  # the DATA root that holds one folder per dataset
_C.DATASET.NAME = ""  # Dassl name (e.g. "OxfordPets") or clipkd stem (e.g. "oxford_pets")
_C.DATASET.NUM_SHOTS = 16  # K images per class; 0 means the full train set (negative is an error)
_C.DATASET.SUBSAMPLE_CLASSES = "all"  # all (few-shot) | base (train on base, evaluate base and new)

_C.INPUT = CN()
_C.INPUT.SIZE = (224, 224)
_C.INPUT.INTERPOLATION = "bicubic"
_C.INPUT.PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
_C.INPUT.PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
_C.INPUT.RRCROP_SCALE = (0.08, 1.0)
_C.INPUT.FLIP_PROB = 0.5

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 2
_C.DATALOADER.TRAIN_X = CN()
_C.DATALOADER.TRAIN_X.BATCH_SIZE = 8
_C.DATALOADER.TEST = CN()
_C.DATALOADER.TEST.BATCH_SIZE = 100

# ---------------------------------------------------------------- models
_C.MODEL = CN()
_C.MODEL.TEACHER = CN()
_C.MODEL.TEACHER.NAME = "ViT-L-14"  # open_clip model name or a clipkd test-size config
_C.MODEL.TEACHER.PRETRAINED = ""  # open_clip tag ("openai"), a local weights file, or "" (random init)
# QuickGELU is declared, never guessed from a path: True for OpenAI-trained weights in a local file. The
# openai tag (and any open_clip tag marked quick_gelu), a "-quickgelu" model name and OpenAI's TorchScript
# archives turn it on by themselves.
_C.MODEL.TEACHER.QUICK_GELU = False
# The prompted teacher's prompts: a clipkd run folder or its model.pt (scripts/teacher.sh trains one), or a
# PromptKD/PromptSRC file as released (model-best.pth.tar) or their folder layout; "zero-shot" (or "") = none.
_C.MODEL.TEACHER.CHECKPOINT = ""
ZERO_SHOT = "zero-shot"  # the MODEL.TEACHER.CHECKPOINT value that chooses the zero-shot teacher explicitly
# True in the recipes that distil from a PromptSRC-prompted teacher (PromptKD, ABKD): such a run refuses to start
# without MODEL.TEACHER.CHECKPOINT, so a zero-shot teacher is always an explicit choice (CHECKPOINT zero-shot).
_C.MODEL.TEACHER.PROMPTED = False
# dataset (PROTOCOL template) | ensemble (CLIP's 80 ImageNet templates) | photo ("a photo of a {}.", KDPL-CA's)
_C.MODEL.TEACHER.TEMPLATES = "dataset"
_C.MODEL.STUDENT = CN()
_C.MODEL.STUDENT.NAME = "ViT-B-16"
_C.MODEL.STUDENT.PRETRAINED = ""
_C.MODEL.STUDENT.QUICK_GELU = False  # as MODEL.TEACHER.QUICK_GELU
_C.MODEL.STUDENT.TYPE = "promptkd"  # a name in clipkd.registry.STUDENTS (README: Students)
_C.MODEL.PROMPT = CN()
_C.MODEL.PROMPT.N_CTX_VISION = 4
_C.MODEL.PROMPT.N_CTX_TEXT = 4
_C.MODEL.PROMPT.DEPTH_VISION = 9
_C.MODEL.PROMPT.DEPTH_TEXT = 9
_C.MODEL.PROMPT.CTX_INIT = "a photo of a"

# ---------------------------------------------------------------- distillation
_C.DISTILL = CN()
_C.DISTILL.PROTOCOL = "inductive"  # inductive (K-shot base classes) | transductive (PromptKD: all train images)
# A divergence as the loss itself (ab | kl | rkl | js | skl | promptkd_kl), or a KD method around one
# (dkd | lsd | ttm, with DISTILL.DIVERGENCE inside), or dist (correlations). Keys a loss does not take must stay
# at their defaults (an error otherwise: they would be ignored).
_C.DISTILL.LOSS = "ab"


@dataclass(frozen=True)
class Param:
    """A loss parameter: its config key (DISTILL.<PARAM>), default and valid values; ``bound`` (e.g. "> 0") is
    the range :func:`clipkd.config.validate` checks on every merge (with ``fix`` as the hint), "" for none."""

    key: str
    default: Any
    ok: Callable[[Any], bool]
    must: str  # what ok() means, for the error
    bound: str = ""
    fix: str = ""


_DIVERGENCE_NAMES = DIVERGENCES.names()

# Every parameter a loss may take (an argument of its registered function, clipkd.registry.LOSSES): the one table
# of their defaults and ranges. Each row makes its DISTILL.<PARAM> key below; the loss builder
# (clipkd.losses.build), check_loss_keys (clipkd.config.checks) and validate (clipkd.config.merge) read it. A loss
# whose parameters are all here needs no new key.
# (ok, must, bound) of the two ranges most parameters have
_POSITIVE = (lambda v: isfinite(v) and v > 0, "a finite real number > 0", "> 0")
_NON_NEGATIVE = (lambda v: isfinite(v) and v >= 0, "a finite real number >= 0", ">= 0")

PARAMS: dict[str, Param] = {name: Param(f"DISTILL.{name.upper()}", *row) for name, *row in (
    # inside dkd (its non-target part), lsd, ttm: kl | ab | rkl | js | skl
    ("divergence", "kl", lambda v: v in _DIVERGENCE_NAMES, f"one of {', '.join(_DIVERGENCE_NAMES)}"),
    # of the alpha-beta divergence (DISTILL.LOSS ab, or DISTILL.DIVERGENCE ab)
    ("alpha", 0.8, isfinite, "a finite real number"),
    ("beta", 0.3, isfinite, "a finite real number"),
    # all but ttm (whose teacher temperature is 1 / TTM_EXPONENT)
    ("temperature", 1.0, *_POSITIVE, "1 uses the logits as they are"),
    # DKD: weight of the target-class part (binary KL)
    ("dkd_alpha", 1.0, *_NON_NEGATIVE, "the weight of DKD's target-class part"),
    # DKD: weight of the non-target part (DISTILL.DIVERGENCE)
    ("dkd_beta", 1.0, *_NON_NEGATIVE, "the weight of DKD's non-target part"),
    # DKD: the loss ramps as min(epoch / DKD_WARMUP, 1), epochs from 1; 0 = no ramp
    ("dkd_warmup", 1.0, _NON_NEGATIVE[0], "a finite real number >= 0 (epochs; 0 = no warm-up)", ">= 0",
     "epochs of DKD's ramp; 0 means none"),
    # TTM: the teacher's probabilities to this power, renormalised
    ("ttm_exponent", 0.1, *_POSITIVE, "e.g. 0.1-0.5 (1 is plain KD)"),
    # DIST: weight of the inter-class (per sample) correlation term
    ("dist_beta", 1.0, *_NON_NEGATIVE, "the weight of DIST's inter-class term"),
    # DIST: weight of the intra-class (per class, across the batch) term
    ("dist_gamma", 1.0, *_NON_NEGATIVE, "the weight of DIST's intra-class term"),
)}
for _spec in PARAMS.values():
    setattr(_C.DISTILL, _spec.key.split(".", 1)[1], _spec.default)

# DKD's target class in the transductive protocol: teacher (its argmax; labels unused, clipkd's default) | label
# (every training image's label, base and new classes: ABKD's CLIP code). The inductive protocol uses the labels.
_C.DISTILL.DKD_TARGET = "teacher"
_C.DISTILL.WEIGHT = 1.0
_C.DISTILL.CE_WEIGHT = 0.0  # optional cross-entropy on labels (inductive protocol only)
# kd: WEIGHT * LOSS(teacher || student) + CE_WEIGHT * CE; promptsrc: PromptSRC's prompt learning: that KD
# part (no teacher when WEIGHT is 0) + its self-regularising terms (PROMPTSRC.*), Gaussian-averaged prompts.
_C.DISTILL.OBJECTIVE = "kd"  # kd | promptsrc | kgcoop (kd + KgCoOp's term, KGCOOP.W)
# A folder for the teacher's image features of each (epoch, image) of the training stream and of the test sets,
# reused by later runs of the same stream (other sweep cells, reruns); "" = off. Exact: results do not change.
# Safe to delete at any time (clipkd.engine.teacher_features).
_C.DISTILL.TEACHER_CACHE = ""
# Label-free distillation (KDPL): the objective never receives the labels; a label loss is refused.
_C.DISTILL.LABEL_FREE = False
# KDPL-CA: no class names of the dataset in training: per batch the teacher picks KDPL.K_MAX names of
# KDPL.DICTIONARY, over which teacher and student are distilled (clipkd.methods.kdpl). Label-free too.
_C.DISTILL.CLASS_AGNOSTIC = False
# The teacher's logits = this model's CLIP logit scale x its cosines: teacher | student (KDPL's teacher uses the
# student's logit scale; for trained CLIPs both are the clamped 100).
_C.DISTILL.TEACHER_LOGIT_SCALE = "teacher"

# ---------------------------------------------------------------- KDPL-CA (DISTILL.CLASS_AGNOSTIC)
_C.KDPL = CN()
_C.KDPL.K_MAX = 1000  # dictionary names per batch, by the teacher's batch-mean probability (KDPL's K_MAX)
_C.KDPL.DICTIONARY = ""  # class names: KDPL's classnames_dictionay.csv (column ClassName) or one per line

# ---------------------------------------------------------------- PromptSRC (DISTILL.OBJECTIVE promptsrc)
_C.PROMPTSRC = CN()
_C.PROMPTSRC.TEXT_LOSS_WEIGHT = 25.0  # L1(prompted class text features, frozen template-averaged ones)
_C.PROMPTSRC.IMAGE_LOSS_WEIGHT = 10.0  # L1(prompted image features, frozen zero-shot image features)
_C.PROMPTSRC.GPA_MEAN = 15.0  # Gaussian prompt aggregation: epoch k (1-based) weighs N(k; GPA_MEAN, GPA_STD)
_C.PROMPTSRC.GPA_STD = 1.0

# ---------------------------------------------------------------- KgCoOp (DISTILL.OBJECTIVE kgcoop)
_C.KGCOOP = CN()
_C.KGCOOP.W = 8.0  # KgCoOp's TRAINER.COOP.W: weight of 1 - mean cos(learned, hand-crafted class embeddings)

# ---------------------------------------------------------------- optimisation
_C.OPTIM = CN()
_C.OPTIM.NAME = "sgd"  # sgd | adamw
_C.OPTIM.LR = 0.005
_C.OPTIM.WEIGHT_DECAY = 5e-4
_C.OPTIM.MOMENTUM = 0.9
_C.OPTIM.MAX_EPOCH = 20
_C.OPTIM.LR_SCHEDULER = "cosine"
_C.OPTIM.WARMUP_EPOCH = 1
_C.OPTIM.WARMUP_CONS_LR = 1e-5
_C.OPTIM.GRAD_CLIP = 0.0  # max gradient norm; 0 disables
_C.OPTIM.PRECISION = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16

# ---------------------------------------------------------------- evaluation
_C.TEST = CN()
# last | val (best epoch on the held-out few-shot val split) | best_base_test (the reference code's choice: the
# epoch with the best base *test* accuracy; for comparison with published tables only, marked in reports)
_C.TEST.FINAL_MODEL = "last"
# also record the teacher's prediction of each test image in predictions.npz (teacher_pred): one more teacher pass
# over the test lists (read from the feature cache with DISTILL.TEACHER_CACHE); off by default, as before
_C.TEST.TEACHER_PREDICTIONS = False


# Keys whose value must be one of a fixed set that no registry holds.
_FIXED_CHOICES: dict[str, tuple[str, ...]] = {
    "DATASET.SUBSAMPLE_CLASSES": ("all", "base"),
    "INPUT.INTERPOLATION": ("bicubic", "bilinear", "nearest"),
    "DISTILL.PROTOCOL": ("inductive", "transductive"),
    "DISTILL.DKD_TARGET": ("teacher", "label"),
    "DISTILL.TEACHER_LOGIT_SCALE": ("teacher", "student"),
    "OPTIM.LR_SCHEDULER": ("cosine", "constant"),
    "OPTIM.PRECISION": ("auto", "fp32", "bf16", "fp16"),
    "TEST.FINAL_MODEL": ("last", "val", "best_base_test"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Key -> allowed values, now: the fixed choices above, then the names of each registry in clipkd.registry
    (MODEL.TEACHER.TEMPLATES, MODEL.STUDENT.TYPE, DISTILL.LOSS, DISTILL.DIVERGENCE, DISTILL.OBJECTIVE,
    OPTIM.NAME), so a name registered later is accepted too."""
    return {**_FIXED_CHOICES, **{key: registry.names() for key, registry in REGISTRIES.items()}}


class _Choices(Mapping[str, tuple[str, ...]]):
    """:func:`choices` as a mapping, read when asked."""

    def __getitem__(self, key: str) -> tuple[str, ...]:
        if key in REGISTRIES:
            return REGISTRIES[key].names()
        return _FIXED_CHOICES[key]

    def __iter__(self) -> Iterator[str]:
        yield from _FIXED_CHOICES
        yield from REGISTRIES

    def __len__(self) -> int:
        return len(_FIXED_CHOICES) + len(REGISTRIES)

    def __repr__(self) -> str:
        return repr(dict(self))


# Keys whose value must be one of a fixed set; checked after every merge.
CHOICES: Mapping[str, tuple[str, ...]] = _Choices()


def get_cfg_defaults() -> CN:
    """A fresh copy of the defaults (callers may mutate it)."""
    return _C.clone()
