"""clipkd.registry: one list of names per config key, resolved lazily; CHOICES and the point of use read it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from clipkd.config import build_config, get_cfg_defaults
from clipkd.config.defaults import CHOICES
from clipkd.errors import ConfigError
from clipkd.registry import DIVERGENCES, LOSSES, OPTIMIZERS, REGISTRIES, STUDENTS, TEMPLATES, Registry


# ------------------------------------------------------------------------------------------------ the class
def test_names_order_membership():
    reg = Registry("X.KIND", {"b": "json:dumps", "a": None})
    assert reg.names() == ("b", "a") and list(reg) == ["b", "a"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and ["a"] not in reg  # unhashable: simply not a name
    assert reg.check("b") == "b"
    assert "X.KIND" in repr(reg)


def test_get_resolves_import_paths_once_and_returns_objects_as_is():
    sentinel = object()
    reg = Registry("X.KIND", {"dumps": "json:dumps", "nested": "json:JSONDecoder.decode", "obj": sentinel,
                              "none": None})
    assert reg.get("dumps") is json.dumps and reg.get("dumps") is reg.get("dumps")
    assert reg.get("nested") is json.JSONDecoder.decode
    assert reg.get("obj") is sentinel and reg.get("none") is None


@pytest.mark.parametrize("name", ["nope", "", None, 3, ["kl"]])
def test_unknown_name_is_a_config_error_naming_key_and_choices(name):
    reg = Registry("X.KIND", {"one": None, "two": None})
    for call in (reg.check, reg.get):
        with pytest.raises(ConfigError) as err:
            call(name)
        assert str(err.value) == f"X.KIND must be one of one, two; got {name!r}"


def test_register_directly_and_as_decorator():
    reg = Registry("X.KIND")
    reg.register("a", "json:loads")

    @reg.register("b")
    def builder():
        return 42

    assert reg.names() == ("a", "b") and reg.get("b") is builder and builder() == 42
    assert reg.get("a") is json.loads
    with pytest.raises(ValueError, match="registered already"):
        reg.register("a", None)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", None)


@pytest.mark.parametrize("path", ["json.dumps", ":dumps", "json:"])
def test_malformed_import_path(path):
    reg = Registry("X.KIND", {"x": path})
    with pytest.raises(ValueError, match="package.module:attribute"):
        reg.get("x")


def test_resolution_is_lazy():
    """Listing and checking names imports nothing; get() imports the target's module."""
    code = (
        "import sys; from clipkd.registry import LOSSES, STUDENTS, OPTIMIZERS; "
        "LOSSES.names(); LOSSES.check('kl'); STUDENTS.check('ivlp'); OPTIMIZERS.check('sgd'); "
        "assert not {'torch', 'clipkd.losses.divergences', 'clipkd.models.student'} & set(sys.modules); "
        "f = LOSSES.get('kl'); "
        "assert f.__name__ == 'kl_divergence' and 'clipkd.losses.divergences' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ the registries
def test_registry_targets():
    from clipkd.losses import build as b
    from clipkd.losses import divergences as d
    from clipkd.losses import methods as m
    from clipkd.models.cocoop import CoCoOpStudent
    from clipkd.models.coop import CoOpStudent, KgCoOpStudent
    from clipkd.models.maple import MaPLeStudent
    from clipkd.models.promptsrc import PromptSRCStudent
    from clipkd.models.student import IVLPStudent, PromptKDStudent
    from clipkd.models.teacher import ensemble_templates, photo_template
    from clipkd.models.vpt import VPTStudent

    assert {n: STUDENTS.get(n) for n in STUDENTS} == {
        "promptkd": PromptKDStudent, "ivlp": IVLPStudent, "promptsrc": PromptSRCStudent, "coop": CoOpStudent,
        "kgcoop": KgCoOpStudent, "vpt": VPTStudent, "cocoop": CoCoOpStudent, "maple": MaPLeStudent}
    assert STUDENTS.names()[:2] == ("promptkd", "ivlp")  # the students of issue #18 follow
    assert {n: LOSSES.get(n) for n in LOSSES} == {
        "ab": d.alpha_beta_divergence, "kl": d.kl_divergence, "rkl": d.reverse_kl, "js": d.js_divergence,
        "skl": d.symmetric_kl, "promptkd_kl": d.promptkd_kl,
        "dkd": m.dkd_loss, "lsd": m.lsd_loss, "ttm": m.ttm_loss, "dist": m.dist_loss,
    }
    assert {n: DIVERGENCES.get(n) for n in DIVERGENCES} == {n: LOSSES.get(n) for n in ("kl", "ab", "rkl", "js", "skl")}
    assert OPTIMIZERS.get("sgd") is torch.optim.SGD and OPTIMIZERS.get("adamw") is torch.optim.AdamW
    assert TEMPLATES.names() == ("dataset", "ensemble", "photo") and TEMPLATES.get("ensemble") is ensemble_templates
    assert TEMPLATES.get("photo") is photo_template
    assert b.LOSS_NAMES == LOSSES.names() and m.DIVERGENCE_NAMES == DIVERGENCES.names()


def test_choices_are_derived_from_the_registries():
    assert set(REGISTRIES) == {"MODEL.STUDENT.TYPE", "DISTILL.LOSS", "OPTIM.NAME", "MODEL.TEACHER.TEMPLATES",
                               "DISTILL.OBJECTIVE", "DISTILL.DIVERGENCE"}
    for key, reg in REGISTRIES.items():
        assert reg.key == key and CHOICES[key] == reg.names()
    assert set(CHOICES) == set(REGISTRIES) | {
        "INPUT.INTERPOLATION", "DISTILL.PROTOCOL", "OPTIM.LR_SCHEDULER", "OPTIM.PRECISION", "TEST.FINAL_MODEL",
        "DATASET.SUBSAMPLE_CLASSES", "DISTILL.DKD_TARGET", "DISTILL.TEACHER_LOGIT_SCALE",
    }
    assert len(CHOICES) == len(list(CHOICES))
    assert CHOICES["DATASET.SUBSAMPLE_CLASSES"] == ("all", "base")


def test_a_registered_name_is_accepted_by_the_config(monkeypatch):
    with pytest.raises(ConfigError, match="DISTILL.LOSS must be one of"):
        build_config([], ["DISTILL.LOSS", "my_loss"])
    monkeypatch.setitem(LOSSES._targets, "my_loss", None)
    assert "my_loss" in CHOICES["DISTILL.LOSS"]
    assert build_config([], ["DISTILL.LOSS", "my_loss"]).DISTILL.LOSS == "my_loss"


# ------------------------------------------------------------------------------------------------ point of use
def test_build_optimizer_takes_the_class_from_the_registry():
    from clipkd.engine.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    cfg = build_config([], ["OPTIM.NAME", "adamw", "OPTIM.LR", "0.01"])
    opt = build_optimizer(params, cfg)
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 0.01
    opt = build_optimizer(params, build_config([], ["OPTIM.MOMENTUM", "0.5"]))
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    cfg = get_cfg_defaults()
    cfg.OPTIM.NAME = "adam"  # set by hand, past the config's own check
    with pytest.raises(ConfigError, match=re.escape("OPTIM.NAME must be one of sgd, adamw; got 'adam'")):
        build_optimizer(params, cfg)


def test_build_distill_loss_checks_names_with_the_registry():
    from clipkd.losses import build_distill_loss

    with pytest.raises(ConfigError, match=re.escape("DISTILL.LOSS must be one of " + ", ".join(LOSSES.names()))):
        build_distill_loss("kld")
    assert build_distill_loss(" KL ").name == "kl"


def test_build_student_checks_the_type_with_the_registry():
    from clipkd.models.student import build_student

    cfg = get_cfg_defaults()
    cfg.MODEL.STUDENT.TYPE = "no_such_student"
    choices = ", ".join(STUDENTS.names())  # promptkd, ivlp, then the students added since
    assert choices.startswith("promptkd, ivlp, ")
    message = f"MODEL.STUDENT.TYPE must be one of {choices}; got 'no_such_student'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_student(cfg)  # refused before any model is built


def test_build_teacher_checks_templates_with_the_registry():
    from clipkd.models.teacher import build_teacher

    cfg = get_cfg_defaults()
    cfg.MODEL.TEACHER.NAME, cfg.MODEL.TEACHER.PRETRAINED = "clipkd-tiny-teacher", ""
    cfg.MODEL.TEACHER.TEMPLATES = "imagenet"
    with pytest.raises(ConfigError, match=re.escape("MODEL.TEACHER.TEMPLATES must be one of dataset, ensemble")):
        build_teacher(cfg, "a photo of a {}.")


def test_declarations_inherited_from_a_base_in_another_module_are_read_from_source(tmp_path, monkeypatch):
    from clipkd.registry import _MISSING, _source_class_attribute

    pkg = tmp_path / "clipkd_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("class Base:\n    needs_teacher = True\n    depth = 3\n")
    (pkg / "child.py").write_text("from clipkd_probe_pkg.base import Base\n\nclass Child(Base):\n    depth = 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # only clipkd's own modules are followed: a third-party base may set anything
    assert _source_class_attribute("clipkd_probe_pkg.child:Child", "depth") == 5
    assert _source_class_attribute("clipkd_probe_pkg.child:Child", "needs_teacher") is _MISSING
    assert _source_class_attribute("clipkd.models.vpt:VPTStudent", "own_text_tower") is False  # from Student
    assert _source_class_attribute("clipkd.models.student:PromptKDStudent", "min_images_per_process") == 2


def test_objectives_declare_their_config_check_torch_free():
    """check_config asks the objective's registration for its check (no branch on the name), without torch."""
    code = ("import sys; from clipkd.registry import OBJECTIVES; "
            "checks = {n: OBJECTIVES.declared(n, 'check_config') for n in OBJECTIVES}; "
            "assert all(callable(c) for c in checks.values()), checks; "
            "assert 'torch' not in sys.modules and 'clipkd.methods' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    from clipkd.config import check_config
    from clipkd.registry import OBJECTIVES

    seen = []

    def probe_check(cfg):
        seen.append(cfg.DISTILL.OBJECTIVE)
        raise ConfigError("DISTILL.OBJECTIVE probe_objective: refused")

    OBJECTIVES.register("probe_objective", None, check_config=probe_check)
    try:
        cfg = build_config([], ["DISTILL.OBJECTIVE", "probe_objective"])
        with pytest.raises(ConfigError, match="probe_objective: refused"):
            check_config(cfg)
        assert seen == ["probe_objective"] and OBJECTIVES.declared("probe_objective", "other") is None
    finally:
        OBJECTIVES._targets.pop("probe_objective", None)
        OBJECTIVES._declared.pop("probe_objective", None)
