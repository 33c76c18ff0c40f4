"""CoCoOp's student: its formulas restated here per image (context ``ctx + meta_net(f_b)`` in every class prompt,
one text pass per image as CoCoOp's CustomCLIP runs it), the conditional path of the Distiller and of
evaluation (batched, chunked, cached), each recipe through ``clipkd train``, files under CoCoOp's names (clipkd's
and the PromptLearner state dict CoCoOp's Dassl trainer writes), the run log's memory line, bit-identical resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from clipkd.cli.main import main
from clipkd.config import build_config, check_config
from clipkd.data.loaders import ImageListDataset, build_loader, build_transform
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.engine.evaluate import predict_half
from clipkd.errors import ConfigError, ModelError
from clipkd.methods.distiller import Distiller, build_objective
from clipkd.models.cocoop import CoCoOpStudent
from clipkd.models.factory import create_clip
from clipkd.runs.run import Run
from test_checkpoints import dassl_save
from test_train import DATASET_CFG, ROOT, TINY, check_resume_is_exact, config, fit

CLASSES = ["cat", "golden retriever", "annual crop land"]
NAMES = {"prompt_learner.ctx", "prompt_learner.meta_net.linear1.weight", "prompt_learner.meta_net.linear1.bias",
         "prompt_learner.meta_net.linear2.weight", "prompt_learner.meta_net.linear2.bias"}


def tiny_student(prompts_per_pass: int = 4):
    clip_model, tokenizer = create_clip("clipkd-tiny-student", "")
    torch.manual_seed(0)
    student = CoCoOpStudent(clip_model, tokenizer, n_ctx=4, ctx_init="a photo of a",
                            prompts_per_pass=prompts_per_pass)
    with torch.no_grad():  # a non-zero, ReLU-active meta-net, so the image really moves the context
        student.meta_net.linear1.bias.fill_(0.3)
        student.meta_net.linear2.weight.normal_(std=0.5)
    return student, clip_model, tokenizer


def restated_logits(clip_model, tokenizer, ctx, w1, b1, w2, b2, images, classnames):
    """CoCoOp's logits, one image at a time, from open_clip's own modules: f_b = normalised image feature;
    ctx_b = ctx + W2 relu(W1 f_b + b1) + b2 in place of the 4 words after start-of-text of every
    "a photo of a <class>." prompt; the text feature is taken at end-of-text (the highest token id)."""
    tokens = tokenizer([f"a photo of a {c}." for c in classnames])
    rows = []
    for image in images:
        f = F.normalize(clip_model.encode_image(image[None]), dim=-1)[0]
        ctx_b = ctx + (torch.relu(f @ w1.t() + b1) @ w2.t() + b2)
        x = clip_model.token_embedding(tokens)
        x = torch.cat([x[:, :1], ctx_b.expand(len(classnames), -1, -1), x[:, 1 + ctx.shape[0]:]], dim=1)
        x = clip_model.transformer(x + clip_model.positional_embedding, attn_mask=clip_model.attn_mask)
        x = clip_model.ln_final(x)[torch.arange(len(classnames)), tokens.argmax(dim=-1)] @ clip_model.text_projection
        rows.append(clip_model.logit_scale.exp() * F.normalize(x, dim=-1) @ f)
    return torch.stack(rows)


def test_logits_ce_and_gradients_restate_cocoop():
    student, clip_model, tokenizer = tiny_student(prompts_per_pass=4)  # chunks cut across images (3 classes)
    cfg = build_config([ROOT / "configs" / "methods" / "cocoop.yaml"], [])
    distiller = Distiller(student, None, CLASSES, build_objective(cfg, student, CLASSES)).train()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 1])
    out = distiller(images, labels)
    out.loss.backward()
    got = {k: p.grad.clone() for k, p in [("ctx", student.text_encoder.ctx),
                                           *student.meta_net.named_parameters()]}

    leaves = [student.text_encoder.ctx.detach().clone().requires_grad_(),
              *(p.detach().clone().requires_grad_() for p in student.meta_net.parameters())]
    logits = restated_logits(clip_model, tokenizer, *leaves, images, CLASSES)
    ce = F.cross_entropy(logits, labels)
    ce.backward()
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ce, rtol=1e-6, atol=1e-6)
    for (name, g), leaf in zip(got.items(), leaves):
        assert leaf.grad.abs().max() > 0, name
        torch.testing.assert_close(g, leaf.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the class features depend on the image (else this would be CoOp)
    with torch.no_grad():
        per_image = student.conditional_text_features(student.image_features(images), CLASSES)
    assert per_image.shape == (3, len(CLASSES), student.embed_dim)
    assert not torch.allclose(per_image[0], per_image[1])


def test_chunking_does_not_change_the_features():
    student, _, _ = tiny_student(prompts_per_pass=1)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f = student.image_features(images)
        one = student.conditional_text_features(f, CLASSES)
        student.prompts_per_pass = 1000
        whole = student.conditional_text_features(f, CLASSES)
    torch.testing.assert_close(one, whole, rtol=1e-5, atol=1e-6)


def test_every_recipe_trains_through_the_cli(synth_root, tmp_path):
    for method in ("cocoop", "kd_cocoop", "abkd_cocoop"):
        out = tmp_path / method
        rc = main(["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--method",
                   str(ROOT / "configs" / "methods" / f"{method}.yaml"), "--output-dir", str(out), *TINY,
                   "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "2"])
        assert rc == 0, method
        results = json.loads((out / "results.json").read_text())
        assert results["base"]["n"] == 32 and results["new"]["n"] == 24
        log = (out / "log.txt").read_text()
        assert "student cocoop" in log
        assert "one text pass per (image, class): 2 images x 4 classes = 8 prompts a training step" in log
        saved = load_checkpoint(out / "model.pt")["state_dict"]
        assert set(saved) == NAMES, method


def test_conditional_evaluation_equals_a_direct_computation(synth_root, tmp_path):
    out = tmp_path / "run"
    fit(config(synth_root, "cocoop", "OPTIM.MAX_EPOCH", "1", "DATALOADER.TEST.BATCH_SIZE", "5"), out)
    run = Run.load(out)
    student = run.model("final").eval()
    student.prompts_per_pass = 7  # chunks that cut across images and batches
    cfg, device = run.cfg, torch.device("cpu")
    for half, split in run.data.halves.items():
        pred, true = predict_half(student, split, cfg, device)  # the single-process pass (predict_many)

        class Cache:  # EvalFeatureCache's interface: computes once, hands the features back
            def features(self, dataset, compute):
                return compute()

        cached, true_c = predict_half(student, split, cfg, device, feature_cache=Cache())
        dataset = ImageListDataset(split.test, split.dataset_dir, build_transform(cfg, is_train=False))
        direct = []
        with torch.no_grad():
            for images, _, _ in build_loader(dataset, 5, shuffle=False, num_workers=0):
                f = F.normalize(student.image_encoder.visual(images), dim=-1)
                t = student.conditional_text_features(f, split.classnames)
                direct.append((t @ f[:, :, None]).squeeze(-1).argmax(dim=-1))
        assert torch.equal(pred, torch.cat(direct)), half
        assert torch.equal(cached, pred) and torch.equal(true_c, true), half


def test_files_under_cocoop_names_and_dassl_prompt_learner_file(synth_root, tmp_path):
    cfg = config(synth_root, "cocoop")
    run = Run(cfg)
    run.build()
    student = run.student
    assert set(student.trainable_state_dict()) == NAMES
    # CoCoOp's Dassl trainer saves the PromptLearner's state dict (PREC fp16: half tensors), class buffers too
    g = torch.Generator().manual_seed(4)
    bare = {k.removeprefix("prompt_learner."): (torch.randn(v.shape, generator=g) * 0.1).half()
            for k, v in student.trainable_state_dict().items()}
    width = student.text_encoder.width
    tensors = {**bare, "token_prefix": torch.zeros(4, 1, width).half(),  # rebuilt from the class names, not read
               "token_suffix": torch.zeros(4, 27, width).half()}
    saved = dassl_save(tmp_path / "out" / "prompt_learner" / "model.pth.tar-10", tensors, set(bare))
    loaded = Run(cfg).load_student_file(tmp_path / "out" / "prompt_learner")
    for key in NAMES:
        assert torch.equal(loaded.trainable_state_dict()[key], saved[key.removeprefix("prompt_learner.")].float())

    wrong = dict(saved, ctx=torch.zeros(2, width))
    with pytest.raises(ModelError, match=rf"'prompt_learner\.ctx' has shape \(2, {width}\) in f\.tar but the "
                                         rf"model expects \(4, {width}\)"):
        student.load_trainable_state_dict(wrong, source="f.tar", ignore_frozen_clip_weights=True)


def test_resume_is_bit_identical(synth_root, tmp_path, monkeypatch):
    cfg = config(synth_root, "cocoop", "OPTIM.MAX_EPOCH", "2")
    a = check_resume_is_exact(cfg, tmp_path, monkeypatch)
    assert set(a) == NAMES


def test_settings_cocoop_cannot_take():
    with pytest.raises(ConfigError, match="N_CTX_TEXT >= 1"):
        tiny = create_clip("clipkd-tiny-student", "")
        CoCoOpStudent(*tiny, n_ctx=0)
    cfg = build_config([ROOT / "configs" / "methods" / "cocoop.yaml"],
                       ["DISTILL.OBJECTIVE", "promptsrc", "MODEL.TEACHER.PROMPTED", "False"])
    with pytest.raises(ConfigError, match=r"set MODEL\.STUDENT\.TYPE ivlp"):
        check_config(cfg)


def test_fused_sweep_cells_equal_the_cells_alone(synth_root, tmp_path):
    """``clipkd sweep --fused`` over ABKD cells of a CoCoOp student (copies of the first student, one shared
    teacher forward): each cell writes what it writes alone."""
    from clipkd.runs.sweep import build_grid, run_grid
    from test_fused import cells_equal_alone

    grid = build_grid(str(ROOT / "configs" / "methods" / "abkd_cocoop.yaml"), "dtd", "0.5:1:0.5", "0:0:1", [1],
                      tmp_path / "sweep", [*TINY, "OPTIM.MAX_EPOCH", "1"])
    summary = run_grid(grid, str(synth_root), fused=True)
    assert summary.lines()[0] == "sweep: 2 done, 0 skipped (finished before), 0 failed"
    cells_equal_alone(grid, synth_root, tmp_path)
