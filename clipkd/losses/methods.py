"""The distillation methods ABKD plugs its divergence into: DKD, LSD, TTM and DIST.

Each method is a transform of the two models' logits (DKD's target / non-target split, LSD's standardisation,
TTM's power transform of the teacher) around a divergence between class distributions, passed in by name
(``divergence="kl"`` or ``"ab"``; also ``rkl``, ``js``, ``skl``). So ABDKD, ABLSD and ABTTM are the same code as
DKD, LSD and TTM with ``divergence="ab"``, and the alpha-beta divergence keeps its finite-gradient numerics
inside them. DIST compares correlations and has no divergence inside.

A divergence here maps (student logits, teacher logits, temperature) to one value per sample; the transforms
only produce new logits. Every probability is handled as a log-probability (a valid logit vector: softmax of
log p is p), so no method takes the log of a probability that underflowed at CLIP's logit scale.

Reductions as ABKD's ``distiller_zoo``: a per-sample sum over classes, then the batch mean; T^2 where the
method has it (DKD, LSD, DIST; not TTM).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from clipkd.losses.divergences import (
    _check_pair,
    _no_autocast,
    _reduce,
    _work_dtype,
    kl_divergence,
)
from clipkd.registry import DIVERGENCES

__all__ = ["DIVERGENCE_NAMES", "dist_loss", "dkd_loss", "lsd_loss", "per_sample_divergence", "ttm_loss"]

# (student logits, teacher logits, temperature) -> one value per sample
Divergence = Callable[[Tensor, Tensor, float], Tensor]
DIVERGENCE_NAMES: tuple[str, ...] = DIVERGENCES.names()  # DISTILL.DIVERGENCE's names


def per_sample_divergence(name: str, alpha: float = 0.8, beta: float = 0.3) -> Divergence:
    """The divergence a method uses inside (``clipkd.registry.DIVERGENCES``), unreduced; alpha and beta are
    ``ab``'s."""
    fn = DIVERGENCES.get(name)
    if name == "ab":
        return functools.partial(_ab_per_sample, fn, alpha=float(alpha), beta=float(beta))
    return functools.partial(_named_per_sample, fn)


def _ab_per_sample(fn: Callable[..., Tensor], student: Tensor, teacher: Tensor, temperature: float, *,
                   alpha: float, beta: float) -> Tensor:
    return fn(student, teacher, alpha, beta, temperature, reduction="none")


def _named_per_sample(fn: Callable[..., Tensor], student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    return fn(student, teacher, temperature, reduction="none")


def _pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float, min_classes: int) -> tuple[Tensor, Tensor]:
    """Both logit tensors as [rows, classes] in the working dtype (fp32, or fp64 for fp64 inputs)."""
    _check_pair(student_logits, teacher_logits, temperature)
    if student_logits.shape[-1] < min_classes:
        raise ValueError(f"this method needs at least {min_classes} classes, got {student_logits.shape[-1]}")
    dtype = _work_dtype(student_logits, teacher_logits)
    c = student_logits.shape[-1]
    return student_logits.to(dtype).reshape(-1, c), teacher_logits.to(dtype).reshape(-1, c)


# ------------------------------------------------------------------------------------------------ DKD
def dkd_warmup_factor(epoch: float | None, warmup: float) -> float:
    """DKD's ramp min(epoch / warmup, 1), epochs counted from 1 (as DKD and ABKD pass them); warmup 0 = none."""
    if warmup <= 0:
        return 1.0
    if epoch is None:
        raise ValueError(f"dkd with dkd_warmup {warmup:g} needs the epoch (1-based): pass epoch=, or "
                         "dkd_warmup=0 for no warm-up")
    return min(float(epoch) / warmup, 1.0)


def _split_target(z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(binary log-probabilities [log p_t, log(1 - p_t)], the non-target logits [rows, C-1]) of logits z."""
    rows, c = z.shape
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    others = torch.ones_like(z, dtype=torch.bool).scatter_(1, target.view(-1, 1), False)
    non_target = z[others].view(rows, c - 1)
    binary = torch.cat([z.gather(1, target.view(-1, 1)), torch.logsumexp(non_target, -1, keepdim=True)], 1) - lse
    return binary, non_target


def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, epoch: float | None = None, *,
    divergence: str = "kl", alpha: float = 0.8, beta: float = 0.3, temperature: float = 1.0,
    dkd_alpha: float = 1.0, dkd_beta: float = 1.0, dkd_warmup: float = 1.0, reduction: str = "batchmean",
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): min(epoch / warmup, 1) * T^2 * (dkd_alpha * TCKD + dkd_beta * NCKD).

    TCKD = KL between the binary distributions [p_t, 1 - p_t] of teacher and student (always KL, as ABDKD);
    NCKD = ``divergence`` between the distributions over the C - 1 non-target classes (softmax of those
    logits). ``target``: the class index per sample (the label, or the teacher's argmax without labels).
    """
    zs, zt = _pair(student_logits, teacher_logits, temperature, min_classes=2)
    if target is None:
        raise ValueError("dkd needs a target class per sample (the labels, or the teacher's argmax)")
    target = target.reshape(-1).to(device=zs.device, dtype=torch.long)
    if target.numel() != zs.shape[0]:
        raise ValueError(f"dkd: {target.numel()} targets for {zs.shape[0]} samples")
    factor = dkd_warmup_factor(epoch, dkd_warmup)
    nckd_of = per_sample_divergence(divergence, alpha, beta)
    with _no_autocast(zs.device.type):
        zs, zt = zs / temperature, zt / temperature
        bs, ns = _split_target(zs, target)
        bt, nt = _split_target(zt, target)
        tckd = kl_divergence(bs, bt, reduction="none")
        nckd = nckd_of(ns, nt, 1.0)
        per_sample = (dkd_alpha * tckd + dkd_beta * nckd) * (factor * temperature**2)
    return _reduce(per_sample.reshape(student_logits.shape[:-1]), reduction)


# ------------------------------------------------------------------------------------------------ LSD
def standardize(z: Tensor) -> Tensor:
    """Logit standardisation (Sun et al. 2024): (z - mean) / (1e-7 + std) per sample, std with Bessel's
    correction, as its code."""
    return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))


def lsd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, divergence: str = "kl", alpha: float = 0.8,
    beta: float = 0.3, temperature: float = 1.0, reduction: str = "batchmean",
) -> Tensor:
    """Logit-standardised KD: ``divergence`` between the standardised logits at temperature T, times T^2."""
    zs, zt = _pair(student_logits, teacher_logits, temperature, min_classes=2)
    d = per_sample_divergence(divergence, alpha, beta)
    with _no_autocast(zs.device.type):
        per_sample = d(standardize(zs), standardize(zt), temperature) * temperature**2
    return _reduce(per_sample.reshape(student_logits.shape[:-1]), reduction)


# ------------------------------------------------------------------------------------------------ TTM
def ttm_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, divergence: str = "kl", alpha: float = 0.8,
    beta: float = 0.3, ttm_exponent: float = 0.1, reduction: str = "batchmean",
) -> Tensor:
    """Transformed teacher matching (Zheng & Yang 2024): D(p^l / sum p^l || q), q the student's softmax at
    T = 1, no T^2. p^l renormalised is softmax(l * teacher logits), which is how it is computed."""
    if not (math.isfinite(ttm_exponent) and ttm_exponent > 0):
        raise ValueError(f"ttm_exponent must be a finite number > 0, got {ttm_exponent!r}")
    zs, zt = _pair(student_logits, teacher_logits, 1.0, min_classes=1)
    d = per_sample_divergence(divergence, alpha, beta)
    with _no_autocast(zs.device.type):
        per_sample = d(zs, zt * ttm_exponent, 1.0)
    return _reduce(per_sample.reshape(student_logits.shape[:-1]), reduction)


# ------------------------------------------------------------------------------------------------ DIST
def _pearson_distance(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - Pearson correlation of the rows of a and b, averaged over rows (DIST's eps in the cosine)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return 1 - cos.mean()


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, dist_beta: float = 1.0,
    dist_gamma: float = 1.0,
) -> Tensor:
    """DIST (Huang et al. 2022): T^2 * (dist_beta * inter-class + dist_gamma * intra-class relation), each
    1 - Pearson correlation of the softmax at T: per sample across classes, and per class across the batch.
    The intra-class part couples the samples of a batch, so there is no per-sample value (a scalar always)."""
    zs, zt = _pair(student_logits, teacher_logits, temperature, min_classes=1)
    with _no_autocast(zs.device.type):
        ys, yt = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
        inter = _pearson_distance(ys, yt)
        intra = _pearson_distance(ys.t(), yt.t())
        return temperature**2 * (dist_beta * inter + dist_gamma * intra)
