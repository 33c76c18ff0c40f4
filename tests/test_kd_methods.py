"""The KD methods ABKD plugs into (DKD, LSD, TTM, DIST) with KL or the alpha-beta divergence inside.

Each reference below restates the method's formula on probabilities in float64, as the papers (and ABKD's
``distiller_zoo``) write it, independently of clipkd's log-domain implementation.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipkd.config import build_config
from clipkd.config.defaults import get_cfg_defaults
from clipkd.methods.kd import KDObjective, build_kd_objective
from clipkd.errors import ConfigError
from clipkd.losses import PARAMS, build_distill_loss, build_distill_loss_from_cfg
from clipkd.registry import LOSSES
from test_train import ROOT, check_results, config, fit, interrupt_after_checkpoint

F64 = torch.float64
TEMPERATURES = [1.0, 2.0, 4.0]
DIVERGENCES = [("kl", None), ("ab", (0.8, 0.3)), ("ab", (0.5, 0.5)), ("ab", (0.2, 0.7))]
METHODS_WITH_DIVERGENCE = ("dkd", "lsd", "ttm")


def pair(seed: int, rows: int = 6, classes: int = 9, scale: float = 3.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, classes, generator=g, dtype=F64) * scale
    t = torch.randn(rows, classes, generator=g, dtype=F64) * scale
    y = torch.randint(0, classes, (rows,), generator=g)
    return s.to(dtype), t.to(dtype), y


# ------------------------------------------------------------------------------------------------ references
def ref_div(p: torch.Tensor, q: torch.Tensor, ab: tuple[float, float] | None) -> torch.Tensor:
    """KL(p||q) (ab None) or the textbook D_AB(p||q) per row, from probabilities."""
    if ab is None:
        return (p * (p.log() - q.log())).sum(-1)
    a, b = ab
    return (-1 / (a * b) * (p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b))).sum(-1)


def ref_dkd(s, t, y, T, ab, dkd_alpha, dkd_beta, factor=1.0):
    ps, pt = (s / T).softmax(-1), (t / T).softmax(-1)
    gt = torch.nn.functional.one_hot(y, s.shape[-1]).bool()
    bs = torch.stack([ps[gt], 1 - ps[gt]], -1)
    bt = torch.stack([pt[gt], 1 - pt[gt]], -1)
    tckd = (bt * (bt / bs).log()).sum(-1)
    rows = s.shape[0]
    ns = (s[~gt].view(rows, -1) / T).softmax(-1)
    nt = (t[~gt].view(rows, -1) / T).softmax(-1)
    nckd = ref_div(nt, ns, ab)
    return (factor * (dkd_alpha * tckd + dkd_beta * nckd) * T**2).mean()


def ref_lsd(s, t, T, ab):
    def z(x):
        return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))

    return (ref_div((z(t) / T).softmax(-1), (z(s) / T).softmax(-1), ab) * T**2).mean()


def ref_ttm(s, t, exponent, ab):
    p = t.softmax(-1) ** exponent
    p = p / p.sum(-1, keepdim=True)
    return ref_div(p, s.softmax(-1), ab).mean()


def ref_dist(s, t, T, beta, gamma):
    ys, yt = (s / T).softmax(-1), (t / T).softmax(-1)

    def corr_distance(a, b):  # 1 - mean over rows of the Pearson correlation, computed plainly
        out = []
        for u, v in zip(a, b):
            u, v = u - u.mean(), v - v.mean()
            out.append((u * v).sum() / (u.norm() * v.norm() + 1e-8))
        return 1 - torch.stack(out).mean()

    return T**2 * (beta * corr_distance(ys, yt) + gamma * corr_distance(ys.t(), yt.t()))


def params(divergence: str, ab):
    out = {"divergence": divergence}
    if ab is not None:
        out["alpha"], out["beta"] = ab
    return out


# ------------------------------------------------------------------------------------------------ against formulas
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("divergence,ab", DIVERGENCES)
def test_dkd_matches_formula(T, divergence, ab):
    for seed in range(3):
        s, t, y = pair(seed)
        loss = build_distill_loss("dkd", temperature=T, dkd_alpha=0.7, dkd_beta=2.0, **params(divergence, ab))
        torch.testing.assert_close(loss(s, t, target=y, epoch=3), ref_dkd(s, t, y, T, ab, 0.7, 2.0))


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("divergence,ab", DIVERGENCES)
def test_lsd_matches_formula(T, divergence, ab):
    for seed in range(3):
        s, t, _ = pair(seed, scale=5.0)
        loss = build_distill_loss("lsd", temperature=T, **params(divergence, ab))
        torch.testing.assert_close(loss(s, t), ref_lsd(s, t, T, ab))


@pytest.mark.parametrize("exponent", [0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("divergence,ab", DIVERGENCES)
def test_ttm_matches_formula(exponent, divergence, ab):
    for seed in range(3):
        s, t, _ = pair(seed)
        loss = build_distill_loss("ttm", ttm_exponent=exponent, **params(divergence, ab))
        torch.testing.assert_close(loss(s, t), ref_ttm(s, t, exponent, ab))
    # exponent 1 is plain KD (ttm of kl) / plain AB
    if exponent == 1.0:
        plain = build_distill_loss("kl") if ab is None else build_distill_loss("ab", alpha=ab[0], beta=ab[1])
        torch.testing.assert_close(loss(s, t), plain(s, t))


@pytest.mark.parametrize("T", TEMPERATURES)
def test_dist_matches_formula(T):
    for seed in range(3):
        s, t, _ = pair(seed)
        loss = build_distill_loss("dist", temperature=T, dist_beta=0.5, dist_gamma=2.0)
        torch.testing.assert_close(loss(s, t), ref_dist(s, t, T, 0.5, 2.0))
    assert build_distill_loss("dist")(t, t) == pytest.approx(0.0, abs=1e-5)  # DIST's eps in the cosine


def test_reductions_and_the_other_divergences_inside():
    from clipkd.losses import js_divergence, lsd_loss, reverse_kl

    s, t, _ = pair(5)
    per_sample = lsd_loss(s, t, divergence="rkl", temperature=2.0, reduction="none")
    assert per_sample.shape == (6,)
    z = lambda x: (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))  # noqa: E731
    torch.testing.assert_close(per_sample, reverse_kl(z(s), z(t), 2.0, reduction="none") * 4.0)
    torch.testing.assert_close(build_distill_loss("ttm", divergence="js", ttm_exponent=0.5)(s, t),
                               js_divergence(s, 0.5 * t))


# ------------------------------------------------------------------------------------------------ AB at (1, 0) = KL
@pytest.mark.parametrize("name", METHODS_WITH_DIVERGENCE)
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_ab_variant_at_1_0_is_its_kl_parent(name, T):
    kw = {"temperature": T} if name != "ttm" else {"ttm_exponent": 0.3}
    kl = build_distill_loss(name, divergence="kl", **kw)
    ab = build_distill_loss(name, divergence="ab", alpha=1.0, beta=0.0, **kw)
    for seed in range(3):
        s, t, y = pair(seed, scale=10.0)
        torch.testing.assert_close(ab(s, t, target=y, epoch=5), kl(s, t, target=y, epoch=5), rtol=1e-10, atol=1e-12)
        xs, xk = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        ab(xs, t, target=y, epoch=5).backward()
        kl(xk, t, target=y, epoch=5).backward()
        torch.testing.assert_close(xs.grad, xk.grad, rtol=1e-8, atol=1e-12)
    s, t, _ = pair(9)
    torch.testing.assert_close(build_distill_loss("ab", alpha=1.0, beta=0.0, temperature=T)(s, t),
                               build_distill_loss("kl", temperature=T)(s, t))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), a=st.floats(0.0, 1.5), b=st.floats(0.0, 1.5),
       name=st.sampled_from(METHODS_WITH_DIVERGENCE))
def test_ab_variants_are_nonnegative_and_zero_at_equal_logits(seed, a, b, name):
    s, t, y = pair(seed)
    loss = build_distill_loss(name, divergence="ab", alpha=a, beta=b)
    assert loss(s, t, target=y, epoch=1) >= -1e-12
    matched = 0.1 * t if name == "ttm" else t  # TTM matches the student to the teacher's logits x exponent
    assert abs(float(loss(matched, t, target=y, epoch=1))) < 1e-9


# ------------------------------------------------------------------------------------------------ numerics
def clip_logits(seed: int, rows: int = 8, classes: int = 50):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(classes, 16, generator=g), dim=-1)
    img = lambda: torch.nn.functional.normalize(torch.randn(rows, 16, generator=g), dim=-1)  # noqa: E731
    return 100 * img() @ feats.T, 100 * img() @ feats.T, torch.randint(0, classes, (rows,), generator=g)


ALL_SETTINGS = [("dist", {})] + [
    (name, params(divergence, ab)) for name in METHODS_WITH_DIVERGENCE
    for divergence, ab in [("kl", None), ("ab", (0.8, 0.3)), ("ab", (0.2, 0.7)), ("ab", (1.0, 0.0)),
                           ("ab", (0.5, 0.5))]
]


@pytest.mark.parametrize("name,kw", ALL_SETTINGS, ids=lambda v: str(v))
def test_finite_gradients_at_clip_scale_fp32_and_bf16(name, kw):
    """Logit scale 100 (probabilities underflow): value and gradient finite, in fp32 and under bf16 autocast."""
    loss = build_distill_loss(name, **kw)
    s, t, y = clip_logits(1)
    x = s.clone().requires_grad_(True)
    v = loss(x, t, target=y, epoch=1)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(x.grad).all() and v.dtype == torch.float32

    layer = torch.nn.Linear(16, 50)
    g = torch.Generator().manual_seed(2)
    inp = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(inp)
        assert out.dtype == torch.bfloat16
        z = out * (100 / out.detach().abs().amax().float())
        v = loss(z, t.bfloat16(), target=y, epoch=1)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(layer.weight.grad).all()


def test_dkd_stays_finite_where_the_reference_takes_log_of_zero():
    """A student certain of the target (1 - q_t underflows to 0): the reference code's log(1 - q_t) is -inf."""
    s = torch.full((2, 10), -60.0)
    s[:, 3] = 60.0
    t = torch.randn(2, 10)
    y = torch.tensor([3, 3])
    x = s.clone().requires_grad_(True)
    v = build_distill_loss("dkd")(x, t, target=y, epoch=1)
    v.backward()
    assert torch.isfinite(v) and v > 0 and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ DKD specifics
def test_dkd_warmup_factor():
    s, t, y = pair(3)
    loss = build_distill_loss("dkd", dkd_warmup=5.0)
    full = loss(s, t, target=y, epoch=5)
    for epoch in (1, 2, 4):
        torch.testing.assert_close(loss(s, t, target=y, epoch=epoch), full * (epoch / 5))
    torch.testing.assert_close(loss(s, t, target=y, epoch=12), full)
    torch.testing.assert_close(build_distill_loss("dkd", dkd_warmup=0.0)(s, t, target=y), full)
    torch.testing.assert_close(build_distill_loss("dkd", dkd_warmup=1.0)(s, t, target=y, epoch=1), full)
    with pytest.raises(ValueError, match="needs the epoch"):
        loss(s, t, target=y)
    with pytest.raises(ValueError, match="target"):
        loss(s, t, epoch=1)


def test_objective_counts_epochs_and_saves_them():
    loss = build_distill_loss("dkd", dkd_warmup=4.0)
    obj = KDObjective(loss, weight=2.0)
    s, t, y = pair(4, dtype=torch.float32)
    first, _ = obj(s, t, y)
    torch.testing.assert_close(first, 2.0 * loss(s, t, target=y, epoch=1))
    obj.end_epoch(1, None)
    obj.end_epoch(2, None)
    torch.testing.assert_close(obj(s, t, y)[0], 2.0 * loss(s, t, target=y, epoch=3))
    again = KDObjective(loss, weight=2.0)
    again.load_state_dict(obj.state_dict())
    assert again.epoch == 3 and obj.needs_labels and obj.needs_teacher


def test_transductive_target_is_the_teachers_argmax_and_labels_are_unused():
    s, t, y = pair(6, dtype=torch.float32)
    loss = build_distill_loss("dkd")
    trans = KDObjective(loss, 1.0, target_from_teacher=True)
    garbage = torch.full_like(y, -5)  # not a class index: would fail if it were used
    value, _ = trans(s, t, garbage)
    torch.testing.assert_close(value, loss(s, t, target=t.argmax(-1), epoch=1))
    assert not trans.needs_labels and "teacher's argmax" in repr(trans)
    ind = KDObjective(loss, 1.0)
    torch.testing.assert_close(ind(s, t, y)[0], loss(s, t, target=y, epoch=1))
    assert ind.needs_labels and "target: the labels" in repr(ind)
    cfg = build_config([], ["DISTILL.LOSS", "dkd", "DISTILL.PROTOCOL", "transductive"])
    assert build_kd_objective(cfg).target_from_teacher
    assert not build_kd_objective(build_config([], ["DISTILL.LOSS", "dkd"])).target_from_teacher
    # methods without a target never look at labels
    assert not KDObjective(build_distill_loss("lsd"), 1.0).needs_labels


# ------------------------------------------------------------------------------------------------ the builder
def test_each_loss_takes_exactly_its_parameters():
    from clipkd.losses import loss_params

    assert loss_params("kl") == ("temperature",) and loss_params("ab") == ("alpha", "beta", "temperature")
    assert loss_params("dkd") == ("divergence", "temperature", "dkd_alpha", "dkd_beta", "dkd_warmup")
    assert loss_params("dkd", "ab") == ("divergence", "alpha", "beta", "temperature", "dkd_alpha", "dkd_beta",
                                        "dkd_warmup")
    assert loss_params("ttm", "ab") == ("divergence", "alpha", "beta", "ttm_exponent")
    assert loss_params("dist") == ("temperature", "dist_beta", "dist_gamma")
    assert set(LOSSES.names()) == {"ab", "kl", "rkl", "js", "skl", "promptkd_kl", "dkd", "lsd", "ttm", "dist"}


@pytest.mark.parametrize("name,kw,pattern", [
    ("kl", {"alpha": 0.5}, r"alpha \(DISTILL.ALPHA\) does not apply to DISTILL.LOSS kl; it takes temperature"),
    ("dkd", {"beta": 0.5}, r"set divergence='ab'"),
    ("ttm", {"temperature": 2.0}, r"temperature .* does not apply to DISTILL.LOSS ttm"),
    ("dist", {"divergence": "ab"}, r"divergence .* does not apply to DISTILL.LOSS dist"),
    ("lsd", {"tempreature": 2.0}, r"tempreature does not apply .* the parameters are divergence, alpha"),
    ("dkd", {"divergence": "euclid"}, r"DISTILL.DIVERGENCE must be one of kl, ab, rkl, js, skl"),
    ("dkd", {"dkd_beta": -1.0}, r"DISTILL.DKD_BETA must be a finite real number >= 0"),
    ("ttm", {"ttm_exponent": 0.0}, r"DISTILL.TTM_EXPONENT must be a finite real number > 0"),
    ("dist", {"dist_gamma": float("nan")}, r"DISTILL.DIST_GAMMA"),
    ("dkd", {"dkd_warmup": "1"}, r"DISTILL.DKD_WARMUP"),
])
def test_builder_errors(name, kw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_distill_loss(name, **kw)


def test_every_loss_parameter_has_one_config_key_made_from_the_table():
    """The DISTILL.<PARAM> keys are made from the one table of loss parameters (PARAMS): every parameter a
    registered loss takes has exactly one row there, and its key exists with the row's default."""
    from clipkd.losses import loss_params

    d = get_cfg_defaults().DISTILL
    taken = {p for name in LOSSES for p in loss_params(name, "ab")}
    assert taken == set(PARAMS)
    for param, spec in PARAMS.items():
        assert spec.key == f"DISTILL.{param.upper()}"
        assert [k for k in d if k.lower() == param] == [param.upper()]
        assert d[param.upper()] == spec.default, param


@pytest.fixture()
def epoch_probe():
    """A test-local loss with a warm-up but no target: returns the epoch it was given (-1 for None)."""
    seen: list = []

    def probe(student_logits, teacher_logits, epoch=None, *, temperature=1.0):
        seen.append(epoch)
        return student_logits.sum() * 0 + (-1.0 if epoch is None else float(epoch))

    LOSSES.register("epoch_probe", probe)
    try:
        yield seen
    finally:
        LOSSES._targets.pop("epoch_probe", None)
        LOSSES._resolved.pop("epoch_probe", None)


def test_a_loss_without_a_target_gets_the_epoch(epoch_probe):
    loss = build_distill_loss("epoch_probe")
    obj = KDObjective(loss, 1.0)
    s, t, y = pair(5, dtype=torch.float32)
    assert obj(s, t, y)[0].item() == 1.0
    obj.end_epoch(1, None)
    obj.end_epoch(2, None)
    assert obj(s, t, y)[0].item() == 3.0
    assert epoch_probe == [1, 3] and not obj.needs_labels


def test_the_loss_is_bound_once_at_build(monkeypatch):
    """A training step calls the loss: no registry look-up, no signature read per call."""
    import inspect

    s, t, y = pair(7, dtype=torch.float32)
    built = {n: build_distill_loss(n) for n in LOSSES}
    expected = {n: loss(s, t, target=y, epoch=1) for n, loss in built.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("looked up at call time")

    monkeypatch.setattr(inspect, "signature", refuse)
    monkeypatch.setattr(LOSSES, "get", refuse)
    monkeypatch.setattr(LOSSES, "arguments", refuse)
    for name, loss in built.items():
        torch.testing.assert_close(loss(s, t, target=y, epoch=1), expected[name], rtol=0, atol=0)
        torch.testing.assert_close(KDObjective(loss, 1.0)(s, t, y)[0], expected[name], rtol=0, atol=0)


def test_a_built_loss_pickles():
    import pickle

    s, t, y = pair(8, dtype=torch.float32)
    for name in LOSSES:
        loss = build_distill_loss(name)
        again = pickle.loads(pickle.dumps(loss))
        assert again == loss and repr(again) == repr(loss)
        assert torch.equal(again(s, t, y, 1), loss(s, t, y, 1))


@pytest.mark.parametrize("overrides,pattern", [
    (["DISTILL.LOSS", "kl", "DISTILL.DIVERGENCE", "ab"], r"DISTILL.DIVERGENCE 'ab' does not apply to DISTILL.LOSS kl"),
    (["DISTILL.LOSS", "ttm", "DISTILL.TEMPERATURE", "4"], r"DISTILL.TEMPERATURE 4.0 does not apply .* ttm"),
    (["DISTILL.LOSS", "dkd", "DISTILL.ALPHA", "0.5"], r"alpha and beta apply when DISTILL.DIVERGENCE is ab"),
    (["DISTILL.LOSS", "ab", "DISTILL.DKD_BETA", "8"], r"DISTILL.DKD_BETA 8.0 does not apply .* used by dkd"),
])
def test_config_keys_the_loss_does_not_take_are_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_distill_loss_from_cfg(build_config([], overrides))


def test_config_builds_each_method():
    cfg = build_config([], ["DISTILL.LOSS", "dkd", "DISTILL.DIVERGENCE", "ab", "DISTILL.ALPHA", "0.6",
                            "DISTILL.DKD_BETA", "0.5", "DISTILL.DKD_WARMUP", "2"])
    loss = build_distill_loss_from_cfg(cfg)
    assert loss == build_distill_loss("dkd", divergence="ab", alpha=0.6, beta=0.3, dkd_beta=0.5, dkd_warmup=2.0)
    assert repr(loss) == ("dkd(divergence=ab, alpha=0.6, beta=0.3, temperature=1, dkd_alpha=1, dkd_beta=0.5, "
                          "dkd_warmup=2)")
    with pytest.raises(ConfigError, match="DISTILL.TTM_EXPONENT must be > 0"):
        build_config([], ["DISTILL.LOSS", "ttm", "DISTILL.TTM_EXPONENT", "0"])


# ------------------------------------------------------------------------------------------------ end to end
RECIPES = ["dkd_promptkd", "abdkd_promptkd", "lsd_promptkd", "ablsd_promptkd", "ttm_promptkd", "abttm_promptkd",
           "dist_promptkd"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_train_end_to_end(synth_root, tmp_path, recipe):
    cfg = config(synth_root, recipe, "OPTIM.MAX_EPOCH", "1", "OPTIM.LR", "0.01", "DATALOADER.TRAIN_X.BATCH_SIZE", "4")
    results = fit(cfg, tmp_path / recipe)
    check_results(results)
    log = (tmp_path / recipe / "log.txt").read_text()
    name = recipe.split("_")[0].removeprefix("ab") if recipe != "abdkd_promptkd" else "dkd"
    assert f"objective {name}(" in log
    if recipe.startswith("ab"):
        assert "divergence=ab, alpha=0.8, beta=0.3" in log


def test_transductive_dkd_run_logs_its_target(synth_root, tmp_path):
    cfg = config(synth_root, "abdkd_promptkd", "DISTILL.PROTOCOL", "transductive", "DATASET.NUM_SHOTS", "2",
                 "OPTIM.MAX_EPOCH", "1")
    check_results(fit(cfg, tmp_path / "run"))
    assert "target: the teacher's argmax, labels unused" in (tmp_path / "run" / "log.txt").read_text()


def test_transductive_dkd_target_label_passes_every_training_images_true_label(synth_root, tmp_path, monkeypatch):
    """DISTILL.DKD_TARGET label: ABKD's CLIP code (a PromptKD fork) gives DKD the ground-truth label of every
    training image in its all-images run; the targets are then exactly the labels of the base AND new images."""
    from clipkd.data.splits import resolve_split

    true = sorted(item.label for item in resolve_split(synth_root, "oxford_pets", 0, 1, "all").train)
    assert max(true) >= 4  # new classes (7 classes: base 0-3, new 4-6) are among the training images
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_forward = KDObjective.__call__

    def spy_objective(self, s, t, labels, features=None):
        seen.append(("labels", labels.clone()))
        return real_forward(self, s, t, labels, features)

    real_dkd = LOSSES.get("dkd")

    @functools.wraps(real_dkd)  # the same signature: bound as dkd itself is
    def spy_loss(s, t, target=None, **kwargs):
        seen.append(("target", target.clone()))
        return real_dkd(s, t, target=target, **kwargs)

    monkeypatch.setattr(KDObjective, "__call__", spy_objective)
    monkeypatch.setitem(LOSSES._resolved, "dkd", spy_loss)  # the objective calls the bound function itself
    # one batch holding every training image (nothing dropped), one epoch
    cfg = config(synth_root, "dkd_promptkd", "DISTILL.PROTOCOL", "transductive", "DATASET.NUM_SHOTS", "0",
                 "DISTILL.DKD_TARGET", "label", "DATALOADER.TRAIN_X.BATCH_SIZE", str(len(true)),
                 "OPTIM.MAX_EPOCH", "1")
    check_results(fit(cfg, tmp_path / "run"))
    labels = [v for k, v in seen if k == "labels"]
    targets = [v for k, v in seen if k == "target"]
    assert len(targets) == len(labels) == 1
    assert torch.equal(targets[0], labels[0])  # the batch's labels themselves, in order
    assert sorted(targets[0].tolist()) == true  # ... which are the true labels of all training images
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "target: the labels of all training images (ABKD's CLIP code)" in log
    assert "DKD_TARGET: label" in (tmp_path / "run" / "config.yaml").read_text()


def test_dkd_target_is_checked():
    assert get_cfg_defaults().DISTILL.DKD_TARGET == "teacher"  # clipkd's label-free default
    with pytest.raises(ConfigError, match="DISTILL.DKD_TARGET"):
        build_config([], ["DISTILL.LOSS", "dkd", "DISTILL.DKD_TARGET", "labels"])
    with pytest.raises(ConfigError, match=r"DISTILL.DKD_TARGET 'label' does not apply to DISTILL.LOSS lsd.*dkd"):
        build_kd_objective(build_config([], ["DISTILL.LOSS", "lsd", "DISTILL.DKD_TARGET", "label"]))
    trans = ["DISTILL.LOSS", "dkd", "DISTILL.PROTOCOL", "transductive"]
    assert build_kd_objective(build_config([], trans)).target_from_teacher
    labelled = build_kd_objective(build_config([], [*trans, "DISTILL.DKD_TARGET", "label"]))
    assert not labelled.target_from_teacher and labelled.needs_labels
    # the inductive protocol trains on labelled images and takes the labels whatever this key says
    assert not build_kd_objective(build_config([], ["DISTILL.LOSS", "dkd", "DISTILL.DKD_TARGET", "label"]))\
        .target_from_teacher


def test_dkd_warmup_resumes_exactly(synth_root, tmp_path, monkeypatch):
    """The warm-up epoch lives in the objective's checkpoint state: a resumed run ramps as the full one."""
    cfg = config(synth_root, "dkd_promptkd", "OPTIM.MAX_EPOCH", "3", "DISTILL.DKD_WARMUP", "3")
    full = fit(cfg, tmp_path / "full")
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "cut")
    undo()
    assert fit(cfg, tmp_path / "cut", resume=True) == full

    def losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "step"]

    assert losses("cut") == losses("full")


def recipe(name: str) -> str:
    return str(ROOT / "configs" / "methods" / f"{name}.yaml")


def test_sweep_sets_the_divergence_inside_a_method_and_varies_its_parameters(capsys):
    from clipkd.cli.main import main

    assert main(["sweep", "--config", recipe("abdkd_promptkd"), "--alpha", "0.5:0.6:0.1",
                 "--beta", "0.3:0.3:1", "--vary", "DISTILL.DKD_BETA", "0.5,1", "--dataset", "dtd",
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert all("DISTILL.DIVERGENCE ab" in x and "DISTILL.LOSS" not in x for x in lines)
    assert any("abdkd_promptkd+dkd_beta0.5/dtd/a0.6_b0.3/seed1" in x and x.endswith("DISTILL.DKD_BETA 0.5")
               for x in lines)
    assert main(["sweep", "--config", recipe("lsd_promptkd"), "--vary", "DISTILL.TEMPERATURE",
                 "1:4:1", "--dataset", "dtd", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split("--output-dir ")[1].split()[0] for x in lines] == [
        f"output/sweep/lsd_promptkd+temperature{k}/dtd/seed1" for k in range(1, 5)]
    # a swept key the loss does not take, or an AB sweep of a loss without a divergence: one line, no cells
    assert main(["sweep", "--config", recipe("ttm_promptkd"), "--vary", "DISTILL.TEMPERATURE", "1,2",
                 "--dataset", "dtd", "--dry-run"]) == 2
    assert "does not apply to DISTILL.LOSS ttm" in capsys.readouterr().err
    assert main(["sweep", "--config", recipe("dist_promptkd"), "--alpha", "1:1:1", "--beta", "0:0:1",
                 "--dataset", "dtd", "--dry-run"]) == 2
    assert "has none" in capsys.readouterr().err
    assert main(["sweep", "--config", recipe("dist_promptkd"), "--dataset", "dtd", "--dry-run"]) == 2
    assert "nothing to sweep" in capsys.readouterr().err
    assert main(["sweep", "--config", recipe("lsd_promptkd"), "--vary", "OPTIM.LR", "0.01,0.02", "--dataset", "dtd",
                 "--dry-run", "OPTIM.LR", "0.5"]) == 2
    assert "OPTIM.LR is swept and also set" in capsys.readouterr().err


def test_the_objective_calls_the_bound_loss_function_itself(epoch_probe):
    """A step goes objective -> loss function: no DistillLoss.__call__ or wrapper frame in between."""
    import sys

    callers = []
    real = LOSSES.get("epoch_probe")  # registered by the fixture

    def probe(student_logits, teacher_logits, epoch=None, *, temperature=1.0):
        callers.append(sys._getframe(1).f_code)
        return real(student_logits, teacher_logits, epoch, temperature=temperature)

    LOSSES._resolved["epoch_probe"] = probe
    obj = KDObjective(build_distill_loss("epoch_probe"), 1.0)
    s, t, y = pair(5, dtype=torch.float32)
    assert obj(s, t, y)[0].item() == 1.0 and epoch_probe == [1]
    assert [(c.co_name, c.co_filename.endswith("kd.py")) for c in callers] == [("__call__", True)]
