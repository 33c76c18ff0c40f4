"""Distillation losses (teacher -> student divergences over class distributions)."""

from clipkd.losses.divergences import (
    LOSS_NAMES,
    DistillLoss,
    alpha_beta_divergence,
    build_distill_loss,
    build_distill_loss_from_cfg,
    js_divergence,
    kl_divergence,
    promptkd_kl,
    reverse_kl,
    symmetric_kl,
)

__all__ = [
    "LOSS_NAMES",
    "DistillLoss",
    "alpha_beta_divergence",
    "build_distill_loss",
    "build_distill_loss_from_cfg",
    "js_divergence",
    "kl_divergence",
    "promptkd_kl",
    "reverse_kl",
    "symmetric_kl",
]
