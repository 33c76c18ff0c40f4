"""Divergences between the teacher's and the student's class distributions, for distillation.

The alpha-beta divergence of Cichocki, Cruces & Amari (2011) is the project's main loss. Its textbook formula
divides by alpha, beta and alpha+beta and raises probabilities to powers, so the reference code crashes on the
limit lines and returns NaN gradients once softmax probabilities underflow at CLIP's logit scale (~100).
Here it is evaluated from log-probabilities in a form with no removable singularity anywhere:

With x = log p, y = log q, r = y - x, s = alpha + beta and f(t) = exp(s x + t r), one class contributes
``-1/(ab) (p^a q^b - a/s p^s - b/s q^s) = f[0, b, s]``, the second divided difference of f at the nodes
0, beta, s (f(0) = p^s, f(b) = p^a q^b, f(s) = q^s). Divided differences are continuous in their nodes
(coinciding nodes give derivatives), which is why the divergence extends continuously to the whole plane;
the paper's closed-form limits are exactly these confluent cases. It is computed two ways, each accurate to a
few ulps where it is used, and equal to rounding where they meet (so there is no jump):

* |r| * spread(0, b, s) >= 0.5: ``(f[mid, hi] - f[lo, mid]) / (hi - lo)`` around the median node, with each
  first difference as ``exp(larger exponent) * expm1(-gap |r|) / gap``: bounded factors (no overflow, no
  0 * inf), and expm1 stays exact when a gap (|alpha|, |beta|, |alpha+beta|) tends to 0.
* otherwise a Taylor polynomial in r with coefficients h_k(0, b, s) / (k+2)! computed once per (alpha, beta);
  the nodes are within 0.5 of each other, so nothing cancels. This also covers the origin and p ~ q.

The gradients are first differences already at hand: d/d(log q) = f[b, s] = q^b (q^a - p^a) / a and
d/d(log p) = -f[0, b], so the backward pass costs one multiply.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


__all__ = [
    "alpha_beta_divergence",
    "js_divergence",
    "kl_divergence",
    "promptkd_kl",
    "reverse_kl",
    "symmetric_kl",
]

REDUCTIONS = ("batchmean", "sum", "none")


# ------------------------------------------------------------------------------------------------ helpers
def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "batchmean":
        return per_sample.mean() if per_sample.numel() else per_sample.sum()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 stays fp64 (for exactness checks); every other float type is computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    """Autocast must not push the loss's elementwise math back to bf16/fp16."""
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> float:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError("logits need a non-empty class dimension (the last one)")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log q, log p) in the working dtype; call inside ``_no_autocast``."""
    dtype = _work_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)


# ------------------------------------------------------------------------------------------------ AB divergence
# Notation: x = log p, y = log q, r = y - x, s = alpha + beta, and for a node t (one of 0, beta, s) the exponent
# E(t) = s x + t r, so that E(0) = s log p, E(beta) = alpha log p + beta log q, E(s) = s log q. With
# f(t) = exp(E(t)), the summand of D_AB is the second divided difference f[0, beta, s] (see the module doc).

# Elements with |r| * spread below this take the Taylor branch. Smaller means fewer series terms but more
# rounding amplification in the divided-difference branch (about 2 / this, in ulps); 0.5 balances the two.
_SERIES_SPREAD = 0.5
# expm1(z) is -1 to the last bit of fp64 for z < -40; capping there keeps CPU expm1 on its fast path.
_EXPM1_FLOOR = -50.0
# Node gaps (|alpha|, |beta|, |alpha+beta|) below this are taken as 0 (see _ab_plan).
_GAP_ZERO = 1e-20


@dataclass(frozen=True)
class _ABPlan:
    """Everything about (alpha, beta) that does not depend on the data, computed once in float64."""

    s: float
    spread: float  # max(0, b, s) - min(0, b, s)
    series_limit: float  # |r| below which the Taylor branch is used (inf at the origin)
    coeffs: tuple[float, ...]  # Taylor coefficients of exp[0, b r, s r] in powers of r, lowest first
    upper: str  # the summand is (f[upper] - f[lower]) / divisor, f the first divided difference of a pair
    lower: str
    divisor: float  # +-spread
    pairs: tuple[tuple[str, float, float, float], ...]  # (name, lo node, hi node, gap) for 0b, bs, 0s

    def pair(self, name: str) -> tuple[float, float, float]:
        return next(p[1:] for p in self.pairs if p[0] == name)


@functools.lru_cache(maxsize=64)
def _series_terms(eps: float) -> int:
    """Terms needed so the series tail is below eps/4 relative to the sum (>= exp(-spread)/2) at the switch."""
    d = _SERIES_SPREAD
    n = 1
    while True:
        tail = sum((k + 1) * d**k / math.factorial(k + 2) for k in range(n, n + 40))
        if 2 * math.exp(d) * tail < eps / 4:
            return n
        n += 1


def _gap(g: float) -> float:
    """|g|, or 0 below _GAP_ZERO: there the divided difference equals the derivative to ~1e-15 relative
    (|r| < 1e5), and using the derivative keeps 1/gap from overflowing. Nothing visible changes."""
    return abs(g) if abs(g) >= _GAP_ZERO else 0.0


@functools.lru_cache(maxsize=256)
def _ab_plan(alpha: float, beta: float, dtype: torch.dtype) -> _ABPlan:
    a, b = alpha, beta
    s = a + b
    spread = max(0.0, b, s) - min(0.0, b, s)
    # exp[0, b r, s r] = sum_k h_k(0, b, s) r^k / (k+2)!, h_k the complete homogeneous symmetric polynomial;
    # h_k(0, b, s) = h_k(b, s) = sum_i b^i s^(k-i), via h_k = s h_{k-1} + b^k.
    coeffs = []
    h, bk = 1.0, 1.0
    for k in range(_series_terms(torch.finfo(dtype).eps)):
        if k:
            bk *= b
            h = s * h + bk
        coeffs.append(h / math.factorial(k + 2))
    pairs = (
        ("0b", min(0.0, b), max(0.0, b), _gap(b)),
        ("bs", min(b, s), max(b, s), _gap(a)),
        ("0s", min(0.0, s), max(0.0, s), _gap(s)),
    )
    # f[0, b, s] = (f[mid, hi] - f[lo, mid]) / (hi - lo) around the median node: the well-conditioned order
    # (the two first differences then differ by a factor bounded away from 1 once |r| * spread >= 0.5).
    # The median is the node opposite the largest gap; written with the symmetric f[., .] the three cases
    # (median beta, median s, median 0) are:
    upper, lower, divisor = max([("bs", "0b", s), ("bs", "0s", b), ("0s", "0b", a)], key=lambda c: abs(c[2]))
    limit = _SERIES_SPREAD / spread if spread > 0 else math.inf
    return _ABPlan(s, spread, limit, tuple(coeffs), upper, lower, divisor, pairs)


@functools.lru_cache(maxsize=8)
def _exp_floor(dtype: torch.dtype) -> float:
    """log(tiny / eps): about -71.4 in fp32 (exp = 1e-31) and -672 in fp64."""
    info = torch.finfo(dtype)
    return math.log(info.tiny / info.eps)


def _exp_floored_(x: Tensor) -> Tensor:
    """In place: exp(max(x, log(tiny / eps))), i.e. exp(x) but never below ~1e-31 (fp32) / 1e-292 (fp64).

    Every use multiplies the result by a factor that is exactly 0 when p == q and at most max(1, |r|) in
    size, so the floor moves a summand or gradient entry by at most ~1e-31 * |log q - log p| in fp32, far
    below the rounding of any loss a run can show. What it buys is speed on CPU: arguments that underflow
    (routine for probabilities at logit scale 100) send the vectorised exp down a slow path, and underflowing
    results multiplied further become denormals, which every later op handles ~100x slower; results
    >= tiny / eps stay normal when scaled by anything >= eps.
    """
    return x.clamp_min_(_exp_floor(x.dtype)).exp_()


def _exp_ftz_(x: Tensor) -> Tensor:
    """In place: like _exp_floored_, but flushed to exactly 0 below the floor (for stand-alone terms)."""
    lo = _exp_floor(x.dtype)
    return F.threshold_(x.clamp_min_(lo - 1.0).exp_(), math.exp(lo), 0.0)


@functools.lru_cache(maxsize=256)
def _pair_consts(
    plan: _ABPlan, names: tuple[str, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Per-pair scalars as (P, 1, 1) tensors, so that all pairs are computed by the same few ops.

    max(lo r, hi r) = m r + h |r| with m = (lo + hi) / 2, h = (hi - lo) / 2; inv_gap = 1/gap multiplies the
    bounded factor expm1(-gap |r|) (so |factor| <= |r| and nothing overflows before the true value would); a zero
    gap is flagged to take the derivative instead.
    """
    rows = [plan.pair(n) for n in names]
    col = functools.partial(torch.tensor, dtype=dtype, device=device)
    m = col([(lo + hi) / 2 for lo, hi, _ in rows]).view(-1, 1, 1)
    h = col([(hi - lo) / 2 for lo, hi, _ in rows]).view(-1, 1, 1)
    inv_gap = col([1.0 / g if g else 0.0 for _, _, g in rows]).view(-1, 1, 1)
    neg_gap = col([-g for _, _, g in rows]).view(-1, 1, 1)
    zero = col([1.0 if not g else 0.0 for _, _, g in rows]).view(-1, 1, 1) if any(not g for *_, g in rows) else None
    return m, h, inv_gap, neg_gap, zero


def _neg_divided_differences(lp: Tensor, r: Tensor, ar: Tensor, plan: _ABPlan, names: tuple[str, ...]) -> Tensor:
    """-f[lo, hi] for the named pairs, stacked along a new first dim.

    f[lo, hi] = (f(hi) - f(lo)) / (hi - lo) = -sign(r) exp(max(E(lo), E(hi))) expm1(-gap |r|) / gap: the
    exponential is of the larger exponent (no overflow, no 0 * inf when probabilities underflow) and expm1
    keeps the difference exact when gap |r| is tiny (alpha, beta or alpha+beta -> 0, or p ~ q). A zero gap (on a
    limit line) gives the derivative, sign(r) exp(E) |r|, which is the limit of the same expression.
    """
    m, h, inv_gap, neg_gap, zero = _pair_consts(plan, names, r.dtype, r.device)
    e = _exp_floored_(torch.mul(m, r).addcmul_(h, ar).add_(lp, alpha=plan.s))
    w = torch.mul(ar, neg_gap).clamp_min_(_EXPM1_FLOOR).expm1_().mul_(inv_gap)
    if zero is not None:
        w.addcmul_(zero, ar, value=-1.0)
    return e.mul_(w).mul_(torch.sign(r))


def _ab_series(lp: Tensor, r: Tensor, plan: _ABPlan) -> Tensor:
    """Summands exp(s log p) r^2 exp[0, b r, s r] as a Taylor polynomial in r, for |r| * spread < 0.5.

    The coefficients are scalars; the nodes are at most 0.5 apart, so there is no cancellation (terms shrink
    like 0.5^k / k!). Small gathered subsets use one pow + one matrix-vector product, full blocks Horner.
    """
    c = plan.coeffs
    if r.numel() <= 4096:
        powers = r.unsqueeze(-1) ** torch.arange(len(c), dtype=r.dtype, device=r.device)
        poly = powers @ torch.tensor(c, dtype=r.dtype, device=r.device)
    else:
        poly = torch.full_like(r, c[-1])
        for ck in reversed(c[:-1]):
            poly.mul_(r).add_(ck)
    return poly.mul_(_exp_ftz_(lp * plan.s)).mul_(r).mul_(r)


def _logit_grad(g_logp: Tensor, logp: Tensor, out: Tensor) -> None:
    """Chain rule through log_softmax (up to a scalar): out = g - softmax * sum(g)."""
    softmax = torch.exp(logp.clamp_min(_exp_floor(logp.dtype)))  # see _exp_floored_
    torch.sub(g_logp, softmax.mul_(g_logp.sum(-1, keepdim=True)), out=out)


def _ab_block(
    lp: Tensor, lq: Tensor, plan: _ABPlan, per_sample: Tensor, gq: Tensor | None, gp: Tensor | None
) -> None:
    """One row block: per-sample D_AB into per_sample, and (up to the scalars in _AlphaBetaFn) the gradients
    with respect to the student's and the teacher's logits into gq and gp."""
    r = lq - lp
    ar = r.abs()
    if plan.spread == 0.0:  # the origin: 1/2 (log p - log q)^2
        idx, all_series = None, True
    else:
        idx = (ar < plan.series_limit).view(-1).nonzero().squeeze(1)
        all_series = idx.numel() == r.numel()
    names: list[str] = [] if all_series else [plan.lower, plan.upper]
    if gq is not None and "bs" not in names:
        names.append("bs")  # d/d(log q) of a summand is f[b, s] = q^b (q^a - p^a) / a
    if gp is not None and "0b" not in names:
        names.append("0b")  # d/d(log p) of a summand is -f[0, b] = p^a (p^b - q^b) / b
    neg_f = _neg_divided_differences(lp, r, ar, plan, tuple(names)) if names else None

    if idx is None:
        torch.sum(r * r, dim=-1, out=per_sample).mul_(0.5)
    elif all_series:
        torch.sum(_ab_series(lp, r, plan), dim=-1, out=per_sample)
    else:
        assert neg_f is not None
        # (f[upper] - f[lower]) / divisor; the division is applied to the per-sample sums.
        t = torch.sub(neg_f[0], neg_f[1])
        if idx.numel():
            series = _ab_series(lp.reshape(-1)[idx], r.reshape(-1)[idx], plan).mul_(plan.divisor)
            t.view(-1).index_copy_(0, idx, series)
        torch.sum(t, dim=-1, out=per_sample).mul_(1.0 / plan.divisor)
    per_sample.clamp_min_(0.0)  # the summands are >= 0; this only removes rounding-level negatives
    if gq is not None:
        assert neg_f is not None
        _logit_grad(neg_f[names.index("bs")], lq, gq)  # = -(d/d log q), sign restored in backward
    if gp is not None:
        assert neg_f is not None
        _logit_grad(neg_f[names.index("0b")], lp, gp)  # = d/d log p


def _overflow_to_inf(per_sample: Tensor, zs: Tensor, zt: Tensor) -> None:
    """Off the first quadrant the divergence can exceed the float range (alpha < 0 weighs 1/p^|alpha|); the
    intermediate infinities then meet as inf - inf. Report those rows as +inf, not NaN; NaN logits stay NaN."""
    nan = torch.isnan(per_sample)
    if per_sample.device.type == "cpu" and not bool(nan.any()):  # the common case, decided without a pass
        return
    finite_rows = torch.isfinite(zs).all(-1) & torch.isfinite(zt).all(-1)
    per_sample.masked_fill_(nan & finite_rows, math.inf)


# On CPU the rows are processed in blocks of at most this many (row, class) elements, which bounds the
# temporaries for very large class counts. Typical batches (B=256, C=1000) are one block: L2-sized blocks were
# measured no faster on 2 cores, and each block multiplies the number of parallel regions, each of which can
# stall for a scheduler tick at its join on a shared, oversubscribed CPU. Elsewhere (CUDA) it is one block.
_CPU_BLOCK = 1 << 20


def _row_blocks(rows: int, cols: int, device: torch.device) -> list[slice]:
    step = max(1, _CPU_BLOCK // max(cols, 1)) if device.type == "cpu" else max(rows, 1)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class _AlphaBetaFn(torch.autograd.Function):
    """Per-sample D_AB with the analytic logit gradient computed in the forward pass (it shares the divided
    differences with the value, so it is nearly free there)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, student: Tensor, teacher: Tensor, alpha: float, beta: float, temperature: float, grad: bool
    ) -> Tensor:
        dtype = _work_dtype(student, teacher)
        plan = _ab_plan(alpha, beta, dtype)
        shape = student.shape
        zs_all = student.reshape(-1, shape[-1])
        zt_all = teacher.reshape(-1, shape[-1])
        rows, cols = zs_all.shape
        new = functools.partial(torch.empty, dtype=dtype, device=student.device)
        per_sample = new(rows)
        gq = new((rows, cols)) if grad and ctx.needs_input_grad[0] else None  # grad: grad mode of the caller
        gp = new((rows, cols)) if grad and ctx.needs_input_grad[1] else None
        for blk in _row_blocks(rows, cols, student.device):
            zs, zt = zs_all[blk].to(dtype), zt_all[blk].to(dtype)
            if temperature != 1.0:
                zs, zt = zs / temperature, zt / temperature
            lq, lp = torch.log_softmax(zs, dim=-1), torch.log_softmax(zt, dim=-1)
            out = per_sample[blk]
            _ab_block(lp, lq, plan, out, None if gq is None else gq[blk], None if gp is None else gp[blk])
            _overflow_to_inf(out, zs, zt)
        ctx.save_for_backward(gq, gp)
        ctx.scales = (-1.0 / temperature, 1.0 / temperature)
        ctx.meta = (shape, student.dtype, teacher.dtype)
        return per_sample.reshape(shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        shape, s_dtype, t_dtype = ctx.meta
        weights = grad_out.reshape(-1, 1)
        grads: list[Tensor | None] = []
        for g, scale, dtype in zip(ctx.saved_tensors, ctx.scales, (s_dtype, t_dtype)):
            if g is None:
                grads.append(None)
                continue
            w = weights.to(g.dtype) * scale
            out = torch.empty_like(g)
            for blk in _row_blocks(g.shape[0], g.shape[1], g.device):
                torch.mul(g[blk], w[blk], out=out[blk])
            grads.append(out.reshape(shape).to(dtype))
        return grads[0], grads[1], None, None, None, None


def alpha_beta_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    reduction: str = "batchmean",
) -> Tensor:
    """D_AB(p || q) with p = softmax(teacher / T), q = softmax(student / T), summed over the last dim.

    Defined, continuous and smooth on the whole (alpha, beta) plane, including alpha = 0, beta = 0 and
    alpha + beta = 0 ((1, 0) is KL(p||q), (0, 1) is KL(q||p)). Computed in fp32 (fp64 for fp64 inputs) with
    autocast disabled; the result is fp32/fp64 whatever the input dtype. With alpha, beta >= 0, values and
    gradients stay finite however far apart the logits are (tested to 1e4); elsewhere the divergence itself can
    exceed the float range when probabilities differ by many orders of magnitude (alpha < 0 weighs
    1/p^|alpha|), and is then +inf. No T^2 factor: the caller's weight absorbs it. No double backward.
    """
    a, b = float(alpha), float(beta)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"alpha and beta must be finite, got alpha={alpha!r}, beta={beta!r}")
    t = _check_pair(student_logits, teacher_logits, temperature)
    with _no_autocast(student_logits.device.type):
        per_sample = _AlphaBetaFn.apply(student_logits, teacher_logits, a, b, t, torch.is_grad_enabled())
    return _reduce(per_sample, reduction)


# ------------------------------------------------------------------------------------------------ other losses
def kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> Tensor:
    """Forward KL(p || q) (teacher p, student q): mode-covering, the classic Hinton distillation loss."""
    t = _check_pair(student_logits, teacher_logits, temperature)
    with _no_autocast(student_logits.device.type):
        lq, lp = _log_probs(student_logits, teacher_logits, t)
        per_sample = (torch.exp(lp) * (lp - lq)).sum(-1)
    return _reduce(per_sample, reduction)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> Tensor:
    """Reverse KL(q || p): mode-seeking; the student may ignore teacher mass it cannot fit."""
    t = _check_pair(student_logits, teacher_logits, temperature)
    with _no_autocast(student_logits.device.type):
        lq, lp = _log_probs(student_logits, teacher_logits, t)
        per_sample = (torch.exp(lq) * (lq - lp)).sum(-1)
    return _reduce(per_sample, reduction)


def js_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> Tensor:
    """Jensen-Shannon divergence (natural log, bounded by log 2): symmetric and robust to disjoint support."""
    t = _check_pair(student_logits, teacher_logits, temperature)
    with _no_autocast(student_logits.device.type):
        lq, lp = _log_probs(student_logits, teacher_logits, t)
        lm = torch.logaddexp(lp, lq) - math.log(2.0)
        per_sample = 0.5 * (torch.exp(lp) * (lp - lm) + torch.exp(lq) * (lq - lm)).sum(-1)
    return _reduce(per_sample, reduction)


def symmetric_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "batchmean"
) -> Tensor:
    """KL(p||q) + KL(q||p), the symmetric loss KDPL uses."""
    t = _check_pair(student_logits, teacher_logits, temperature)
    with _no_autocast(student_logits.device.type):
        lq, lp = _log_probs(student_logits, teacher_logits, t)
        per_sample = ((torch.exp(lp) - torch.exp(lq)) * (lp - lq)).sum(-1)
    return _reduce(per_sample, reduction)


def promptkd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """PromptKD's loss, the same formula and normalisation, so its published KD weights (1000 / 200) carry over.

    KL(p||q) summed over every element, times T^2, divided by batch * classes (not by batch alone).
    """
    t = _check_pair(student_logits, teacher_logits, temperature)
    with _no_autocast(student_logits.device.type):
        lq, lp = _log_probs(student_logits, teacher_logits, t)
        loss = F.kl_div(lq, torch.exp(lp), reduction="sum") * (t * t)
    return loss / student_logits.numel()
