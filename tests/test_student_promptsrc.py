"""The promptsrc student (MODEL.STUDENT.TYPE promptsrc: IVLP trained with PromptSRC's self-regularisation) and
PromptSRC combined with distillation (DISTILL.OBJECTIVE promptsrc with DISTILL.WEIGHT > 0): the loss restated
here from its terms, WEIGHT 0 equal bit for bit to PromptSRC alone, the three recipes trained through
``clipkd train``, the refusals, and an exact resume (the Gaussian prompt aggregate and the KD epoch included)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import clipkd.methods.promptsrc as psrc
from clipkd.cli.main import main
from clipkd.config import build_config, check_config
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.errors import ConfigError
from clipkd.losses import build_distill_loss
from clipkd.methods.distiller import Distiller, StudentFeatures, build_objective
from clipkd.methods.kd import KDObjective
from clipkd.models.student import IVLPStudent, build_student
from clipkd.registry import STUDENTS
from clipkd.runs.checks import needs_teacher
from test_train import DATASET_CFG, ROOT, TINY, check_results, config, fit, interrupt_after_checkpoint

RECIPES = ("promptsrc", "kd_promptsrc", "abkd_promptsrc")
# PromptSRC's own checkpoint names, as its Dassl trainer saves them (depth 2 in the tiny runs)
PROMPTSRC_KEYS = {"prompt_learner.ctx", "image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow",
                  "text_encoder.transformer.resblocks.1.VPT_shallow"}
ONE_EPOCH = ["OPTIM.MAX_EPOCH", "1", "PROMPTSRC.GPA_MEAN", "1.0"]
CLASSES = ["cat", "dog", "annual crop land"]


def tiny(*extra):
    return build_config([], [*TINY, "DATASET.NAME", "oxford_pets", *extra])


# ------------------------------------------------------------------------------------------------ the student
def test_the_student_is_ivlp_declaring_promptsrcs_objective():
    cls = STUDENTS.get("promptsrc")
    assert issubclass(cls, IVLPStudent) and cls.own_text_tower and not cls.needs_teacher
    assert cls.objectives == ("promptsrc",)
    assert STUDENTS.attribute("ivlp", "objectives") == () and STUDENTS.attribute("promptkd", "objectives") == ()
    cfg = tiny("MODEL.STUDENT.TYPE", "promptsrc", "DISTILL.OBJECTIVE", "promptsrc", "DISTILL.WEIGHT", "0",
               "DISTILL.CE_WEIGHT", "1")
    student = build_student(cfg)
    assert type(student) is cls
    # the IVLP student's tensors under PromptSRC's own names, and they load back strictly
    sd = student.trainable_state_dict()
    assert set(sd) == PROMPTSRC_KEYS
    other = build_student(tiny("MODEL.STUDENT.TYPE", "ivlp"))
    other.load_trainable_state_dict(sd)
    assert all(torch.equal(v, other.trainable_state_dict()[k]) for k, v in sd.items())


@pytest.mark.parametrize("name", RECIPES)
def test_recipes(name):
    cfg = build_config([DATASET_CFG, ROOT / "configs" / "methods" / f"{name}.yaml"])
    check_config(cfg)
    assert (cfg.MODEL.STUDENT.TYPE, cfg.DISTILL.OBJECTIVE, cfg.MODEL.STUDENT.NAME) == ("promptsrc", "promptsrc",
                                                                                      "ViT-B-16")
    assert (cfg.MODEL.PROMPT.N_CTX_TEXT, cfg.MODEL.PROMPT.N_CTX_VISION, cfg.MODEL.PROMPT.DEPTH_TEXT,
            cfg.MODEL.PROMPT.DEPTH_VISION, cfg.MODEL.PROMPT.CTX_INIT) == (4, 4, 9, 9, "a photo of a")
    assert (cfg.PROMPTSRC.TEXT_LOSS_WEIGHT, cfg.PROMPTSRC.IMAGE_LOSS_WEIGHT, cfg.PROMPTSRC.GPA_MEAN,
            cfg.PROMPTSRC.GPA_STD, cfg.OPTIM.MAX_EPOCH) == (25.0, 10.0, 15.0, 1.0, 20)
    if name == "promptsrc":  # PromptSRC's vit_b16_c2_ep20_batch4_4+4ctx.yaml
        assert not needs_teacher(cfg) and cfg.DISTILL.CE_WEIGHT == 1.0
        assert (cfg.OPTIM.LR, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == (0.0025, 4)
    else:  # the KD term replaces the cross-entropy, as in KDPL's PromptSRC_KDPL
        assert needs_teacher(cfg) and cfg.DISTILL.CE_WEIGHT == 0.0 and cfg.MODEL.TEACHER.PROMPTED
        assert cfg.DISTILL.LOSS == {"kd_promptsrc": "promptkd_kl", "abkd_promptsrc": "ab"}[name]


# ------------------------------------------------------------------------------------------------ the loss
class _Reference:
    """A stand-in for the frozen CLIP with known outputs."""

    def __init__(self, zs_features, fixed, scale):
        self.zs_features, self.fixed_embeddings, self.logit_scale = zs_features, fixed, scale

    def image_features(self, images):
        return self.zs_features


def _inputs(seed=0, b=4, c=3, d=8):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    img, text = unit(b, d).requires_grad_(), unit(c, d).requires_grad_()
    return img, text, unit(b, d), unit(c, d), torch.randn(b, c, generator=g) * 5, torch.tensor([0, 1, 2, 0])


def test_kd_part_plus_the_self_regularising_terms():
    """KD into PromptSRC as KDPL trains it: 0.5 KL(t||s) + 0.5 KL(s||t) (skl x 0.5), no CE, plus L_SCL."""
    img, text, zs_img, fixed, t_logits, labels = _inputs()
    scale = 3.0
    logits = scale * img @ text.t()
    obj = psrc.PromptSRCObjective(_Reference(zs_img, fixed, scale), psrc.GaussianPromptAggregation(2, 1.0, 1.0),
                                  kd=KDObjective(build_distill_loss("skl"), 0.5), text_weight=25.0, image_weight=10.0)
    assert obj.needs_teacher and not obj.needs_labels and obj.ce_weight == 0.0
    loss, terms = obj(logits, t_logits, labels, features=StudentFeatures(torch.zeros(4, 3, 2, 2), img, text))

    p, q = t_logits.softmax(-1), logits.softmax(-1)  # the teacher's and the student's
    fwd = (p * (p.log() - q.log())).sum(-1).mean()
    rev = (q * (q.log() - p.log())).sum(-1).mean()
    zs = (scale * zs_img @ fixed.t()).softmax(-1)
    want = {"kd": fwd + rev, "scl_text": (text - fixed).abs().mean(), "scl_image": (img - zs_img).abs().mean(),
            "scl_logits": (zs * (zs.log() - q.log())).sum() / logits.numel()}
    assert set(terms) == set(want)  # no "ce": its weight is 0
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-5), k
    total = 0.5 * fwd + 0.5 * rev + 25 * want["scl_text"] + 10 * want["scl_image"] + want["scl_logits"]
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    g = torch.autograd.grad(loss, (img, text), retain_graph=True)
    g_want = torch.autograd.grad(total, (img, text))
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # its epoch travels with the GPA in the checkpoint
    obj.end_epoch(1, type("S", (), {"trainable_state_dict": lambda self: {"x": torch.ones(2)}})())
    assert obj.state_dict()["kd"] == {"epoch": 2} and obj.state_dict()["gpa"]["epochs"] == [1]
    again = psrc.PromptSRCObjective(_Reference(zs_img, fixed, scale), psrc.GaussianPromptAggregation(2, 1.0, 1.0),
                                    kd=KDObjective(build_distill_loss("skl"), 0.5))
    again.load_state_dict(obj.state_dict())
    assert again.kd.epoch == 2 and again.aggregation.epochs == [1]


def test_weight_zero_is_promptsrc_alone_bit_for_bit(synth_root):
    """DISTILL.WEIGHT 0: no teacher, and the loss and every prompt's gradient are exactly PromptSRC's formula as
    the objective computed it before it had a KD part (CE x w + 25 L1 text + 10 L1 image + KL, in that order)."""
    cfg = config(synth_root, "promptsrc")
    torch.manual_seed(0)
    student = build_student(cfg).train()
    obj = build_objective(cfg, student, CLASSES)
    assert not obj.needs_teacher and obj.kd.divergence is None
    distiller = Distiller(student, None, CLASSES, obj)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])
    params = dict(student.text_encoder.prompt_parameters(), **student.image_encoder.prompt_parameters())
    out = distiller(images, labels)
    got = torch.autograd.grad(out.loss, list(params.values()))

    img = student.image_features(images)
    text = student.text_features(CLASSES)
    logits = student.logit_scale * img @ text.t()
    ref = obj.reference
    zs = ref.image_features(images).float()
    zs_logits = ref.logit_scale * zs @ ref.fixed_embeddings.t()
    old = (1.0 * F.cross_entropy(logits.float(), labels)
           + 25.0 * F.l1_loss(text.float(), ref.fixed_embeddings.float())
           + 10.0 * F.l1_loss(img.float(), zs)
           + F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(zs_logits.float(), dim=1),
                      reduction="sum", log_target=True) / logits.numel())
    want = torch.autograd.grad(old, list(params.values()))
    assert torch.equal(out.loss, old)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert set(out.terms) == {"ce", "scl_text", "scl_image", "scl_logits"}


# ------------------------------------------------------------------------------------------------ refused
def _cli(root, out, method, *extra):
    return main(["train", "--root", str(root), "--method", method, "--dataset", "oxford_pets", "--output-dir",
                 str(out), *TINY, *extra])


@pytest.mark.parametrize("method, extra, pattern", [
    # the promptsrc student with another objective: both keys named, and what to use instead
    ("promptsrc", ["DISTILL.OBJECTIVE", "kd"],
     r"MODEL.STUDENT.TYPE promptsrc trains with DISTILL.OBJECTIVE promptsrc, not kd .*MODEL.STUDENT.TYPE ivlp"),
    ("kd_promptsrc", ["DISTILL.OBJECTIVE", "kd"], "MODEL.STUDENT.TYPE promptsrc trains with DISTILL.OBJECTIVE"),
    # PromptSRC's objective on a student without its own text tower
    ("kd_promptsrc", ["MODEL.STUDENT.TYPE", "promptkd"], "DISTILL.OBJECTIVE promptsrc: .*MODEL.STUDENT.TYPE ivlp or "
                                                         "promptsrc"),
    # the KD part's settings are checked as the kd objective's are
    ("kd_promptsrc", ["DISTILL.ALPHA", "0.5"], "DISTILL.ALPHA 0.5 does not apply to DISTILL.LOSS promptkd_kl"),
    ("abkd_promptsrc", ["DISTILL.PROTOCOL", "transductive"], "set DISTILL.PROTOCOL inductive"),
    ("abkd_promptsrc", ["TEST.FINAL_MODEL", "val"], "TEST.FINAL_MODEL last"),
])
def test_refused_in_one_line_before_anything_is_written(synth_root, tmp_path, capsys, method, extra, pattern):
    import re

    out = tmp_path / "run"
    assert _cli(synth_root, out, method, *extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clipkd: error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]) and "Traceback" not in err, err
    assert not out.exists()


def test_the_ivlp_teacher_recipes_still_train_without_a_teacher():
    for name in ("promptsrc_teacher", "ivlp_teacher"):
        cfg = build_config([DATASET_CFG, ROOT / "configs" / "methods" / f"{name}.yaml"])
        check_config(cfg)
        assert cfg.MODEL.STUDENT.TYPE == "ivlp" and not needs_teacher(cfg)
    # the ivlp student may take PromptSRC's objective with a KD part too (nothing in it is promptsrc-only)
    check_config(build_config([DATASET_CFG, ROOT / "configs" / "methods" / "kd_promptsrc.yaml"],
                              ["MODEL.STUDENT.TYPE", "ivlp"]))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", RECIPES)
def test_one_tiny_epoch_through_clipkd_train(synth_root, tmp_path, method):
    out = tmp_path / method
    assert _cli(synth_root, out, method, *ONE_EPOCH) == 0
    results = json.loads((out / "results.json").read_text())
    check_results(results)
    assert (results["teacher"] == "none") == (method == "promptsrc")
    saved = load_checkpoint(out / "model.pt")["state_dict"]
    assert set(saved) == PROMPTSRC_KEYS
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "step"]
    assert steps and all(math.isfinite(s["loss"]) for s in steps)
    log = (out / "log.txt").read_text()
    assert "PromptSRC: " in log and ("CE x 1" in log) == (method == "promptsrc")
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["objective"]["gpa"]["epochs"] == [1]
    # one epoch: the Gaussian aggregate is that epoch's prompts
    assert all(torch.equal(saved[k], last["state_dict"][k]) for k in saved)


def test_kd_into_promptsrc_resumes_bit_identically(synth_root, tmp_path, monkeypatch):
    cfg = config(synth_root, "kd_promptsrc", "OPTIM.MAX_EPOCH", "3", "PROMPTSRC.GPA_MEAN", "2.0",
                 "DISTILL.LOSS", "dkd", "DISTILL.DKD_WARMUP", "3")  # DKD's warm-up reads the KD part's epoch
    full = fit(cfg, tmp_path / "full")
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "cut")
    undo()
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["objective"]
    assert cut["gpa"]["epochs"] == [1] and cut["kd"] == {"epoch": 2}
    resumed = fit(cfg, tmp_path / "cut", resume=True)
    assert resumed == full
    a = load_checkpoint(tmp_path / "full" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "model.pt")["state_dict"]
    assert a.keys() == b.keys() == PROMPTSRC_KEYS and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "step"]

    assert losses("cut") == losses("full")


def test_a_fused_sweep_of_abkd_into_promptsrc_equals_each_cell_alone(synth_root, tmp_path):
    from clipkd.runs.sweep import build_grid, run_grid
    from test_fused import alone, assert_same_cell

    method = str(ROOT / "configs" / "methods" / "abkd_promptsrc.yaml")
    grid = build_grid(method, "dtd", "0.5:1:0.5", "0.3:0.3:0.3", [1], tmp_path / "sweep",
                      [*TINY, "OPTIM.MAX_EPOCH", "2", "PROMPTSRC.GPA_MEAN", "1.5"])
    assert len(grid.cells) == 2
    with pytest.raises(ConfigError, match="DISTILL.TTM_EXPONENT .* does not apply to DISTILL.LOSS promptkd_kl"):
        build_grid(str(ROOT / "configs" / "methods" / "kd_promptsrc.yaml"), "dtd", None, None, [1], tmp_path / "kd",
                   list(TINY), vary=[("DISTILL.TTM_EXPONENT", "0.5,1")])  # the KD part's loss, before any cell
    assert run_grid(grid, str(synth_root), fused=True).lines()[0].startswith("sweep: 2 done")
    for cell in grid.cells:
        single = tmp_path / "alone" / cell.out.relative_to(tmp_path / "sweep")
        alone(grid, cell, synth_root, single)
        assert_same_cell(cell.out, single)
        assert load_checkpoint(cell.out / "checkpoints" / "last.pt")["objective"]["gpa"]["epochs"] == [1, 2]


def test_the_refusal_is_read_from_the_student_without_torch():
    """``clipkd config show`` stays torch-free: what the promptsrc student trains with is read from its source."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from clipkd.config import build_config, check_config\n"
            "from clipkd.errors import ConfigError\n"
            "try:\n"
            "    check_config(build_config([], ['MODEL.STUDENT.TYPE', 'promptsrc']))\n"
            "    raise SystemExit('accepted')\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n"
            "check_config(build_config([], ['MODEL.STUDENT.TYPE', 'promptsrc', 'DISTILL.OBJECTIVE', 'promptsrc']))\n"
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.startswith("MODEL.STUDENT.TYPE promptsrc trains with DISTILL.OBJECTIVE promptsrc, not kd (it is IVLP")
