"""The checks a run makes on its config alone, across keys: one function, :func:`check_config`, that
``clipkd train`` (and every run, through :meth:`clipkd.runs.run.Run.prepare`) and ``clipkd config show``
both call, so that a config one refuses the other refuses too, with the same words.

:func:`clipkd.config.validate` checks each value by itself (types, ranges, choices) and runs on every merge;
these check combinations that only a training run cares about (``clipkd eval`` of such a config stays possible).
What needs the data, model files or a device (DATASET.ROOT, MODEL.TEACHER.CHECKPOINT, image sizes, batch
sizes against the data, fp16 without CUDA) is checked by the run itself, not here.

Imports neither torch nor open_clip: ``config show`` answers at once. Which settings a loss takes is read from
its registered function's signature (:meth:`clipkd.registry.Registry.arguments`), their keys and defaults from
the table of loss parameters (:data:`clipkd.config.defaults.PARAMS`), what a student has from its registered
class's declarations (:meth:`clipkd.registry.Registry.attribute`), what an objective cannot train with from the
``check_config`` it is registered with (:meth:`clipkd.registry.Registry.declared`).
"""

from __future__ import annotations

import math
from typing import Any

from yacs.config import CfgNode

from clipkd.config.defaults import PARAMS, get_cfg_defaults
from clipkd.errors import ConfigError
from clipkd.registry import LOSSES, OBJECTIVES, STUDENTS

_DKD_TARGET_DEFAULT = get_cfg_defaults().DISTILL.DKD_TARGET

# A loss function's arguments that are data, not settings.
DATA_ARGS = ("student_logits", "teacher_logits", "target", "epoch", "reduction")


def loss_params(name: str, divergence: str | None = None) -> tuple[str, ...]:
    """The parameters DISTILL.LOSS ``name`` takes (with ``divergence``, for a method that has one); alpha and
    beta belong to the ab divergence, so a method takes them only when its divergence is ab."""
    return _settings(LOSSES.arguments(name), divergence)


def _settings(arguments: tuple[str, ...], divergence: str | None) -> tuple[str, ...]:
    """:func:`loss_params` of a loss function whose arguments are ``arguments``."""
    names = tuple(p for p in arguments if p not in DATA_ARGS)
    if "divergence" in names and (divergence or PARAMS["divergence"].default) != "ab":
        names = tuple(p for p in names if p not in ("alpha", "beta"))
    return names


def check_loss_keys(cfg: CfgNode) -> tuple[str, ...]:
    """A DISTILL.* key of a loss parameter (DISTILL.<PARAM>, e.g. DISTILL.TTM_EXPONENT for ``ttm_exponent``)
    that DISTILL.LOSS does not take must stay at its default: a changed value would be ignored silently.
    Returns the parameters the loss takes. The other losses' arguments are read only to name those that take
    a changed key."""
    d = cfg.DISTILL
    name = LOSSES.check(d.LOSS)
    arguments = LOSSES.arguments(name)
    divergence = d.DIVERGENCE if "divergence" in arguments else None
    takes = _settings(arguments, divergence)
    for param, spec in PARAMS.items():
        field = spec.key.split(".", 1)[1]
        if param in takes or d[field] == spec.default:
            continue
        users = [n for n in LOSSES if param in LOSSES.arguments(n)]
        if users:
            hint = (" (alpha and beta apply when DISTILL.DIVERGENCE is ab)"
                    if param in ("alpha", "beta") and divergence is not None else "")
            raise ConfigError(f"DISTILL.{field} {d[field]!r} does not apply to DISTILL.LOSS {name}{hint}; "
                              f"it is used by {', '.join(users)}: remove it or set it back to "
                              f"{spec.default!r}")
    # DISTILL.DKD_TARGET picks DKD's target class: it needs a loss that takes one.
    default_target = _DKD_TARGET_DEFAULT
    if d.DKD_TARGET != default_target and "target" not in arguments:
        users = [n for n in LOSSES if "target" in LOSSES.arguments(n)]
        raise ConfigError(f"DISTILL.DKD_TARGET {d.DKD_TARGET!r} does not apply to DISTILL.LOSS {name}; it is used "
                          f"by {', '.join(users)}: remove it or set it back to {default_target!r}")
    return takes


def gpa_weights(n_epochs: int, mean: float, std: float) -> tuple[float, ...]:
    """PromptSRC's Gaussian prompt aggregation weights g(1..N): the normal density at each epoch, normalised
    to sum to 1 (its constant factor cancels). Here, beside the check that uses it, because whether they exist
    decides whether a promptsrc config can train (:mod:`clipkd.methods.promptsrc` uses them)."""
    if n_epochs < 1 or not std > 0:
        raise ConfigError(f"Gaussian prompt aggregation needs >= 1 epoch and PROMPTSRC.GPA_STD > 0 "
                          f"(got {n_epochs} epochs, std {std})")
    dens = [math.exp(-0.5 * ((k - mean) / std) ** 2) for k in range(1, n_epochs + 1)]
    total = sum(dens)
    if total == 0:  # every epoch is tens of stds from the mean: exp underflows
        raise ConfigError(f"PROMPTSRC.GPA_MEAN {mean} is too far from epochs 1..{n_epochs} for GPA_STD {std}; "
                          "put the mean within the run's epochs")
    return tuple(d / total for d in dens)


def check_promptsrc_config(cfg: CfgNode) -> None:
    """The settings PromptSRC (DISTILL.OBJECTIVE promptsrc) cannot train with."""
    d, p = cfg.DISTILL, cfg.PROMPTSRC
    problems = []
    def fits(name: str) -> bool:  # its regulariser needs the student's own class features, one per class
        takes = STUDENTS.attribute(name, "objectives", ())
        return (STUDENTS.attribute(name, "own_text_tower") and not STUDENTS.attribute(name, "conditional", False)
                and (not takes or "promptsrc" in takes))

    if not fits(cfg.MODEL.STUDENT.TYPE):
        problems.append(f"it trains prompts in both towers: set MODEL.STUDENT.TYPE "
                        f"{' or '.join(n for n in STUDENTS if fits(n))}")
    if d.PROTOCOL != "inductive":
        problems.append("it learns from labels: set DISTILL.PROTOCOL inductive")
    if cfg.TEST.FINAL_MODEL != "last":
        problems.append("its final model is the Gaussian-weighted average of all epochs: set TEST.FINAL_MODEL last")
    for key in ("TEXT_LOSS_WEIGHT", "IMAGE_LOSS_WEIGHT"):
        if p[key] < 0:
            problems.append(f"PROMPTSRC.{key} must be >= 0 (got {p[key]})")
    if problems:
        raise ConfigError("DISTILL.OBJECTIVE promptsrc: " + "; ".join(problems))
    gpa_weights(cfg.OPTIM.MAX_EPOCH, p.GPA_MEAN, p.GPA_STD)  # ConfigError for a bad std or mean
    check_kd_config(cfg)  # its KD part


def check_kd_config(cfg: CfgNode) -> None:
    """The KD objective's (DISTILL.OBJECTIVE kd) check: the loss keys, when it builds DISTILL.LOSS (WEIGHT > 0)."""
    if cfg.DISTILL.WEIGHT > 0:
        check_loss_keys(cfg)


def check_student_objective(cfg: CfgNode) -> None:
    """A student whose method is also an objective (its ``objectives``, e.g. PromptSRC's) trains with no other."""
    kind = STUDENTS.check(cfg.MODEL.STUDENT.TYPE)
    takes = STUDENTS.attribute(kind, "objectives", ())
    if takes and cfg.DISTILL.OBJECTIVE not in takes:
        raise ConfigError(f"MODEL.STUDENT.TYPE {kind} trains with DISTILL.OBJECTIVE {' or '.join(takes)}, not "
                          f"{cfg.DISTILL.OBJECTIVE} ({STUDENTS.attribute(kind, 'objectives_reason', '')}): set "
                          f"DISTILL.OBJECTIVE {takes[0]}")


def check_kgcoop_config(cfg: CfgNode) -> None:
    """The kgcoop objective's check: it needs the kgcoop student's hand-crafted class embeddings (the student, in
    turn, declares that it trains with this objective only: :func:`check_student_objective`); its KD part's."""
    student = str(cfg.MODEL.STUDENT.TYPE).lower()
    if cfg.DISTILL.OBJECTIVE == "kgcoop" and student != "kgcoop":
        raise ConfigError(f"DISTILL.OBJECTIVE kgcoop with MODEL.STUDENT.TYPE {student}: KgCoOp's term needs the "
                          "kgcoop student's hand-crafted class embeddings; set MODEL.STUDENT.TYPE kgcoop")
    if not (math.isfinite(cfg.KGCOOP.W) and cfg.KGCOOP.W >= 0):
        raise ConfigError(f"KGCOOP.W must be a finite number >= 0 (got {cfg.KGCOOP.W}); KgCoOp uses 8.0")
    check_kd_config(cfg)  # its KD part


def check_label_free_config(cfg: CfgNode) -> None:
    """What label-free (DISTILL.LABEL_FREE) and class-agnostic (DISTILL.CLASS_AGNOSTIC, KDPL-CA) training refuse:
    anything that learns from labels, and for KDPL-CA a classifier or a teacher prompt tied to the dataset."""
    d = cfg.DISTILL
    key = "DISTILL.CLASS_AGNOSTIC" if d.CLASS_AGNOSTIC else "DISTILL.LABEL_FREE"
    why = "trains without the dataset's class names or labels" if d.CLASS_AGNOSTIC else "never uses labels"
    if d.CE_WEIGHT > 0:
        raise ConfigError(f"DISTILL.CE_WEIGHT {d.CE_WEIGHT:g} is a label loss and {key} True {why}: set "
                          f"DISTILL.CE_WEIGHT 0 or {key} False")
    if d.DKD_TARGET == "label":
        raise ConfigError(f"DISTILL.DKD_TARGET label needs labels and {key} True {why}: use DISTILL.DKD_TARGET "
                          f"teacher or set {key} False")
    if not d.CLASS_AGNOSTIC:
        return
    if d.OBJECTIVE != "kd":  # e.g. PromptSRC's frozen references are made once, per training class
        raise ConfigError(f"DISTILL.OBJECTIVE {d.OBJECTIVE} keeps per-class references of the training classes and "
                          "DISTILL.CLASS_AGNOSTIC True trains over the names each batch picks: use DISTILL.OBJECTIVE "
                          "kd or set DISTILL.CLASS_AGNOSTIC False")
    student = cfg.MODEL.STUDENT.TYPE
    if STUDENTS.attribute(student, "needs_teacher"):  # its class embeddings are the teacher's (PromptKD's)
        fits = [n for n in STUDENTS if not STUDENTS.attribute(n, "needs_teacher")
                and not STUDENTS.attribute(n, "objectives", ())]  # tied to its own objective, refused above
        raise ConfigError(f"DISTILL.CLASS_AGNOSTIC needs a student with its own text tower for the names each "
                          f"batch picks; MODEL.STUDENT.TYPE {student} does not "
                          f"({STUDENTS.attribute(student, 'needs_teacher_reason')}): use MODEL.STUDENT.TYPE "
                          f"{' or '.join(fits)}, or DISTILL.CLASS_AGNOSTIC False")
    if cfg.MODEL.TEACHER.TEMPLATES == "dataset":
        raise ConfigError("DISTILL.CLASS_AGNOSTIC must not tell the teacher the dataset's domain, and "
                          "MODEL.TEACHER.TEMPLATES dataset uses its template: set MODEL.TEACHER.TEMPLATES photo "
                          "(KDPL's \"a photo of a {}.\") or ensemble")


def check_config(cfg: Any) -> None:
    """Every combination of settings a training run refuses on the config alone (ConfigError, one line)."""
    d = cfg.DISTILL
    if d.LABEL_FREE or d.CLASS_AGNOSTIC:
        check_label_free_config(cfg)
    if d.CE_WEIGHT > 0 and d.PROTOCOL != "inductive":
        raise ConfigError("DISTILL.CE_WEIGHT needs labels, which the transductive protocol does not use; "
                          "set it to 0 or use DISTILL.PROTOCOL inductive")
    check_student_objective(cfg)
    objective_check = OBJECTIVES.declared(d.OBJECTIVE, "check_config")  # what the objective cannot train with
    if objective_check is not None:
        objective_check(cfg)
    if d.WEIGHT == 0 and d.CE_WEIGHT == 0:
        raise ConfigError("nothing to learn from: DISTILL.WEIGHT and DISTILL.CE_WEIGHT are both 0")
