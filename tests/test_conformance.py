"""Every registered name works, as timm's tests run every model of ``list_models()``: each student type, loss,
divergence, objective and template name goes through a tiny build and a step. A name added to a registry is
tested here without a line of test code; a name registered without what builds it fails loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip")

from clipkd.config import build_config, check_config, get_cfg_defaults  # noqa: E402
from clipkd.methods.distiller import Distiller, build_objective  # noqa: E402
from clipkd.errors import ConfigError  # noqa: E402
from clipkd.losses import build_distill_loss  # noqa: E402
from clipkd.models import build_student, build_teacher, templates_for  # noqa: E402
from clipkd.registry import DIVERGENCES, LOSSES, OBJECTIVES, STUDENTS, TEMPLATES, Registry  # noqa: E402

CLASSES = ["cat", "dog", "annual crop land"]
TINY = ["MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
        "MODEL.STUDENT.NAME", "clipkd-tiny-student", "MODEL.STUDENT.PRETRAINED", "",
        "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2", "MODEL.PROMPT.N_CTX_VISION", "2",
        "INPUT.SIZE", "(32, 32)", "DATASET.NAME", "oxford_pets"]
# The settings an objective cannot train without (the defaults are the KD family's); a new objective that
# needs some is listed here, else it runs on the defaults.
OBJECTIVE_SETTINGS = {
    "promptsrc": ["DISTILL.WEIGHT", "0", "DISTILL.CE_WEIGHT", "1", "MODEL.TEACHER.PROMPTED", "False"],
}


def tiny_cfg(*extra: str):
    return build_config([], [*TINY, *extra])


def one_step(cfg, seed: int = 0) -> tuple[torch.Tensor, dict[str, bool]]:
    """Build the teacher (when needed), the student and the objective of ``cfg``, take one SGD step on a batch of
    four random images; the loss and, per trainable tensor, whether the step changed it."""
    torch.manual_seed(seed)
    teacher = build_teacher(cfg, "a photo of a {}.")
    student = build_student(cfg, teacher)
    objective = build_objective(cfg, student, CLASSES)
    distiller = Distiller(student, teacher if objective.needs_teacher else None, CLASSES, objective).train()
    before = {k: v.clone() for k, v in student.trainable_state_dict().items()}
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([0, 1, 2, 0])
    loss = distiller(images, labels).loss
    loss.backward()
    opt.step()
    after = student.trainable_state_dict()
    return loss.detach(), {k: not torch.equal(before[k], after[k]) for k in before}


# ------------------------------------------------------------------------------------------------ students
@pytest.mark.parametrize("kind", STUDENTS.names())
def test_every_student_builds_and_takes_a_kd_step(kind):
    cfg = tiny_cfg("MODEL.STUDENT.TYPE", kind)
    student = build_student(cfg, build_teacher(cfg, "a photo of a {}."))
    assert isinstance(student, STUDENTS.get(kind))
    student.eval()
    with torch.no_grad():
        feats = student.image_features(torch.randn(2, 3, 32, 32))
        text = student.text_features(CLASSES)
    assert feats.shape == (2, student.embed_dim) and text.shape == (len(CLASSES), student.embed_dim)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    loss, changed = one_step(cfg)
    assert torch.isfinite(loss) and loss >= 0
    assert changed and all(changed.values()), changed  # every trainable tensor takes the step
    assert sorted(changed) == sorted(student.trainable_state_dict())  # and is saved


@pytest.mark.parametrize("kind", STUDENTS.names())
def test_every_student_declares_what_it_needs(kind):
    cls = STUDENTS.get(kind)
    assert isinstance(cls.needs_teacher, bool) and isinstance(cls.own_text_tower, bool)
    assert isinstance(cls.min_images_per_process, int) and cls.min_images_per_process >= 0
    assert bool(cls.min_images_reason) == (cls.min_images_per_process > 1)  # a minimum says why
    assert bool(cls.needs_teacher_reason) == cls.needs_teacher
    for attr in ("needs_teacher", "own_text_tower", "min_images_per_process"):
        assert STUDENTS.attribute(kind, attr) == getattr(cls, attr)
    if cls.needs_teacher:
        with pytest.raises(ConfigError, match=f"MODEL.STUDENT.TYPE {kind} needs the teacher"):
            build_student(tiny_cfg("MODEL.STUDENT.TYPE", kind), None)


def test_student_declarations_are_read_without_torch():
    """The config's checks ask a student class what it has (PromptSRC needs its own text tower) from the
    source, so ``clipkd config show`` stays torch-free; the answer is the class's own."""
    code = ("import sys\n"
            "from clipkd.registry import STUDENTS\n"
            "from clipkd.config import build_config, check_config\n"
            "from clipkd.errors import ConfigError\n"
            "print({n: STUDENTS.attribute(n, 'own_text_tower') for n in STUDENTS})\n"
            "cfg = build_config([], ['DISTILL.OBJECTIVE', 'promptsrc', 'DISTILL.WEIGHT', '0', 'DISTILL.CE_WEIGHT', "
            "'1', 'MODEL.STUDENT.TYPE', 'promptkd'])\n"
            "try:\n"
            "    check_config(cfg)\n"
            "    raise SystemExit('accepted')\n"
            "except ConfigError as exc:\n"
            "    assert 'set MODEL.STUDENT.TYPE ivlp' in str(exc), exc\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == str({n: STUDENTS.get(n).own_text_tower for n in STUDENTS})


# ------------------------------------------------------------------------------------------------ losses
def _logits(seed: int) -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_gives_a_finite_gradient(name):
    loss_fn = build_distill_loss(name)
    student = _logits(0).requires_grad_()
    teacher, target = _logits(1), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = loss_fn(student, teacher, target=target, epoch=1.0)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss >= 0
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def _divergence_args(name: str) -> dict[str, float]:
    return {"alpha": 0.8, "beta": 0.3} if "alpha" in DIVERGENCES.arguments(name) else {}


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_every_divergence_is_a_divergence(name):
    fn = DIVERGENCES.get(name)
    s, t = _logits(0), _logits(1)
    d = fn(s, t, **_divergence_args(name))
    assert torch.isfinite(d) and d > 0
    assert fn(t, t, **_divergence_args(name)).abs() < 1e-5  # zero at equality
    per_sample = fn(s, t, reduction="none", **_divergence_args(name))
    assert per_sample.shape[0] == s.shape[0] and (per_sample >= -1e-6).all()


# ------------------------------------------------------------------------------------------------ objectives
@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_takes_a_training_step(name):
    assert set(OBJECTIVE_SETTINGS) <= set(OBJECTIVES.names())
    extra = ["DISTILL.OBJECTIVE", name, *OBJECTIVE_SETTINGS.get(name, [])]
    accepted = []
    for kind in STUDENTS.names():  # the students this objective trains
        cfg = tiny_cfg(*extra, "MODEL.STUDENT.TYPE", kind)
        try:
            check_config(cfg)
        except ConfigError:
            continue
        accepted.append(kind)
        loss, changed = one_step(cfg)
        assert torch.isfinite(loss), (name, kind)
        assert any(changed.values()), (name, kind)
    assert accepted, f"DISTILL.OBJECTIVE {name} trains no registered student"


# ------------------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("name", TEMPLATES.names())
def test_every_template_name_gives_templates_with_one_slot(name):
    cfg = get_cfg_defaults()
    cfg.DATASET.NAME = "oxford_pets"
    cfg.MODEL.TEACHER.TEMPLATES = name
    for given in (None, "a photo of a {}, a type of pet."):
        templates = templates_for(cfg, given)
        assert isinstance(templates, tuple) and templates
        for t in templates:
            text = t if isinstance(t, str) else t("{}")
            assert isinstance(text, str) and text.count("{}") == 1, (name, t)


# ------------------------------------------------------------------------------------------------ no fall-through
class _NoBuilder:
    """A class registered as a student but with no ``from_cfg``."""


@pytest.mark.parametrize("target", [None, _NoBuilder])
def test_a_registered_student_without_a_builder_fails_loudly(monkeypatch, target):
    monkeypatch.setitem(STUDENTS._targets, "dummy", target)
    STUDENTS._resolved.pop("dummy", None)
    cfg = get_cfg_defaults()
    cfg.MODEL.STUDENT.TYPE = "dummy"
    with pytest.raises(ConfigError, match="MODEL.STUDENT.TYPE 'dummy' is registered but nothing builds it"):
        build_student(cfg, None)  # never an IVLP (or any other) student in its place


def test_a_registered_template_without_a_function_fails_loudly(monkeypatch):
    monkeypatch.setitem(TEMPLATES._targets, "dummy", None)
    cfg = get_cfg_defaults()
    cfg.DATASET.NAME = "oxford_pets"
    cfg.MODEL.TEACHER.TEMPLATES = "dummy"
    with pytest.raises(ConfigError, match="MODEL.TEACHER.TEMPLATES 'dummy' is registered but nothing builds it"):
        templates_for(cfg)  # never the dataset's template in its place


def test_entrypoint_of_a_test_local_registry():
    reg = Registry("X.KIND", {"len": len, "str": str, "none": None, "int": 3})
    assert reg.entrypoint("len") is len and reg.entrypoint("str", "upper") is str.upper
    for name, method in (("none", None), ("int", None), ("str", "no_such_method")):
        with pytest.raises(ConfigError, match=f"X.KIND '{name}' is registered but nothing builds it"):
            reg.entrypoint(name, method)
