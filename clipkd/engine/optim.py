"""Optimiser and learning-rate schedule (Dassl's: one constant warm-up epoch, then cosine, stepped per epoch)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from yacs.config import CfgNode

from clipkd.errors import ConfigError
from clipkd.registry import OPTIMIZERS


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: CfgNode) -> torch.optim.Optimizer:
    o = cfg.OPTIM
    params = list(params)
    if not params:
        raise ConfigError("the student has no trainable parameters; check MODEL.PROMPT.* (depth and n_ctx)")
    optimizer_cls = OPTIMIZERS.get(o.NAME)  # ConfigError for a name the registry does not hold
    extra = {"momentum": o.MOMENTUM} if o.NAME == "sgd" else {}
    return optimizer_cls(params, lr=o.LR, weight_decay=o.WEIGHT_DECAY, **extra)


class WarmupCosine:
    """lr factor at epoch e: WARMUP_CONS_LR / LR during warm-up, then 0.5 (1 + cos(pi e / MAX_EPOCH)).

    As in Dassl, the cosine keeps counting from epoch 0, so the first epoch after warm-up uses cos(pi W / T).
    A picklable callable, so the scheduler's state can be checkpointed.
    """

    def __init__(self, warmup_epochs: int, warmup_factor: float, max_epoch: int, cosine: bool = True):
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        self.max_epoch = max(max_epoch, 1)
        self.cosine = cosine

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_factor
        if not self.cosine:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * epoch / self.max_epoch))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: CfgNode) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.OPTIM
    factor = o.WARMUP_CONS_LR / o.LR if o.LR > 0 else 1.0
    rule = WarmupCosine(o.WARMUP_EPOCH, factor, o.MAX_EPOCH, cosine=o.LR_SCHEDULER == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)
