"""Optimiser and learning-rate schedule: Dassl's, exactly (constant warm-up, then a cosine that starts over).

Dassl's ``build_lr_scheduler`` (with its default ``WARMUP_RECOUNT True``, which CoOp, PromptSRC, PromptKD and
ABKD keep) wraps a ``CosineAnnealingLR(T_max=MAX_EPOCH)`` in a constant warm-up scheduler that does not step
the cosine during warm-up. So epoch e (0-based) trains at WARMUP_CONS_LR for e < W and then at
LR * (1 + cos(pi * (e - W) / MAX_EPOCH)) / 2: the cosine restarts at W and never reaches 0 (the last of 20
epochs with W = 1 gets 0.0245 * LR). Checked by running Dassl's scheduler code side by side
(tests/test_optim.py pins its values).
"""

from __future__ import annotations

import inspect
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
    # OPTIM.MOMENTUM goes to the optimizers that take one (SGD), not by name
    extra = {"momentum": o.MOMENTUM} if "momentum" in inspect.signature(optimizer_cls).parameters else {}
    return optimizer_cls(params, lr=o.LR, weight_decay=o.WEIGHT_DECAY, **extra)


class WarmupCosine:
    """lr factor at epoch e: WARMUP_CONS_LR / LR while e < W, then 0.5 (1 + cos(pi (e - W) / MAX_EPOCH)).

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
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup_epochs) / self.max_epoch))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: CfgNode) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.OPTIM
    factor = o.WARMUP_CONS_LR / o.LR if o.LR > 0 else 1.0
    rule = WarmupCosine(o.WARMUP_EPOCH, factor, o.MAX_EPOCH, cosine=o.LR_SCHEDULER == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)
