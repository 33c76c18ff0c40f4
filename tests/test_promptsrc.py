"""PromptSRC teacher training (DISTILL.OBJECTIVE promptsrc): each loss term and the Gaussian prompt aggregation
against values worked out here by hand, the frozen reference against a separately built zero-shot CLIP, and a
tiny run end to end (final prompts = Gaussian-weighted sum of the per-epoch prompts, exact resume, the result
loading as a prompted teacher)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipkd.methods.promptsrc as psrc
from clipkd.config import build_config
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.methods.distiller import StudentFeatures, build_objective
from clipkd.runs.checks import needs_teacher
from clipkd.runs.run import Run
from clipkd.engine.runtime import seed_everything
from clipkd.errors import ConfigError, TrainingError
from test_train import DATASET_CFG, ROOT, check_results, config, fit, interrupt_after_checkpoint

# A tiny PromptSRC teacher: the ivlp student on the tiny teacher architecture, 3 epochs, GPA centred on epoch 2.
TEACHER = ["MODEL.STUDENT.NAME", "clipkd-tiny-teacher", "OPTIM.MAX_EPOCH", "3", "PROMPTSRC.GPA_MEAN", "2.0",
           "PROMPTSRC.GPA_STD", "1.0"]


def teacher_config(root, *extra):
    return config(root, "promptsrc_teacher", *TEACHER, *extra)


# ------------------------------------------------------------------------------------------------ templates
def test_templates_are_promptsrcs_sixty():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    texts = [t("{}") for t in psrc.promptsrc_templates()]
    assert len(texts) == len(set(texts)) == 60
    assert texts[0] == "a photo of a {}." and texts[-1] == "itap of the {}."
    assert set(texts) == {t("{}") for t in OPENAI_IMAGENET_TEMPLATES[:60]}  # CLIP's 80 without the last 20
    assert "a good photo of a {}." not in texts and "a tattoo of a {}." in texts


# ------------------------------------------------------------------------------------------------ the terms
def test_text_and_image_terms_are_mean_absolute_differences():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    # |1-.6| + |0-.8| + |0-.8| + |1-.6| = 2.4 over 4 elements
    assert psrc.scl_text_loss(a, b).item() == pytest.approx(0.6)
    c = torch.tensor([[0.0, 1.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    assert psrc.scl_image_loss(c, d).item() == pytest.approx(2 / 3)


def test_logits_term_is_kl_from_zero_shot_summed_over_numel():
    logits = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]])
    zs = torch.tensor([[math.log(3.0), 0.0], [math.log(2.0), 0.0]])
    # row 1: p = (3/4, 1/4) zero-shot, q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2); row 2: equal, 0.
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 4
    assert psrc.scl_logits_loss(logits, zs).item() == pytest.approx(expected, rel=1e-6)
    assert psrc.scl_logits_loss(zs, zs).item() == pytest.approx(0.0, abs=1e-7)


class _Reference:
    """A stand-in for the frozen CLIP with known outputs."""

    def __init__(self, zs_features, fixed, scale):
        self.zs_features, self.fixed_embeddings, self.logit_scale = zs_features, fixed, scale

    def image_features(self, images):
        return self.zs_features


def test_objective_adds_ce_and_weighted_terms():
    s2 = math.sqrt(0.5)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the prompted class embeddings
    fixed = torch.tensor([[s2, s2], [0.0, 1.0]])  # the frozen ones
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zs_img = torch.tensor([[1.0, 0.0], [s2, s2]])
    scale = 2.0
    logits = scale * img @ text.t()  # [[2, 0], [0, 2]]
    labels = torch.tensor([0, 1])
    obj = psrc.PromptSRCObjective(_Reference(zs_img, fixed, scale), psrc.GaussianPromptAggregation(1, 1.0, 1.0),
                                  ce_weight=1.0, text_weight=25.0, image_weight=10.0)
    loss, terms = obj(logits, None, labels, features=StudentFeatures(torch.zeros(2, 3, 4, 4), img, text))

    ce = math.log(1 + math.exp(-2.0))  # both rows: the right class leads by 2
    l1_text = ((1 - s2) + s2 + 0 + 0) / 4  # |1-s2| + |0-s2| in row 1; row 2 equal
    l1_image = (0 + 0 + s2 + (1 - s2)) / 4  # row 1 equal; |0-s2| + |1-s2| in row 2
    # zero-shot logits = 2 * zs_img @ fixed^T: row 1 (2 s2, 0), row 2 (2, 2 s2)
    def kl(p_logits, q_logits):
        p = [math.exp(x) / sum(math.exp(y) for y in p_logits) for x in p_logits]
        q = [math.exp(x) / sum(math.exp(y) for y in q_logits) for x in q_logits]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl_term = (kl([2 * s2, 0.0], [2.0, 0.0]) + kl([2.0, 2 * s2], [0.0, 2.0])) / 4
    want = {"ce": ce, "scl_text": l1_text, "scl_image": l1_image, "scl_logits": kl_term}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(want, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 25 * l1_text + 10 * l1_image + kl_term, rel=1e-5)
    assert not any(t.requires_grad for t in terms.values())
    with pytest.raises(TrainingError, match="needs the student's features"):
        obj(logits, None, labels)


# ------------------------------------------------------------------------------------------------ GPA
def test_gpa_weights():
    e = math.exp(-0.5)
    assert psrc.gpa_weights(3, 2.0, 1.0) == pytest.approx((e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)))
    w = psrc.gpa_weights(20, 15.0, 1.0)  # PromptKD's teacher setting
    assert sum(w) == pytest.approx(1.0) and max(range(20), key=w.__getitem__) == 14  # epoch 15
    assert w[13] == pytest.approx(w[15]) and w[13] / w[14] == pytest.approx(e)
    assert sum(w[12:17]) > 0.99  # epochs 13..17
    # epochs 1..4 are -3, -1, 1, 3 stds away: densities e^9 : e : e : e^9 (e = exp(-1/2))
    far, near = e**9 / (2 * e**9 + 2 * e), e / (2 * e**9 + 2 * e)
    assert psrc.gpa_weights(4, 2.5, 0.5) == pytest.approx((far, near, near, far))
    for bad in ((3, 2.0, 0.0), (3, 2.0, -1.0), (3, 1e6, 1.0)):
        with pytest.raises(ConfigError):
            psrc.gpa_weights(*bad)


def test_gpa_sums_the_weighted_states_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(2, 3, generator=gen), "b": torch.randn(4, generator=gen)} for _ in range(3)]
    gpa = psrc.GaussianPromptAggregation(3, 2.0, 1.0)
    w = psrc.gpa_weights(3, 2.0, 1.0)
    gpa.add(1, states[0])
    saved = gpa.state_dict()
    again = psrc.GaussianPromptAggregation(3, 2.0, 1.0)
    again.load_state_dict(saved)
    for g in (gpa, again):
        with pytest.raises(TrainingError, match=r"saw epochs \[1\], not 1..3"):
            g.result()
        g.add(2, states[1])
        g.add(3, states[2])
    for key in ("a", "b"):
        want = sum(w[k] * states[k][key] for k in range(3))
        torch.testing.assert_close(gpa.result()[key], want)
        assert torch.equal(gpa.result()[key], again.result()[key])
    with pytest.raises(TrainingError, match="outside 1..3 or added twice"):
        gpa.add(3, states[2])
    with pytest.raises(TrainingError, match="outside"):
        psrc.GaussianPromptAggregation(3, 2.0, 1.0).add(4, states[0])


# ------------------------------------------------------------------------------------------------ the frozen CLIP
def test_reference_is_the_students_clip_without_prompts(synth_root):
    """Same outputs as a separately built zero-shot CLIP with the same weights, whatever the student's prompts."""
    from clipkd.models.student import build_student
    from clipkd.models.teacher import zero_shot_clip

    cfg = teacher_config(synth_root)
    seed_everything(cfg.SEED)
    student = build_student(cfg)
    seed_everything(cfg.SEED)
    templates = psrc.promptsrc_templates()[:5]
    plain = zero_shot_clip(cfg.MODEL.STUDENT.NAME, "", templates)  # the same random init, a second copy
    names = ["cat", "dog", "ship"]
    ref = psrc.ZeroShotReference(student, names, templates)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ref.image_features(images), plain.image_features(images))
    per_template = torch.stack([plain.text_encoder.encode([t(n) for n in names]) for t in templates])
    torch.testing.assert_close(ref.fixed_embeddings, torch.nn.functional.normalize(per_template.mean(0), dim=-1))
    # mean of raw features, then normalised (PromptSRC), which is not the zero-shot ensemble (mean of unit vectors)
    assert not torch.allclose(ref.fixed_embeddings, plain.text_features(names), atol=1e-7)
    with torch.no_grad():
        assert not torch.allclose(student.image_features(images), ref.image_features(images))
    assert not any(p.requires_grad for p in ref.image_encoder.parameters())
    assert ref.logit_scale == student.logit_scale


def test_config_and_what_is_refused(synth_root):
    cfg = build_config([DATASET_CFG, ROOT / "configs" / "methods" / "promptsrc_teacher.yaml"])
    assert (cfg.DISTILL.OBJECTIVE, cfg.MODEL.STUDENT.NAME, cfg.MODEL.STUDENT.TYPE) == ("promptsrc", "ViT-L-14", "ivlp")
    assert (cfg.PROMPTSRC.TEXT_LOSS_WEIGHT, cfg.PROMPTSRC.IMAGE_LOSS_WEIGHT) == (25.0, 10.0)
    assert (cfg.PROMPTSRC.GPA_MEAN, cfg.PROMPTSRC.GPA_STD, cfg.OPTIM.MAX_EPOCH) == (15.0, 1.0, 20)
    assert not needs_teacher(cfg)
    psrc.check_promptsrc_config(cfg)
    assert build_config([], []).DISTILL.OBJECTIVE == "kd"
    with pytest.raises(ConfigError, match="DISTILL.OBJECTIVE must be one of kd, promptsrc"):
        build_config([], ["DISTILL.OBJECTIVE", "coop"])
    for extra, pattern in [(["MODEL.STUDENT.TYPE", "promptkd"], "MODEL.STUDENT.TYPE ivlp"),
                           (["TEST.FINAL_MODEL", "val"], "TEST.FINAL_MODEL last"),
                           (["PROMPTSRC.IMAGE_LOSS_WEIGHT", "-1"], "IMAGE_LOSS_WEIGHT must be >= 0"),
                           (["PROMPTSRC.GPA_STD", "0"], "GPA_STD > 0")]:
        with pytest.raises(ConfigError, match=pattern):
            psrc.check_promptsrc_config(teacher_config(synth_root, *extra))
    # issue 18 opened a teacher to PromptSRC (its KD part: tests/test_student_promptsrc.py); it was refused before
    with_kd = teacher_config(synth_root, "DISTILL.WEIGHT", "1.0")
    psrc.check_promptsrc_config(with_kd)
    assert needs_teacher(with_kd)
    with pytest.raises(ConfigError, match="needs the ivlp student"):
        build_objective(teacher_config(synth_root))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def teacher_run(synth_root, tmp_path_factory):
    """A tiny PromptSRC run, with the prompts the student had at the end of each epoch."""
    out = tmp_path_factory.mktemp("promptsrc") / "teacher"
    per_epoch = []
    real = psrc.PromptSRCObjective.end_epoch

    def spy(self, epoch, student):
        per_epoch.append({k: v.clone() for k, v in student.trainable_state_dict().items()})
        real(self, epoch, student)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPKD_CACHE_DIR", str(out.parent / "cache"))
        mp.setattr(psrc.PromptSRCObjective, "end_epoch", spy)
        run = Run(teacher_config(synth_root), out, echo=False)
        results = run.fit()
    return {"out": out, "results": results, "per_epoch": per_epoch, "teacher": run.teacher}


def test_final_prompts_are_the_gaussian_weighted_sum_of_the_epochs(teacher_run):
    check_results(teacher_run["results"])
    assert teacher_run["teacher"] is None and teacher_run["results"]["teacher"] == "none"  # no teacher built
    per_epoch = teacher_run["per_epoch"]
    assert len(per_epoch) == 3
    w = psrc.gpa_weights(3, 2.0, 1.0)
    final = load_checkpoint(teacher_run["out"] / "model.pt")["state_dict"]
    assert set(final) == set(per_epoch[0]) and any(k.startswith("text_encoder") for k in final)
    for key in final:
        torch.testing.assert_close(final[key], sum(w[k] * per_epoch[k][key] for k in range(3)), rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(final[k], per_epoch[-1][k]) for k in final)  # not simply the last epoch
    last = load_checkpoint(teacher_run["out"] / "checkpoints" / "last.pt")
    assert last["objective"]["gpa"]["epochs"] == [1, 2, 3]
    steps = [json.loads(x) for x in (teacher_run["out"] / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "step"]
    assert steps and all(math.isfinite(s["loss"]) for s in steps)


def test_resume_keeps_the_aggregate_and_is_bit_identical(synth_root, tmp_path, monkeypatch, teacher_run):
    cfg = teacher_config(synth_root)
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "cut")
    undo()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["objective"]["gpa"]["epochs"] == [1]
    resumed = fit(cfg, tmp_path / "cut", resume=True)
    assert resumed == teacher_run["results"]
    a = load_checkpoint(teacher_run["out"] / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:MODEL.TEACHER.CHECKPOINT is set but MODEL.TEACHER.PRETRAINED is empty")
def test_the_result_loads_as_a_prompted_teacher(synth_root, tmp_path, teacher_run):
    ckpt = str(teacher_run["out"] / "model.pt")
    run = Run(config(synth_root, "abkd_promptkd", "MODEL.TEACHER.CHECKPOINT", ckpt))
    scored = run.evaluate(which="teacher")
    for half in ("base", "new"):
        assert scored[half]["accuracy"] == pytest.approx(teacher_run["results"][half]["accuracy"])
    cfg = config(synth_root, "abkd_promptkd", "MODEL.TEACHER.CHECKPOINT", ckpt, "OPTIM.MAX_EPOCH", "1")
    check_results(fit(cfg, tmp_path / "student"))


def test_teacher_script_writes_teachers_dataset_seed(synth_root, tmp_path):
    tiny = ["MODEL.STUDENT.NAME", "clipkd-tiny-teacher", "MODEL.STUDENT.PRETRAINED", "",
            "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2", "INPUT.SIZE", "(32, 32)",
            "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATASET.NUM_SHOTS", "2",
            "OPTIM.MAX_EPOCH", "2", "PROMPTSRC.GPA_MEAN", "1.5"]
    env = {**os.environ, "DATA": str(synth_root), "OUTPUT": str(tmp_path / "output"),
           "CLIPKD": str(Path(sys.executable).parent / "clipkd")}

    def teacher_sh(*args):
        return subprocess.run(["bash", str(ROOT / "scripts" / "teacher.sh"), *args], env=env, capture_output=True,
                              text=True)

    proc = teacher_sh("dtd", "2", *tiny)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "output" / "teachers" / "dtd" / "seed2"
    saved = build_config([run / "config.yaml"])
    assert (saved.DISTILL.OBJECTIVE, saved.SEED, saved.DATASET.SUBSAMPLE_CLASSES) == ("promptsrc", 2, "base")
    assert {"base", "new"} <= set(json.loads((run / "results.json").read_text()))
    assert set(load_checkpoint(run / "model.pt")["state_dict"]) >= {"prompt_learner.ctx", "image_encoder.VPT"}
    again = teacher_sh("dtd", "2", *tiny)
    assert again.returncode == 0 and "skip" in again.stdout
    assert teacher_sh("dtd").returncode == 2
