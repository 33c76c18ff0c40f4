"""Distillation losses: the alpha-beta divergence on and off its limit lines, and the KL-family baselines.

References are written out plainly here (float64, or mpmath at 50 digits where float64 itself would cancel),
independently of the implementation's divided-difference form.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clipkd.config.defaults import get_cfg_defaults
from clipkd.errors import ConfigError
from clipkd.losses import (
    LOSS_NAMES,
    alpha_beta_divergence,
    build_distill_loss,
    build_distill_loss_from_cfg,
    js_divergence,
    kl_divergence,
    promptkd_kl,
    reverse_kl,
    symmetric_kl,
)

F64 = torch.float64
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (alpha, beta) points on the limit lines alpha = 0, beta = 0, alpha + beta = 0, and the origin.
LIMIT_POINTS = [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5), (-0.7, 0.0), (0.0, 1.3), (2.0, -2.0), (0.0, -0.6)]
FIRST_QUADRANT = [(0.8, 0.3), (0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (1e-4, 0.5)]


# ------------------------------------------------------------------------------------------------ references
def ab_general(s: torch.Tensor, t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The textbook formula (alpha, beta, alpha + beta != 0), per sample."""
    p, q = t.softmax(-1), s.softmax(-1)
    return (-1 / (a * b) * (p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b))).sum(-1)


def ab_limits(s: torch.Tensor, t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The paper's closed forms on the limit lines, per sample."""
    p, q = t.softmax(-1), s.softmax(-1)
    if a == 0 and b == 0:
        return 0.5 * ((p.log() - q.log()) ** 2).sum(-1)
    if b == 0:
        return (1 / a**2 * (p**a * torch.log(p**a / q**a) - p**a + q**a)).sum(-1)
    if a == 0:
        return (1 / b**2 * (q**b * torch.log(q**b / p**b) - q**b + p**b)).sum(-1)
    assert a == -b
    return (1 / a**2 * (torch.log(q**a / p**a) + (q**a / p**a) ** -1 - 1)).sum(-1)


def ab_mpmath(s: torch.Tensor, t: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The general formula or its limit at 50 digits: exact reference even a hair away from a limit line."""
    with mpmath.workdps(50):
        a_, b_ = mpmath.mpf(a), mpmath.mpf(b)
        s_ = a_ + b_
        out = []
        for zs, zt in zip(s.tolist(), t.tolist()):
            ls = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in zs))
            lt = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in zt))
            total = mpmath.mpf(0)
            for vs, vt in zip(zs, zt):
                x, y = mpmath.mpf(vt) - lt, mpmath.mpf(vs) - ls  # log p, log q
                if a_ == 0 and b_ == 0:
                    total += (x - y) ** 2 / 2
                elif b_ == 0:
                    total += (mpmath.exp(a_ * x) * a_ * (x - y) - mpmath.exp(a_ * x) + mpmath.exp(a_ * y)) / a_**2
                elif a_ == 0:
                    total += (mpmath.exp(b_ * y) * b_ * (y - x) - mpmath.exp(b_ * y) + mpmath.exp(b_ * x)) / b_**2
                elif s_ == 0:
                    total += (a_ * (y - x) + mpmath.exp(a_ * (x - y)) - 1) / a_**2
                else:
                    total += -(
                        mpmath.exp(a_ * x + b_ * y) - a_ / s_ * mpmath.exp(s_ * x) - b_ / s_ * mpmath.exp(s_ * y)
                    ) / (a_ * b_)
            out.append(float(total))
    return torch.tensor(out, dtype=F64)


def ab(s: torch.Tensor, t: torch.Tensor, a: float, b: float, **kw) -> torch.Tensor:
    return alpha_beta_divergence(s, t, a, b, reduction="none", **kw)


def logits(seed: int, shape: tuple[int, ...] = (4, 9), scale: float = 3.0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def pair(seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return logits(2 * seed, **kw), logits(2 * seed + 1, **kw)


# Random coefficients, plus values that put (alpha, beta) on or a hair off the limit lines (incl. a = -b).
coef = st.floats(-2.0, 2.0, allow_nan=False) | st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 1e-7, -1e-7])
seeds = st.integers(0, 10_000)


# ------------------------------------------------------------------------------------------------ properties
@FAST
@given(seed=seeds, a=coef, b=coef, classes=st.integers(2, 12), scale=st.sampled_from([0.3, 3.0, 10.0]))
def test_nonnegative_and_finite(seed: int, a: float, b: float, classes: int, scale: float) -> None:
    s, t = pair(seed, shape=(3, classes), scale=scale)
    v64 = ab(s, t, a, b)
    assert torch.isfinite(v64).all() and (v64 >= 0).all(), v64
    # In fp32 the divergence itself can exceed the range (e.g. alpha = beta = -2 weighs 1/p^4): then inf, not NaN.
    v32 = ab(s.float(), t.float(), a, b)
    assert (v32 >= 0).all(), v32
    assert torch.isfinite(v32[v64 < 1e30]).all(), (v32, v64)


@FAST
@given(seed=seeds, a=coef, b=coef, shift=st.integers(-50, 50))
def test_zero_iff_equal(seed: int, a: float, b: float, shift: int) -> None:
    # Dyadic logits and an integer shift keep every float operation exact, so the shift cancels exactly.
    t = torch.round(logits(seed, shape=(3, 7)) * 8) / 8
    assert (ab(t, t, a, b) == 0).all()
    assert (ab(t + shift, t, a, b) == 0).all()
    # Anything but a shift is strictly positive.
    bump = torch.zeros_like(t)
    bump[:, 0] = 0.5
    moved = ab(t + bump, t, a, b)
    assert (moved > 0).all()
    # An arbitrary real shift is zero up to the rounding of log_softmax (|log q - log p| ~ 1e-15).
    assert (ab(t + 0.123456789 * shift, t, a, b) <= 1e-20 * moved).all()


@FAST
@given(seed=seeds, a=coef, b=coef)
def test_matches_general_formula_inside(seed: int, a: float, b: float) -> None:
    assume(min(abs(a), abs(b), abs(a + b)) > 0.05)
    s, t = pair(seed)
    torch.testing.assert_close(ab(s, t, a, b), ab_general(s, t, a, b), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_named_points(seed: int) -> None:
    s, t = pair(seed)
    p, q = t.softmax(-1), s.softmax(-1)
    lp, lq = p.log(), q.log()
    close = torch.testing.assert_close
    close(ab(s, t, 1, 0), (p * (lp - lq)).sum(-1))  # forward KL
    close(ab(s, t, 0, 1), (q * (lq - lp)).sum(-1))  # reverse KL
    close(ab(s, t, 0.5, 0.5), 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))  # Hellinger
    close(ab(s, t, 1, 1), 0.5 * ((p - q) ** 2).sum(-1))  # squared Euclidean
    close(ab(s, t, 0, 0), 0.5 * ((lp - lq) ** 2).sum(-1))  # log-Euclidean
    # alpha + beta = 1: the alpha-divergence family, 1/(a(1-a)) sum(a p + (1-a) q - p^a q^(1-a)).
    a = 0.3
    close(ab(s, t, a, 1 - a), ((a * p + (1 - a) * q - p**a * q ** (1 - a)) / (a * (1 - a))).sum(-1))


@pytest.mark.parametrize("a,b", LIMIT_POINTS)
def test_limit_lines_match_closed_forms(a: float, b: float) -> None:
    s, t = pair(7)
    torch.testing.assert_close(ab(s, t, a, b), ab_limits(s, t, a, b), rtol=1e-10, atol=1e-13)


# The points of the README's table comparing clipkd with ABKD's CIFAR code on the limit lines (that code divides
# the closed form's bracket by the parameter, where the limit divides by its square): clipkd is the limit there.
README_LINE_POINTS = [(0.25, 0.0), (0.5, 0.0), (2.0, 0.0), (-0.5, 0.0), (-1.0, 0.0), (0.0, 0.25), (0.0, 0.5),
                      (0.0, 2.0), (0.0, -1.0), (0.25, -0.25), (0.5, -0.5), (2.0, -2.0), (-0.5, 0.5), (-1.0, 1.0)]


@pytest.mark.parametrize("a,b", README_LINE_POINTS)
def test_readme_limit_line_points_are_the_closed_forms(a: float, b: float) -> None:
    s, t = pair(11)
    torch.testing.assert_close(ab(s, t, a, b), ab_limits(s, t, a, b), rtol=1e-10, atol=1e-13)


NEAR = [(1e-3, 0.0), (0.0, 1e-3), (1e-5, -1e-5), (-1e-5, 2e-5), (1e-7, 1e-7), (-3e-4, 1e-4)]


@pytest.mark.parametrize("a0,b0", LIMIT_POINTS + [(0.8, 0.3)])
def test_accurate_next_to_limit_lines(a0: float, b0: float) -> None:
    """Against 50-digit references: fp64 to ~1e-12 and fp32 to ~1e-5 a hair off the lines (where the textbook
    formula loses half its digits in fp64 and all of them in fp32), and continuous across the line."""
    s, t = pair(11, shape=(3, 7))
    on_line = ab_mpmath(s, t, a0, b0)
    torch.testing.assert_close(ab(s, t, a0, b0), on_line, rtol=1e-12, atol=0)
    for da, db in NEAR:
        a, b = a0 + da, b0 + db
        ref = ab_mpmath(s, t, a, b)
        torch.testing.assert_close(ab(s, t, a, b), ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(ab(s.float(), t.float(), a, b).double(), ref, rtol=2e-5, atol=0)
        # Lipschitz in (alpha, beta): the value next to the line converges to the value on it.
        step = abs(da) + abs(db)
        assert ((ab(s, t, a, b) - on_line).abs() <= 100 * step * (1 + on_line)).all()


@pytest.mark.parametrize(
    "a0,b0,direction",
    [(1.0, 0.0, (0, 1)), (0.0, 1.0, (1, 0)), (0.5, -0.5, (1, 1)), (0.0, 0.0, (1, 0.3)), (-0.7, 0.0, (0, 1))],
)
def test_no_jump_across_a_line(a0: float, b0: float, direction: tuple[float, float]) -> None:
    """fp32 values along a fine segment through a limit line vary smoothly: no step anywhere."""
    s, t = pair(3, shape=(2, 50), dtype=torch.float32, scale=5.0)
    eps = torch.linspace(-1e-3, 1e-3, 41, dtype=F64)
    vals = torch.stack([ab(s, t, a0 + e * direction[0], b0 + e * direction[1]) for e in eps.tolist()]).double()
    ref = torch.stack([ab(s.double(), t.double(), a0 + e * direction[0], b0 + e * direction[1]) for e in eps.tolist()])
    torch.testing.assert_close(vals, ref, rtol=1e-5, atol=0)
    # Second differences of the fp64 values are h^2 D'' and vary slowly along the segment; a step of even
    # 1e-12 relative at the line would show up as a spike far above their typical size.
    second = (ref[2:] - 2 * ref[1:-1] + ref[:-2]).abs()
    typical = second.median(dim=0).values
    assert (second <= 2 * typical + 1e-12 * ref.abs().amax(dim=0)).all()


def test_near_origin_is_log_euclidean() -> None:
    s, t = pair(5)
    origin = ab(s, t, 0.0, 0.0)
    for r in (1e-3, 1e-5, 1e-8):
        for k in range(8):
            a, b = r * math.cos(k * math.pi / 4 + 0.1), r * math.sin(k * math.pi / 4 + 0.1)
            d = (ab(s, t, a, b) - origin).abs()
            assert (d <= 50 * r * origin).all(), (r, k, d)
            torch.testing.assert_close(ab(s, t, a, b), ab_mpmath(s, t, a, b), rtol=1e-12, atol=0)


@FAST
@given(seed=seeds, a=coef, b=coef)
def test_fp32_matches_fp64(seed: int, a: float, b: float) -> None:
    """No cancellation anywhere in the plane: fp32 agrees with fp64 on the same (fp32-representable) logits."""
    s, t = pair(seed, shape=(3, 20), dtype=torch.float32)
    v32, v64 = ab(s, t, a, b), ab(s.double(), t.double(), a, b)
    torch.testing.assert_close(v32.double(), v64, rtol=3e-5, atol=1e-30)


def test_series_and_divided_difference_branches_agree() -> None:
    """Student = teacher + small perturbations whose log-ratio |r| sweeps across the branch switch."""
    t = logits(1, shape=(1, 400))
    s = t + torch.logspace(-6, 1, 400, dtype=F64).unsqueeze(0) * torch.sign(torch.randn(1, 400, dtype=F64))
    for a, b in [(0.8, 0.3), (1.0, 0.0), (0.5, -0.5), (-1.2, 0.4), (2.0, 1.5)]:
        torch.testing.assert_close(ab(s, t, a, b), ab_mpmath(s, t, a, b), rtol=1e-11, atol=0)


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("a,b", LIMIT_POINTS + [(0.8, 0.3), (0.2, 0.7), (1e-6, 0.4), (0.3, -0.3 + 1e-7), (-1.1, 0.6)])
def test_gradcheck(a: float, b: float) -> None:
    s, t = pair(2, shape=(3, 6))
    s.requires_grad_(True)
    t.requires_grad_(True)
    full = (a, b) in {(0.8, 0.3), (1.0, 0.0), (0.0, 0.0)}  # the full Jacobian at a few points, projections elsewhere
    assert torch.autograd.gradcheck(lambda x, y: ab(x, y, a, b), (s, t), fast_mode=not full)
    assert torch.autograd.gradcheck(lambda x, y: ab(x, y, a, b, temperature=2.5), (s, t), fast_mode=True)


@pytest.mark.parametrize("a,b", [(0.8, 0.3), (0.2, 0.7), (-0.4, 1.2), (1.5, -0.3)])
def test_gradient_matches_textbook_autograd(a: float, b: float) -> None:
    s, t = pair(4)
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    alpha_beta_divergence(x1, t, a, b).backward()
    ab_general(x2, t, a, b).mean().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [100.0, 1e3, 1e4])
@pytest.mark.parametrize("a,b", FIRST_QUADRANT)
def test_finite_at_extreme_logits(scale: float, a: float, b: float) -> None:
    """Probabilities underflow to 0 at these scales; values and gradients must stay finite (fp32, bf16, fp16)."""
    s, t = pair(9, shape=(8, 64), scale=scale, dtype=torch.float32)
    x = s.clone().requires_grad_(True)
    y = t.clone().requires_grad_(True)
    v = alpha_beta_divergence(x, y, a, b)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()

    layer = torch.nn.Linear(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(s / scale)  # bf16 under autocast
        assert out.dtype == torch.bfloat16
        z = out * (scale / out.detach().abs().amax().float())
        v = alpha_beta_divergence(z, t.bfloat16(), a, b)
    assert v.dtype == torch.float32
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(layer.weight.grad).all()

    if scale <= 1e3:  # fp16 inputs (at 1e4 the true gradient itself can exceed fp16's 65504)
        xh = s.half().requires_grad_(True)
        v = alpha_beta_divergence(xh, t.half(), a, b)
        v.backward()
        assert xh.grad.dtype == torch.float16 and torch.isfinite(v) and torch.isfinite(xh.grad).all()


def test_finite_at_clip_scale_off_the_first_quadrant() -> None:
    """With |alpha|, |beta| small enough that p^alpha stays in range at logit scale 100, no NaN either."""
    g = torch.Generator().manual_seed(10)
    feats = F.normalize(torch.randn(200, 8, generator=g), dim=-1)
    s = 100 * F.normalize(torch.randn(16, 8, generator=g), dim=-1) @ feats.T  # CLIP-like: 100 * cosine
    t = 100 * F.normalize(torch.randn(16, 8, generator=g), dim=-1) @ feats.T
    for a, b in [(-0.2, 0.5), (0.6, -0.2), (0.3, -0.3), (-0.1, 0.0)]:
        x = s.clone().requires_grad_(True)
        v = alpha_beta_divergence(x, t, a, b)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(x.grad).all(), (a, b)


def test_teacher_without_grad_and_no_grad_mode() -> None:
    s, t = pair(12)
    x = s.clone().requires_grad_(True)
    alpha_beta_divergence(x, t, 0.8, 0.3).backward()
    assert x.grad is not None and t.grad is None
    with torch.no_grad():
        v = alpha_beta_divergence(s, t, 0.8, 0.3)
    assert not v.requires_grad


# ------------------------------------------------------------------------------------------------ reduction, T
def test_reductions_and_shapes() -> None:
    s, t = pair(13, shape=(2, 3, 5))
    per = ab(s, t, 0.8, 0.3)
    assert per.shape == (2, 3)
    torch.testing.assert_close(alpha_beta_divergence(s, t, 0.8, 0.3, reduction="sum"), per.sum())
    torch.testing.assert_close(alpha_beta_divergence(s, t, 0.8, 0.3), per.mean())
    for fn in (kl_divergence, reverse_kl, js_divergence, symmetric_kl):
        per = fn(s, t, reduction="none")
        assert per.shape == (2, 3)
        torch.testing.assert_close(fn(s, t, reduction="sum"), per.sum())
        torch.testing.assert_close(fn(s, t), per.mean())
    with pytest.raises(ValueError, match="reduction"):
        alpha_beta_divergence(s, t, 0.8, 0.3, reduction="mean")
    with pytest.raises(ValueError, match="shape"):
        alpha_beta_divergence(s, t[..., :4], 0.8, 0.3)
    with pytest.raises(ValueError, match="finite"):
        alpha_beta_divergence(s, t, float("nan"), 0.3)
    with pytest.raises(ValueError, match="temperature"):
        alpha_beta_divergence(s, t, 0.8, 0.3, temperature=0.0)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_divides_logits_without_t2(temperature: float) -> None:
    s, t = pair(14)
    for a, b in [(0.8, 0.3), (1.0, 0.0), (0.0, 0.0)]:
        torch.testing.assert_close(ab(s, t, a, b, temperature=temperature), ab(s / temperature, t / temperature, a, b))
        x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        alpha_beta_divergence(x1, t, a, b, temperature=temperature).backward()
        alpha_beta_divergence(x2 / temperature, t / temperature, a, b).backward()
        torch.testing.assert_close(x1.grad, x2.grad)
    for fn in (kl_divergence, reverse_kl, js_divergence, symmetric_kl):
        torch.testing.assert_close(fn(s, t, temperature=temperature), fn(s / temperature, t / temperature))


# ------------------------------------------------------------------------------------------------ other losses
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_family_against_torch(temperature: float) -> None:
    s, t = pair(15, shape=(6, 11))
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    ps, pt = ls.exp(), lt.exp()
    close = torch.testing.assert_close
    fkl = F.kl_div(ls, pt, reduction="batchmean")
    rkl = F.kl_div(lt, ps, reduction="batchmean")
    m = 0.5 * (ps + pt)
    jsd = 0.5 * F.kl_div(m.log(), pt, reduction="batchmean") + 0.5 * F.kl_div(m.log(), ps, reduction="batchmean")
    close(kl_divergence(s, t, temperature), fkl)
    close(reverse_kl(s, t, temperature), rkl)
    close(js_divergence(s, t, temperature), jsd)
    close(symmetric_kl(s, t, temperature), fkl + rkl)
    expected = F.kl_div(ls, pt, reduction="sum") * temperature**2 / s.numel()
    close(promptkd_kl(s, t, temperature), expected)
    # The AB family contains the first two.
    close(kl_divergence(s, t, temperature), alpha_beta_divergence(s, t, 1.0, 0.0, temperature))
    close(reverse_kl(s, t, temperature), alpha_beta_divergence(s, t, 0.0, 1.0, temperature))
    # Gradients follow torch's.
    T = temperature

    def ref_kl(x: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(x / T, -1), pt, reduction="batchmean")

    def ref_rkl(x: torch.Tensor) -> torch.Tensor:
        return F.kl_div(lt, F.softmax(x / T, -1), reduction="batchmean")

    def ref_promptkd(x: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(x / T, -1), pt, reduction="sum") * T**2 / x.numel()

    for ours, ref in [
        (lambda x: kl_divergence(x, t, T), ref_kl),
        (lambda x: reverse_kl(x, t, T), ref_rkl),
        (lambda x: promptkd_kl(x, t, T), ref_promptkd),
    ]:
        x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        ours(x1).backward()
        ref(x2).backward()
        close(x1.grad, x2.grad)


def test_kl_family_bounds_and_extremes() -> None:
    s, t = pair(16, shape=(4, 30), scale=1e4, dtype=torch.float32)
    for fn in (kl_divergence, reverse_kl, js_divergence, symmetric_kl, promptkd_kl):
        x = s.clone().requires_grad_(True)
        v = fn(x, t)
        v.backward()
        assert torch.isfinite(v) and v >= 0 and torch.isfinite(x.grad).all(), fn.__name__
    assert js_divergence(s, t) <= math.log(2) + 1e-6
    assert (kl_divergence(t, t, reduction="none") == 0).all()


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n not in ("dkd", "lsd", "ttm", "dist")])
def test_build_distill_loss(name: str) -> None:
    s, t = pair(17)
    loss = build_distill_loss(name, temperature=2.0, **({"alpha": 0.6, "beta": 0.2} if name == "ab" else {}))
    expected = {
        "ab": lambda: alpha_beta_divergence(s, t, 0.6, 0.2, 2.0),
        "kl": lambda: kl_divergence(s, t, 2.0),
        "rkl": lambda: reverse_kl(s, t, 2.0),
        "js": lambda: js_divergence(s, t, 2.0),
        "skl": lambda: symmetric_kl(s, t, 2.0),
        "promptkd_kl": lambda: promptkd_kl(s, t, 2.0),
    }[name]()
    torch.testing.assert_close(loss(s, t), expected)
    assert name in repr(loss)


def test_build_distill_loss_from_cfg() -> None:
    cfg = get_cfg_defaults()
    s, t = pair(18)
    torch.testing.assert_close(build_distill_loss_from_cfg(cfg)(s, t), alpha_beta_divergence(s, t, 0.8, 0.3))
    cfg.DISTILL.LOSS, cfg.DISTILL.TEMPERATURE = "promptkd_kl", 4.0
    torch.testing.assert_close(build_distill_loss_from_cfg(cfg)(s, t), promptkd_kl(s, t, 4.0))


def test_build_distill_loss_errors() -> None:
    with pytest.raises(ConfigError, match="DISTILL.LOSS") as err:
        build_distill_loss("kld")
    assert all(name in str(err.value) for name in LOSS_NAMES)
    for bad in (float("nan"), float("inf"), "0.8", None, True):
        with pytest.raises(ConfigError, match="DISTILL.ALPHA"):
            build_distill_loss("ab", alpha=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="DISTILL.BETA"):
            build_distill_loss("ab", beta=bad)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="DISTILL.TEMPERATURE"):
            build_distill_loss("kl", temperature=bad)
    # Limit-line values are legitimate.
    for a, b in LIMIT_POINTS:
        build_distill_loss("ab", alpha=a, beta=b)
