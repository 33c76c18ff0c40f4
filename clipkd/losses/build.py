"""``build_distill_loss(name, **params)``: a configured distillation loss, the one entry point for configs,
tests and outside users.

Which parameters a loss takes is read from its registered function (``clipkd.registry.LOSSES``): the
parameters after the two logit tensors, minus ``target``, ``epoch`` and ``reduction``. A method that takes a
``divergence`` uses ``alpha`` and ``beta`` only when that divergence is ``ab``. Anything else is an error that
names the parameter, its config key and what the loss does take, so a typo or a setting that would be
silently ignored (DISTILL.TEMPERATURE with TTM, DISTILL.ALPHA with KL) is caught at start-up.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from clipkd.config.checks import check_loss_keys, loss_params
from clipkd.errors import ConfigError
from clipkd.losses.methods import DIVERGENCE_NAMES
from clipkd.registry import LOSSES

__all__ = ["LOSS_NAMES", "PARAMS", "DistillLoss", "build_distill_loss", "build_distill_loss_from_cfg",
           "loss_params"]

LOSS_NAMES: tuple[str, ...] = LOSSES.names()  # DISTILL.LOSS's names, from clipkd.registry


def _finite(v: float) -> bool:
    return math.isfinite(v)


@dataclass(frozen=True)
class Param:
    key: str  # the config key
    default: Any
    ok: Callable[[Any], bool]
    must: str  # what ok() means, for the error


# Every parameter a loss may take, its config key, default and valid range. The config defaults
# (clipkd/config/defaults.py, DISTILL.*) are the same values (a test keeps them equal).
PARAMS: dict[str, Param] = {
    "divergence": Param("DISTILL.DIVERGENCE", "kl", lambda v: v in DIVERGENCE_NAMES,
                        f"one of {', '.join(DIVERGENCE_NAMES)}"),
    "alpha": Param("DISTILL.ALPHA", 0.8, _finite, "a finite real number"),
    "beta": Param("DISTILL.BETA", 0.3, _finite, "a finite real number"),
    "temperature": Param("DISTILL.TEMPERATURE", 1.0, lambda v: _finite(v) and v > 0, "a finite real number > 0"),
    "dkd_alpha": Param("DISTILL.DKD_ALPHA", 1.0, lambda v: _finite(v) and v >= 0, "a finite real number >= 0"),
    "dkd_beta": Param("DISTILL.DKD_BETA", 1.0, lambda v: _finite(v) and v >= 0, "a finite real number >= 0"),
    "dkd_warmup": Param("DISTILL.DKD_WARMUP", 1.0, lambda v: _finite(v) and v >= 0,
                        "a finite real number >= 0 (epochs; 0 = no warm-up)"),
    "ttm_exponent": Param("DISTILL.TTM_EXPONENT", 0.1, lambda v: _finite(v) and v > 0, "a finite real number > 0"),
    "dist_beta": Param("DISTILL.DIST_BETA", 1.0, lambda v: _finite(v) and v >= 0, "a finite real number >= 0"),
    "dist_gamma": Param("DISTILL.DIST_GAMMA", 1.0, lambda v: _finite(v) and v >= 0, "a finite real number >= 0"),
}


@functools.lru_cache(maxsize=None)
def _arguments(fn: Callable[..., Any]) -> tuple[str, ...]:
    """A loss function's argument names, read once (a loss is called every training step)."""
    return tuple(inspect.signature(fn).parameters)


def _check_value(param: str, value: Any) -> Any:
    spec = PARAMS.get(param)
    if spec is None:  # a parameter of a user-registered loss: passed as given
        return value
    if param == "divergence":
        value = value.strip().lower() if isinstance(value, str) else value
        good = isinstance(value, str) and spec.ok(value)
    else:
        good = (not isinstance(value, bool) and isinstance(value, numbers.Real) and spec.ok(float(value)))
        value = float(value) if good else value
    if not good:
        raise ConfigError(f"{spec.key} must be {spec.must}, got {value!r}")
    return value


@dataclass(frozen=True)
class DistillLoss:
    """A configured loss ``(student_logits, teacher_logits, target=None, epoch=None) -> scalar``.

    ``target`` (class index per sample) is used by losses that split by class (DKD) and ``epoch`` (1-based)
    by those with a warm-up; the others ignore both. Its repr is what run logs record.
    """

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def needs_target(self) -> bool:
        return "target" in _arguments(LOSSES.get(self.name))

    def __getitem__(self, param: str) -> Any:
        return dict(self.params)[param]

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None,
                 epoch: float | None = None) -> Tensor:
        fn = LOSSES.get(self.name)
        taken = _arguments(fn)
        extra = {k: v for k, v in (("target", target), ("epoch", epoch)) if k in taken}
        return fn(student_logits, teacher_logits, **extra, **dict(self.params))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)
        return f"{self.name}({shown})"


def build_distill_loss(name: str, **params: Any) -> DistillLoss:
    """The loss DISTILL.LOSS ``name`` names, with its parameters (the rest at their defaults).

    Names: kl, rkl, js, skl, promptkd_kl, ab (divergences, as the loss itself) and dkd, lsd, ttm, dist
    (methods; all but dist take ``divergence="kl"|"ab"|...`` inside). Parameters: divergence, alpha, beta,
    temperature, dkd_alpha, dkd_beta, dkd_warmup, ttm_exponent, dist_beta, dist_gamma, where they apply.
    All losses but promptkd_kl sum over classes and average over the batch; DISTILL.WEIGHT is the caller's.
    Bad names, values, or parameters the loss does not take raise ConfigError naming the config key.
    """
    key = LOSSES.check(name.strip().lower() if isinstance(name, str) else name)
    divergence = _check_value("divergence", params.get("divergence", PARAMS["divergence"].default))
    takes = loss_params(key, divergence)
    for param in params:
        if param not in takes:
            where = f" ({PARAMS[param].key})" if param in PARAMS else ""
            known = "" if param in PARAMS else f"; the parameters are {', '.join(PARAMS)}"
            why = (" (alpha and beta are the ab divergence's: set divergence='ab')"
                   if param in ("alpha", "beta") and "divergence" in takes else "")
            raise ConfigError(f"{param}{where} does not apply to DISTILL.LOSS {key}{why}; it takes "
                              f"{', '.join(takes) or 'no parameters'}{known}")
    values = []
    for param in takes:
        if param in params:
            values.append((param, _check_value(param, params[param])))
        elif param in PARAMS:
            values.append((param, PARAMS[param].default))
    return DistillLoss(key, tuple(values))


def build_distill_loss_from_cfg(cfg: Any) -> DistillLoss:
    """``build_distill_loss`` from DISTILL.LOSS and the DISTILL.* keys of the parameters it takes.

    A key the loss does not take must stay at its default: a changed value would be ignored silently, so it is
    an error that says which loss takes it (:func:`clipkd.config.checks.check_loss_keys`, which
    ``clipkd config show`` runs too).
    """
    takes = check_loss_keys(cfg)
    d = cfg.DISTILL
    return build_distill_loss(d.LOSS, **{p: d[PARAMS[p].key.split('.', 1)[1]] for p in takes if p in PARAMS})
