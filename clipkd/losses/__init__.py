"""Distillation losses: divergences between class distributions (:mod:`.divergences`), the KD methods built
around them (:mod:`.methods`: DKD, LSD, TTM, DIST) and the one builder configs use (:mod:`.build`)."""

from clipkd.losses.build import (
    LOSS_NAMES,
    PARAMS,
    DistillLoss,
    build_distill_loss,
    build_distill_loss_from_cfg,
    loss_params,
)
from clipkd.losses.divergences import (
    alpha_beta_divergence,
    js_divergence,
    kl_divergence,
    promptkd_kl,
    reverse_kl,
    symmetric_kl,
)
from clipkd.losses.methods import DIVERGENCE_NAMES, dist_loss, dkd_loss, lsd_loss, ttm_loss

__all__ = [
    "DIVERGENCE_NAMES",
    "LOSS_NAMES",
    "PARAMS",
    "DistillLoss",
    "alpha_beta_divergence",
    "build_distill_loss",
    "build_distill_loss_from_cfg",
    "dist_loss",
    "dkd_loss",
    "js_divergence",
    "kl_divergence",
    "loss_params",
    "lsd_loss",
    "promptkd_kl",
    "reverse_kl",
    "symmetric_kl",
    "ttm_loss",
]
