"""The VPT student (multimodal-prompt-learning ``trainers/vpt.py``): its forward and loss restated here from the
reference's description (prompts appended after the patch tokens, replaced before blocks 1..depth-1, the class
token pooled; classes = the frozen text tower's "a photo of a <name>."), frozen text features computed once,
each recipe through ``clipkd train``, files under the reference's names (its Dassl file in, clipkd's out) and an
interrupted run resumed bit-identically."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from clipkd.cli.main import main
from clipkd.config import check_config
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.errors import ConfigError, ModelError
from clipkd.methods.distiller import Distiller
from clipkd.methods.kd import KDObjective
from clipkd.models import build_student
from clipkd.models.factory import create_clip
from clipkd.models.vpt import VPTStudent
from clipkd.runs.run import Run
from test_checkpoints import dassl_save
from test_train import DATASET_CFG, ROOT, TINY, check_results, check_resume_is_exact, config

CLASSES = ["cat", "dog", "annual crop land"]
VPT_KEYS = {"image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow"}  # n_ctx x 64, depth 2


def tiny_vpt(n_ctx: int = 3, depth: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    clip_model, tokenizer = create_clip("clipkd-tiny-student", "")
    return VPTStudent(clip_model, tokenizer, n_ctx=n_ctx, depth=depth), clip_model, tokenizer


def restated_image_features(visual, prompts: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """VPT's image tower as its clip/model.py runs it: [class, patches] + positions, the first prompts appended,
    ln_pre, then block i's own prompts in place of the last n tokens for i >= 1, ln_post of the class token, proj."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    n = prompts[0].shape[0]
    x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i < len(prompts):
            x = torch.cat([x[:, :-n], prompts[i].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)


def test_logits_loss_and_gradients_are_vpts():
    student, clip_model, tokenizer = tiny_vpt()
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.normal_(0, 0.5)  # prompts large enough to matter
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])
    out = Distiller(student, None, CLASSES, KDObjective(None, 0.0, ce_weight=1.0)).train()(images, labels)
    out.loss.backward()

    prompts = [student.image_encoder.VPT.detach().clone().requires_grad_(True),
               student.image_encoder.VPT_shallow["1"].detach().clone().requires_grad_(True)]
    with torch.no_grad():
        text = clip_model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]), normalize=True)
    logits = clip_model.logit_scale.exp() * restated_image_features(clip_model.visual, prompts, images) @ text.t()
    ce = F.cross_entropy(logits, labels)
    ce.backward()
    assert torch.allclose(out.logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.loss, ce, rtol=1e-6)
    assert torch.allclose(student.image_encoder.VPT.grad, prompts[0].grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(student.image_encoder.VPT_shallow["1"].grad, prompts[1].grad, rtol=1e-4, atol=1e-7)
    assert prompts[1].grad.abs().sum() > 0
    # only the visual prompts train: the whole CLIP, text tower included, is frozen
    assert {k for k, p in student.named_parameters() if p.requires_grad} == {
        "image_encoder.VPT", "image_encoder.VPT_shallow.1"}


def test_text_features_are_frozen_and_computed_once(monkeypatch):
    student, _, _ = tiny_vpt()
    calls: list[int] = []
    real = student.text_encoder.forward
    monkeypatch.setattr(student.text_encoder, "forward", lambda tokens: calls.append(len(tokens)) or real(tokens))
    distiller = Distiller(student, None, CLASSES, KDObjective(None, 0.0, ce_weight=1.0)).train()
    opt = torch.optim.SGD(student.trainable_parameters(), lr=1.0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    first = student.text_features(CLASSES).clone()
    for _ in range(3):
        opt.zero_grad()
        distiller(images, torch.tensor([0, 1, 2, 1])).loss.backward()
        opt.step()
    assert calls == [len(CLASSES)]  # one text pass for the class list, none per step
    feats = student.text_features(CLASSES)
    assert not feats.requires_grad and torch.equal(feats, first)
    student.eval()
    with torch.no_grad():
        student.text_features(["red panda", "sea lion"])
        student.text_features(["red panda", "sea lion"])
    assert calls == [3, 2]  # a new class list (the new classes at evaluation) once


def test_prompt_sizes_come_from_the_config_and_none_is_refused():
    cfg = config("unused", "vpt", "MODEL.PROMPT.N_CTX_VISION", "5")
    student = build_student(cfg)
    assert isinstance(student, VPTStudent)
    assert {k: tuple(v.shape) for k, v in student.trainable_state_dict().items()} == {k: (5, 64) for k in VPT_KEYS}
    with pytest.raises(ConfigError, match=r"MODEL\.STUDENT\.TYPE vpt learns only its visual prompts.*"
                                          r"N_CTX_VISION and MODEL\.PROMPT\.DEPTH_VISION to at least 1"):
        build_student(config("unused", "vpt", "MODEL.PROMPT.N_CTX_VISION", "0"))


@pytest.mark.parametrize("recipe", ["vpt", "kd_vpt", "abkd_vpt"])
def test_each_recipe_trains_through_clipkd_train(synth_root, tmp_path, recipe):
    out = tmp_path / recipe
    rc = main(["train", "--root", str(synth_root), "--method", recipe, "--dataset", "oxford_pets", "--seed", "1",
               "--output-dir", str(out), *TINY, "OPTIM.MAX_EPOCH", "1"])
    assert rc == 0
    check_results(json.loads((out / "results.json").read_text()))
    log = (out / "log.txt").read_text()
    own = recipe == "vpt"
    assert ("objective CE x 1" in log) == own
    assert ("objective promptkd_kl" in log) == (recipe == "kd_vpt")
    assert ("objective ab(alpha=0.8, beta=0.3" in log) == (recipe == "abkd_vpt")
    saved = load_checkpoint(out / "model.pt")["state_dict"]
    assert set(saved) == VPT_KEYS  # the reference's names, nothing else
    assert all(v.shape == (8, 64) for v in saved.values())  # the recipe's 8 tokens


def _vpt_dassl_tensors(student: VPTStudent) -> tuple[dict[str, torch.Tensor], set[str]]:
    """What VPT's Dassl trainer saves: the whole CustomCLIP's state dict (registered as ``prompt_learner``), i.e.
    the prompts (its only parameters with "VPT" in the name) plus the frozen image tower, its TextEncoder
    (transformer, positional_embedding, ln_final, text_projection) and logit_scale."""
    g = torch.Generator().manual_seed(7)
    prompts = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in student.trainable_state_dict().items()}
    frozen = {"image_encoder.conv1.weight": torch.randn(64, 3, 8, 8, generator=g),
              "image_encoder.class_embedding": torch.randn(64, generator=g),
              "image_encoder.transformer.resblocks.0.attn.in_proj_weight": torch.randn(192, 64, generator=g),
              "image_encoder.ln_post.weight": torch.ones(64), "image_encoder.proj": torch.randn(64, 48, generator=g),
              "text_encoder.positional_embedding": torch.randn(32, 48, generator=g),
              "text_encoder.transformer.resblocks.1.mlp.c_fc.bias": torch.zeros(192),
              "text_encoder.ln_final.weight": torch.ones(48), "text_encoder.text_projection": torch.randn(48, 48),
              "logit_scale": torch.tensor(4.6052)}
    return {**prompts, **frozen}, set(prompts)


def test_reference_dassl_file_loads_and_clipkd_file_uses_its_names(synth_root, tmp_path):
    cfg = config(synth_root, "vpt", "MODEL.PROMPT.N_CTX_VISION", "3")
    run = Run(cfg)
    run.build()
    student = run.student
    assert set(student.trainable_state_dict()) == VPT_KEYS
    tensors, trainable = _vpt_dassl_tensors(student)
    file = tmp_path / "output" / "prompt_learner" / "model.pth.tar-5"  # VPT's Dassl layout
    saved = dassl_save(file, tensors, trainable)

    loaded = Run(cfg).load_student_file(file)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.trainable_state_dict().items())
    assert main(["eval", "--checkpoint", str(file.parents[1]), "--root", str(synth_root), "--dataset-config",
                 DATASET_CFG, "--config", str(ROOT / "configs" / "methods" / "vpt.yaml"), "--output-dir",
                 str(tmp_path / "eval"), *TINY, "MODEL.PROMPT.N_CTX_VISION", "3"]) == 0
    check_results(json.loads((tmp_path / "eval" / "results.json").read_text()))

    # a file of other prompt sizes: one line naming the key and both shapes
    wider = dict(tensors, **{"image_encoder.VPT": torch.zeros(8, 64)})
    with pytest.raises(ModelError, match=r"'image_encoder\.VPT' has shape \(8, 64\) in f\.pth\.tar but the model "
                                         r"expects \(3, 64\)") as err:
        student.load_trainable_state_dict(wider, source="f.pth.tar", ignore_frozen_clip_weights=True)
    assert "\n" not in str(err.value)
    deeper = dict(tensors, **{"image_encoder.transformer.resblocks.2.VPT_shallow": torch.zeros(3, 64)})
    with pytest.raises(ModelError, match=r"unexpected keys: image_encoder\.transformer\.resblocks\.2\.VPT_shallow"
                                         r".*MODEL\.PROMPT\.N_CTX_VISION 3 MODEL\.PROMPT\.DEPTH_VISION 3"):
        student.load_trainable_state_dict(deeper, source="f.pth.tar", ignore_frozen_clip_weights=True)


def test_resume_is_bit_identical(synth_root, tmp_path, monkeypatch):
    cfg = config(synth_root, "vpt", "OPTIM.MAX_EPOCH", "3", "MODEL.PROMPT.N_CTX_VISION", "2")
    a = check_resume_is_exact(cfg, tmp_path, monkeypatch)
    assert set(a) == VPT_KEYS


def test_promptsrc_objective_is_refused_for_vpt():
    """PromptSRC's regulariser trains the text prompts; VPT's text features are frozen: one line, both keys."""
    with pytest.raises(ConfigError, match=r"DISTILL\.OBJECTIVE promptsrc: it trains prompts in both towers: set "
                                          r"MODEL\.STUDENT\.TYPE ivlp") as err:
        check_config(config("unused", "vpt", "DISTILL.OBJECTIVE", "promptsrc"))
    assert "\n" not in str(err.value)


def test_fused_sweep_cells_equal_the_cells_alone(synth_root, tmp_path):
    """``clipkd sweep --fused`` over ABKD cells of a VPT student: each cell (a copy of the first student, its text
    features computed once) writes what it writes alone."""
    from clipkd.runs.sweep import build_grid, run_grid
    from test_fused import cells_equal_alone

    grid = build_grid(str(ROOT / "configs" / "methods" / "abkd_vpt.yaml"), "dtd", "0.5:1:0.5", "0:0:1", [1],
                      tmp_path / "sweep", [*TINY, "OPTIM.MAX_EPOCH", "1", "MODEL.PROMPT.N_CTX_VISION", "2"])
    summary = run_grid(grid, str(synth_root), fused=True)
    assert summary.lines()[0] == "sweep: 2 done, 0 skipped (finished before), 0 failed"
    cells_equal_alone(grid, synth_root, tmp_path)
