"""The learning-rate schedule is Dassl's: constant warm-up, then a cosine that restarts after it.

The pinned lists are what Dassl's own ``build_lr_scheduler`` (ConstantWarmupScheduler around
CosineAnnealingLR, WARMUP_RECOUNT True, WARMUP_CONS_LR 1e-5) gave per epoch when run side by side with
torch 2.14 on 2026-11-28 (rounded to 6 significant digits).
"""

from __future__ import annotations

import math

import pytest
import torch

from clipkd.config import build_config
from clipkd.engine.optim import build_optimizer, build_scheduler

DASSL = {
    (5, 1): [1e-05, 0.1, 0.0904508, 0.0654508, 0.0345492],
    (5, 2): [1e-05, 1e-05, 0.1, 0.0904508, 0.0654508],
    (5, 0): [0.1, 0.0904508, 0.0654508, 0.0345492, 0.00954915],
    (20, 1): [1e-05, 0.1, 0.0993844, 0.0975528, 0.0945503, 0.0904508, 0.0853553, 0.0793893, 0.0726995, 0.0654508,
              0.0578217, 0.05, 0.0421783, 0.0345492, 0.0273005, 0.0206107, 0.0146447, 0.00954915, 0.00544967,
              0.00244717],
    (20, 0): [0.1, 0.0993844, 0.0975528, 0.0945503, 0.0904508, 0.0853553, 0.0793893, 0.0726995, 0.0654508,
              0.0578217, 0.05, 0.0421783, 0.0345492, 0.0273005, 0.0206107, 0.0146447, 0.00954915, 0.00544967,
              0.00244717, 0.000615583],
}


def epoch_lrs(max_epoch: int, warmup: int, lr: float = 0.1, scheduler: str = "cosine") -> list[float]:
    """The lr each epoch trains at, stepping the scheduler once per epoch as the trainer does."""
    cfg = build_config(overrides=["OPTIM.LR", str(lr), "OPTIM.MAX_EPOCH", str(max_epoch), "OPTIM.WARMUP_EPOCH",
                                  str(warmup), "OPTIM.WARMUP_CONS_LR", "1e-5", "OPTIM.LR_SCHEDULER", scheduler])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(max_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("max_epoch, warmup", sorted(DASSL))
def test_schedule_equals_dassls(max_epoch, warmup):
    assert epoch_lrs(max_epoch, warmup) == pytest.approx(DASSL[(max_epoch, warmup)], rel=1e-5)


@pytest.mark.parametrize("max_epoch, warmup, lr", [(20, 1, 0.005), (7, 3, 1e-4), (1, 0, 0.02), (2, 1, 0.3)])
def test_schedule_formula(max_epoch, warmup, lr):
    want = [1e-5 if e < warmup else lr * (1 + math.cos(math.pi * (e - warmup) / max_epoch)) / 2
            for e in range(max_epoch)]
    assert epoch_lrs(max_epoch, warmup, lr) == pytest.approx(want, rel=1e-12)


def test_the_cosine_restarts_after_warm_up_and_never_reaches_zero():
    lrs = epoch_lrs(20, 1, lr=0.005)
    assert lrs[1] == pytest.approx(0.005)  # the first epoch after warm-up trains at the full LR
    assert lrs[-1] == pytest.approx(0.005 * (1 + math.cos(math.pi * 18 / 20)) / 2)  # 0.0245 x LR
    assert sum(lrs) == pytest.approx(1e-5 + 0.005 * sum((1 + math.cos(math.pi * k / 20)) / 2 for k in range(19)))


def test_constant_schedule_after_warm_up():
    assert epoch_lrs(4, 1, lr=0.01, scheduler="constant") == pytest.approx([1e-5, 0.01, 0.01, 0.01])
