"""CoOp and KgCoOp students (MODEL.STUDENT.TYPE coop / kgcoop, DISTILL.OBJECTIVE kgcoop): their forward and
KgCoOp's loss restated here from open_clip's own modules, every recipe through ``clipkd train``, files under
CoOp's names both ways (clipkd's, and the prompt learner file CoOp's / KgCoOp's Dassl trainer writes), mismatches
named in one line, exact resume, and the settings that do not go together refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from clipkd.cli.main import main
from clipkd.config import build_config, check_config
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.errors import ConfigError, ModelError
from clipkd.methods.distiller import Distiller, build_objective
from clipkd.methods.kd import KDObjective
from clipkd.methods.kgcoop import KgCoOpObjective, kgcoop_template
from clipkd.models.coop import CoOpStudent, KgCoOpStudent
from clipkd.models.factory import create_clip
from clipkd.models.student import build_student
from clipkd.models.teacher import build_teacher
from clipkd.runs.run import Run
from test_checkpoints import dassl_save
from test_train import DATASET_CFG, ROOT, TINY, check_resume_is_exact, config

CLASSES = ["abyssinian", "american bulldog", "great pyrenees"]
RECIPES = ["coop", "kd_coop", "abkd_coop", "kgcoop", "kd_kgcoop", "abkd_kgcoop"]
# The tiny student's text width (clipkd-tiny-student), the shape of CoOp's ctx: [N_CTX_TEXT, width].
WIDTH = 48


def tiny_clip():
    torch.manual_seed(0)
    return create_clip("clipkd-tiny-student", "")


def by_hand_text_features(clip_model, tokenizer, ctx, texts):
    """CoOp's text side, restated with open_clip's modules: token embeddings of ``texts`` with positions
    1..n_ctx replaced by ``ctx``, CLIP's transformer, ln_final, the end-of-text token, the projection."""
    tokens = tokenizer(texts)
    x = clip_model.token_embedding(tokens)
    x = torch.cat([x[:, :1], ctx.unsqueeze(0).expand(len(texts), -1, -1), x[:, 1 + ctx.shape[0]:]], dim=1)
    x = clip_model.transformer(x + clip_model.positional_embedding, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)[torch.arange(len(texts)), tokens.argmax(dim=-1)] @ clip_model.text_projection
    return F.normalize(x, dim=-1)


# ------------------------------------------------------------------------------------------------ the students
def test_coop_is_frozen_clip_with_a_learned_context_before_the_class_name():
    clip_model, tokenizer = tiny_clip()
    student = CoOpStudent(clip_model, tokenizer, n_ctx=4, ctx_init="a photo of a").eval()
    sd = student.trainable_state_dict()
    assert list(sd) == ["prompt_learner.ctx"] and sd["prompt_learner.ctx"].shape == (4, WIDTH)
    assert [p for p in student.parameters() if p.requires_grad] == [student.text_encoder.ctx]
    # initialised from the words' token embeddings
    words = clip_model.token_embedding(tokenizer(["a photo of a"]))[0, 1:5]
    assert torch.equal(sd["prompt_learner.ctx"], words)
    with torch.no_grad():
        student.text_encoder.ctx.add_(torch.randn(4, WIDTH) * 0.5)  # a context that is not the words any more
        expected = by_hand_text_features(clip_model, tokenizer, student.text_encoder.ctx,
                                         [f"a photo of a {c}." for c in CLASSES])
        assert torch.allclose(student.text_features(CLASSES), expected, atol=1e-6)
        images = torch.randn(2, 3, 32, 32)
        assert torch.allclose(student.image_features(images), F.normalize(clip_model.encode_image(images), dim=-1),
                              atol=1e-6)  # the image tower is CLIP's, untouched


def test_coop_random_context_and_sizes():
    clip_model, tokenizer = tiny_clip()
    student = CoOpStudent(clip_model, tokenizer, n_ctx=3, ctx_init="")
    ctx = student.trainable_state_dict()["prompt_learner.ctx"]
    assert ctx.shape == (3, WIDTH) and 0.01 < float(ctx.std()) < 0.03  # N(0, 0.02^2), CoOp's init
    assert student.text_encoder.class_prompts(["cat"]) == ["X X X cat."]
    with pytest.raises(ConfigError, match="N_CTX_TEXT is 0"):
        CoOpStudent(clip_model, tokenizer, n_ctx=0)
    with pytest.raises(ConfigError, match="CTX_INIT 'a photo of a' is 4 words but MODEL.PROMPT.N_CTX_TEXT is 2"):
        CoOpStudent(clip_model, tokenizer, n_ctx=2, ctx_init="a photo of a")


def test_kgcoop_handcrafted_embeddings_are_clips_on_kgcoops_template():
    clip_model, tokenizer = tiny_clip()
    student = KgCoOpStudent(clip_model, tokenizer)
    template = kgcoop_template("oxford_pets")
    assert template == "a photo of a {}, a type of pet."
    assert kgcoop_template("dtd") == "a photo of a {}, a type of texture."  # KgCoOp's, not CoOp's "{} texture."
    with torch.no_grad():
        expected = F.normalize(clip_model.encode_text(tokenizer([template.format(c) for c in CLASSES])), dim=-1)
    got = student.handcrafted_text_features(CLASSES, template)
    assert not got.requires_grad and torch.allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the objective
def test_kgcoop_objective_is_kd_part_plus_w_times_one_minus_mean_cosine():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # cosines 0.6 and 0.0: score 1 - 0.3 = 0.7
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    feats = type("F", (), {"text_features": t})()
    ce = F.cross_entropy(logits, labels)
    obj = KgCoOpObjective(KDObjective(None, 0.0, ce_weight=1.0), h, weight=8.0)
    loss, terms = obj(logits, None, labels, features=feats)
    assert not obj.needs_teacher and obj.needs_labels
    assert terms["kgcoop"].item() == pytest.approx(0.7) and loss.item() == pytest.approx(ce.item() + 8.0 * 0.7)

    def kl(s, te, **_):  # batch-mean KL(teacher || student); target and epoch unused
        return (F.softmax(te, 1) * (F.log_softmax(te, 1) - F.log_softmax(s, 1))).sum(1).mean()

    kd = KDObjective(kl, 2.0, ce_weight=0.0)
    obj = KgCoOpObjective(kd, h, weight=0.5)
    loss, terms = obj(logits, teacher, labels, features=feats)
    assert obj.needs_teacher and not obj.needs_labels  # the KD part's answers
    assert loss.item() == pytest.approx(2.0 * kl(logits, teacher).item() + 0.5 * 0.7, rel=1e-6)
    assert set(terms) == {"kd", "kgcoop"}


def test_kgcoop_step_through_the_distiller_matches_the_formula():
    cfg = build_config([], [*TINY, "DATASET.NAME", "oxford_pets", "MODEL.STUDENT.TYPE", "kgcoop",
                            "DISTILL.OBJECTIVE", "kgcoop", "DISTILL.WEIGHT", "0", "DISTILL.CE_WEIGHT", "1",
                            "KGCOOP.W", "8.0", "MODEL.TEACHER.PROMPTED", "False"])
    check_config(cfg)
    torch.manual_seed(0)
    student = build_student(cfg, None).train()
    objective = build_objective(cfg, student, CLASSES)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = Distiller(student, None, CLASSES, objective)(images, labels)
    text = student.text_features(CLASSES)
    hand = student.handcrafted_text_features(CLASSES, "a photo of a {}, a type of pet.")
    logits = student.logit_scale * student.image_features(images) @ text.t()
    expected = F.cross_entropy(logits, labels) + 8.0 * (1 - (text * hand).sum(-1).mean())
    assert torch.allclose(out.loss, expected, atol=1e-5)
    out.loss.backward()
    assert student.text_encoder.ctx.grad is not None and student.text_encoder.ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("objective, student, fix", [
    ("kgcoop", "coop", "DISTILL.OBJECTIVE kgcoop with MODEL.STUDENT.TYPE coop: KgCoOp's term needs the kgcoop "
     "student's hand-crafted class embeddings; set MODEL.STUDENT.TYPE kgcoop"),
    ("kd", "kgcoop", "MODEL.STUDENT.TYPE kgcoop trains with DISTILL.OBJECTIVE kgcoop, not kd (it is CoOp trained "
     "with KgCoOp's knowledge-guided term; for CoOp without it use coop): set DISTILL.OBJECTIVE kgcoop"),
])
def test_kgcoop_student_and_objective_go_together(synth_root, tmp_path, capsys, objective, student, fix):
    out = tmp_path / "run"
    assert main(["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
                 str(ROOT / "configs" / "methods" / "kgcoop.yaml"), "--output-dir", str(out), *TINY,
                 "DISTILL.OBJECTIVE", objective, "MODEL.STUDENT.TYPE", student]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipkd: error:")]
    assert len(errors) == 1 and fix in errors[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_one_epoch_through_clipkd_train(synth_root, tmp_path, recipe):
    out = tmp_path / "run"
    assert main(["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
                 str(ROOT / "configs" / "methods" / f"{recipe}.yaml"), "--output-dir", str(out), *TINY,
                 "OPTIM.MAX_EPOCH", "1", "OPTIM.PRECISION", "fp32", "DATALOADER.TRAIN_X.BATCH_SIZE", "4"]) == 0
    sd = load_checkpoint(out / "model.pt")["state_dict"]
    assert list(sd) == ["prompt_learner.ctx"] and sd["prompt_learner.ctx"].shape == (4, WIDTH)
    results = json.loads((out / "results.json").read_text())
    assert {"base", "new", "hm"} <= set(results)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in steps if x["kind"] == "step"]
    assert losses and all(v == v and abs(v) < float("inf") for v in losses)


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("kind, extra", [
    ("coop", {}),
    # KgCoOp's prompt learner also saves tensors it never trains (bias_vectors, a meta_net): never read
    ("kgcoop", {"bias_vectors": torch.randn(1, 512), "meta_net.linear1.weight": torch.randn(512, 512),
                "meta_net.linear1.bias": torch.randn(512)}),
])
def test_dassl_prompt_learner_file_loads_and_evaluates(synth_root, tmp_path, kind, extra):
    recipe = "coop" if kind == "coop" else "kgcoop"
    cfg = config(synth_root, recipe)
    ctx = torch.randn(4, WIDTH) * 0.02
    # Dassl writes the registered module alone: keys relative to the prompt learner, with the class buffers
    tensors = {"ctx": ctx.half(), "token_prefix": torch.randn(3, 1, WIDTH).half(),
               "token_suffix": torch.randn(3, 27, WIDTH).half(), **extra}
    dassl_dir = tmp_path / "coop_out" / "prompt_learner"
    saved = dassl_save(dassl_dir / "model.pth.tar-50", tensors, {"ctx"})
    student = Run(cfg).load_student_file(tmp_path / "coop_out")  # the Dassl output folder, as CoOp lays it out
    assert torch.equal(student.trainable_state_dict()["prompt_learner.ctx"], saved["ctx"].float())
    # and a clipkd file with the same tensor under CoOp's name gives the same model
    torch.save({"state_dict": {"prompt_learner.ctx": saved["ctx"].float()}}, tmp_path / "mine.pt")
    again = Run(cfg).load_student_file(tmp_path / "mine.pt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = student.eval().image_features(images) @ student.text_features(CLASSES).t()
        b = again.eval().image_features(images) @ again.text_features(CLASSES).t()
    assert torch.equal(a, b)


def test_a_context_of_another_size_is_one_line_naming_key_and_shapes(synth_root, tmp_path):
    cfg = config(synth_root, "coop")
    torch.save({"state_dict": {"ctx": torch.zeros(16, WIDTH), "token_prefix": torch.zeros(3, 1, WIDTH)}},
               tmp_path / "model.pth.tar-5")
    with pytest.raises(ModelError) as exc:
        Run(cfg).load_student_file(tmp_path / "model.pth.tar-5")
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"'prompt_learner.ctx' has shape (16, {WIDTH})" in msg and f"expects (4, {WIDTH})" in msg
    assert "MODEL.PROMPT.N_CTX_TEXT 16" in msg
    torch.save({"state_dict": {"prompt_learner.ctx_x": torch.zeros(4, WIDTH)}}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="missing keys: prompt_learner.ctx; unexpected keys: prompt_learner.ctx_x"):
        Run(cfg).load_student_file(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("recipe", ["coop", "abkd_kgcoop"])
def test_resume_is_bit_identical(synth_root, tmp_path, monkeypatch, recipe):
    cfg = config(synth_root, recipe, "OPTIM.MAX_EPOCH", "2", "OPTIM.PRECISION", "fp32")
    a = check_resume_is_exact(cfg, tmp_path, monkeypatch)
    assert list(a) == ["prompt_learner.ctx"]


def test_kgcoop_recipe_builds_no_teacher_and_kd_recipe_does(synth_root):
    from clipkd.runs.checks import needs_teacher

    assert not needs_teacher(config(synth_root, "kgcoop")) and not needs_teacher(config(synth_root, "coop"))
    assert needs_teacher(config(synth_root, "kd_kgcoop")) and needs_teacher(config(synth_root, "abkd_coop"))
    cfg = config(synth_root, "kd_kgcoop")
    teacher = build_teacher(cfg, "a photo of a {}.")
    objective = build_objective(cfg, build_student(cfg, teacher), CLASSES)
    assert objective.needs_teacher and not objective.needs_labels and objective.weight == 8.0


# ------------------------------------------------------------------------------------------------ sweeps
def test_fused_sweep_over_kgcoop_weight_and_alpha_equals_the_cells_alone(synth_root, tmp_path):
    from clipkd.runs.fused import group_cells
    from clipkd.runs.sweep import build_grid, run_grid
    from test_fused import cells_equal_alone

    grid = build_grid(ROOT / "configs/methods/abkd_kgcoop.yaml", "dtd", "0.5:1:0.5", "0.3:0.3:0.1", [1],
                      tmp_path / "sweep", [*TINY, "OPTIM.MAX_EPOCH", "1"], vary=[("KGCOOP.W", "0,8")])
    assert len(grid.cells) == 4
    # KGCOOP.W is what a student learns, not the data stream: one group, one teacher forward per batch
    assert len(group_cells([grid.config(c, str(synth_root)) for c in grid.cells])) == 1
    summary = run_grid(grid, str(synth_root), fused=True)
    assert summary.lines()[0] == "sweep: 4 done, 0 skipped (finished before), 0 failed"
    cells_equal_alone(grid, synth_root, tmp_path, grid.cells[:2])
