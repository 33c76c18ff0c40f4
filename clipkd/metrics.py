"""Metric formulas shared by the evaluator and the reports (no torch import, so reports stay fast)."""

from __future__ import annotations


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN / (B + N); 0 when both are 0."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
