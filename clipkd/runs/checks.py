"""The combinations a run refuses before it writes anything because they would fail deep inside a step or train
something meaningless, and that need more than the config (the data, model configs, the device); what the config
alone decides is :func:`clipkd.config.check_config`. Students and objectives declare what they need (a teacher,
images per step: ``clipkd.registry.STUDENTS``), and these checks ask them."""

from __future__ import annotations

import torch
from yacs.config import CfgNode

from clipkd.data.rundata import RunData
from clipkd.data.specs import get_spec
from clipkd.engine import runtime
from clipkd.errors import ConfigError
from clipkd.models.factory import register_model_configs
from clipkd.registry import STUDENTS


def needs_teacher(cfg: CfgNode) -> bool:
    """Whether a run of ``cfg`` builds a teacher: its student needs one, or it distils."""
    return STUDENTS.get(cfg.MODEL.STUDENT.TYPE).needs_teacher or cfg.DISTILL.WEIGHT > 0


def records_teacher(cfg: CfgNode) -> bool:
    """Whether a run of ``cfg`` records its teacher's test predictions (``teacher_pred`` in predictions.npz)."""
    return bool(cfg.TEST.TEACHER_PREDICTIONS) and needs_teacher(cfg)


def model_input_size(name: str) -> tuple[int, int] | None:
    """The image size an open_clip architecture takes, read from its config (None when unknown)."""
    import open_clip  # only when a run checks its sizes: importing it costs seconds

    register_model_configs()
    mcfg = open_clip.get_model_config(name.replace("/", "-"))
    size = (mcfg or {}).get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def check_teacher(cfg: CfgNode) -> None:
    """A recipe that distils from a prompted teacher never silently gets a zero-shot one (training or eval: a
    PromptKD student's classifier is its teacher's class embeddings)."""
    t = cfg.MODEL.TEACHER
    if t.PROMPTED and not t.CHECKPOINT and needs_teacher(cfg):
        raise ConfigError(
            "this method distils from a PromptSRC-prompted teacher (MODEL.TEACHER.PROMPTED True) and "
            "MODEL.TEACHER.CHECKPOINT is empty: train one with scripts/teacher.sh DATASET SEED and pass "
            "MODEL.TEACHER.CHECKPOINT output/teachers/<dataset>/seed<S>, or import PromptKD's released teacher "
            "(MODEL.TEACHER.CHECKPOINT path/to/model-best.pth.tar or its teacher_model folder), or distil from the "
            "zero-shot teacher on purpose with MODEL.TEACHER.CHECKPOINT zero-shot")


def check_trainable(cfg: CfgNode) -> None:
    """An evaluation set (ImageNetV2/-Sketch/-A/-R: test images only) cannot be trained on; say what to do instead."""
    spec = get_spec(cfg.DATASET.NAME) if cfg.DATASET.NAME else None  # an empty name: prepare_data reports it
    if spec is not None and spec.test_only:
        raise ConfigError(
            f"DATASET.NAME {spec.name} is an evaluation set (test images only, as in CoOp): nothing can be trained "
            f"on it; train on ImageNet (scripts/dg.sh SEED METHOD) and evaluate that run on it with "
            f"clipkd eval --run DIR --dataset {spec.stem}")


def check_setup(cfg: CfgNode, data: RunData, world: int = 1, device: torch.device | None = None) -> None:
    """The combinations that would otherwise fail deep inside a step, or train something meaningless, and need
    more than the config (the data, model configs, the ``device``, by default this process's; what the config
    alone decides is check_config)."""
    check_teacher(cfg)
    if cfg.DISTILL.CLASS_AGNOSTIC:  # KDPL-CA: its dictionary is there, and holds K_MAX names
        from clipkd.methods.kdpl import training_classes  # noqa: PLC0415 - KDPL-CA's own part, only for it

        training_classes(cfg, data.train.classnames)
    if cfg.TEST.FINAL_MODEL == "val" and not data.select.val:
        raise ConfigError(f"{data.spec.name} has no held-out val split (its val would be the test set); "
                          "use TEST.FINAL_MODEL last")
    batch = cfg.DATALOADER.TRAIN_X.BATCH_SIZE
    if batch % world:
        raise ConfigError(f"DATALOADER.TRAIN_X.BATCH_SIZE {batch} must divide among {world} processes")
    per_process = min(batch, len(data.train.train)) // world
    student = STUDENTS.get(cfg.MODEL.STUDENT.TYPE)
    if per_process < student.min_images_per_process:
        raise ConfigError(
            f"{student.min_images_reason}, which needs at least {student.min_images_per_process} images per "
            f"process and step; "
            f"this run has {per_process} (DATALOADER.TRAIN_X.BATCH_SIZE {batch}, {world} process(es), "
            f"{len(data.train.train)} training images): raise the batch size or NUM_SHOTS")
    size = tuple(cfg.INPUT.SIZE)
    roles = [("MODEL.STUDENT.NAME", cfg.MODEL.STUDENT.NAME)]
    if needs_teacher(cfg):
        roles.insert(0, ("MODEL.TEACHER.NAME", cfg.MODEL.TEACHER.NAME))
    for key, name in roles:
        wants = model_input_size(name)
        if wants is not None and wants != size:
            raise ConfigError(
                f"INPUT.SIZE {size} does not fit {key} {name}, which takes {wants[0]}x{wants[1]} images; "
                f"set INPUT.SIZE \"({wants[0]}, {wants[1]})\" (teacher and student must take the same size)")
    runtime.autocast_for(cfg.OPTIM.PRECISION, device or runtime.pick_device())  # fp16 without CUDA
