"""Time clipkd's alpha-beta divergence against the textbook formula, forward + backward, on CPU.

The textbook version raises softmax probabilities to powers (as the ABKD reference code does); at CLIP's
logit scale those probabilities underflow to 0 and its backward pass produces inf * 0 = NaN, which the table
counts. Run as ``python benchmarks/ab_loss.py [--repeats N]``; other scripts can import ``run``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from clipkd.losses import alpha_beta_divergence

BATCH = 256
CLASSES = 1000
LOGIT_SCALE = 100.0
FEATURE_DIM = 8  # low-dimensional features spread cosines over [-1, 1], so softmax(100 cos) underflows
# (point label, alpha, beta): the paper's two starting points and a point next to forward KL, where the
# textbook formula still divides by beta.
POINTS: tuple[tuple[str, float, float], ...] = (
    ("(0.8, 0.3)", 0.8, 0.3),
    ("(0.2, 0.7)", 0.2, 0.7),
    ("(1, 1e-3)", 1.0, 1e-3),
    ("(0.5, 0.5)", 0.5, 0.5),
)


def textbook_ab(student_logits: Tensor, teacher_logits: Tensor, alpha: float, beta: float) -> Tensor:
    """The formula as written in the paper, on probabilities (the baseline being measured)."""
    p = torch.softmax(teacher_logits, dim=-1)
    q = torch.softmax(student_logits, dim=-1)
    s = alpha + beta
    inner = p**alpha * q**beta - alpha / s * p**s - beta / s * q**s
    return (-inner.sum(-1) / (alpha * beta)).mean()


def make_logits(seed: int = 0) -> tuple[Tensor, Tensor]:
    """CLIP-like logits: 100 * cosine between unit image features and unit class features."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.nn.functional.normalize(torch.randn(CLASSES, FEATURE_DIM, generator=g), dim=-1)
    img_t = torch.nn.functional.normalize(torch.randn(BATCH, FEATURE_DIM, generator=g), dim=-1)
    img_s = torch.nn.functional.normalize(img_t + 0.5 * torch.randn(BATCH, FEATURE_DIM, generator=g), dim=-1)
    return LOGIT_SCALE * img_s @ classes.T, LOGIT_SCALE * img_t @ classes.T


def _step(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, teacher: Tensor) -> float:
    x.grad = None
    t0 = time.perf_counter()
    fn(x, teacher).backward()
    return (time.perf_counter() - t0) * 1e3


def _nonfinite_grads(fn: Callable[[Tensor, Tensor], Tensor], student: Tensor, teacher: Tensor) -> int:
    x = student.clone().requires_grad_(True)
    fn(x, teacher).backward()
    assert x.grad is not None
    return int((~torch.isfinite(x.grad)).sum())


def run(repeats: int = 30, seed: int = 0) -> list[dict]:
    """One dict per (alpha, beta) point: point, alpha, beta, clipkd_ms, textbook_ms, ratio, non-finite counts.

    The two implementations are timed alternately (warm-up first), so load from other processes on a shared
    machine hits both alike; each time is the median forward+backward over ``repeats``.
    """
    student, teacher = make_logits(seed)
    rows = []
    for label, a, b in POINTS:
        ours = functools.partial(_ours, alpha=a, beta=b)
        ref = functools.partial(textbook_ab, alpha=a, beta=b)
        xs = student.clone().requires_grad_(True)
        xr = student.clone().requires_grad_(True)
        for _ in range(3):
            _step(ours, xs, teacher)
            _step(ref, xr, teacher)
        ours_ms, ref_ms = [], []
        for _ in range(repeats):
            ours_ms.append(_step(ours, xs, teacher))
            ref_ms.append(_step(ref, xr, teacher))
        o, t = statistics.median(ours_ms), statistics.median(ref_ms)
        rows.append(
            {
                "point": label,
                "alpha": a,
                "beta": b,
                "clipkd_ms": o,
                "textbook_ms": t,
                "ratio": t / o,
                "clipkd_nonfinite_grads": _nonfinite_grads(ours, student, teacher),
                "textbook_nonfinite_grads": _nonfinite_grads(ref, student, teacher),
            }
        )
    return rows


def _ours(student_logits: Tensor, teacher_logits: Tensor, alpha: float, beta: float) -> Tensor:
    return alpha_beta_divergence(student_logits, teacher_logits, alpha, beta)


def markdown(rows: list[dict]) -> str:
    lines = [
        f"B={BATCH}, C={CLASSES}, logits = {LOGIT_SCALE:g} * cosine (dim {FEATURE_DIM}), fp32, "
        f"{torch.get_num_threads()} threads, median forward+backward",
        "",
        "| point | clipkd ms | textbook ms | ratio (textbook/clipkd) "
        "| clipkd non-finite grads | textbook non-finite grads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['point']} | {r['clipkd_ms']:.2f} | {r['textbook_ms']:.2f} | {r['ratio']:.2f} | "
            f"{r['clipkd_nonfinite_grads']} | {r['textbook_nonfinite_grads']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(markdown(run(args.repeats)))


if __name__ == "__main__":
    main()
