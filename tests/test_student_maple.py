"""The MaPLe student (MODEL.STUDENT.TYPE maple): MaPLe's formulas restated here on open_clip's own modules
(text prompts after start-of-text, vision prompts = linear maps of the text prompts appended after the patch
tokens, replaced in blocks 1..depth-1), its three recipes through ``clipkd train``, its checkpoint under MaPLe's
names (a file as MaPLe's Dassl trainer writes it loads, read without unpickling code), and exact resume. The
side-by-side run against MaPLe's own code is in the report (/tmp/ref_maple/side_by_side.py), not here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from clipkd.cli.main import main
from clipkd.config import build_config
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.errors import ConfigError, ModelError
from clipkd.models.factory import create_clip
from clipkd.models.maple import MaPLeStudent
from clipkd.runs.run import Run
from test_checkpoints import dassl_save
from test_train import DATASET_CFG, ROOT, TINY, check_results, check_resume_is_exact, config

CLASSES = ["cat", "dog", "annual crop land"]
N_CTX, DEPTH = 2, 2  # the tiny student has 2 blocks per tower


def maple_names(depth: int) -> list[str]:
    """What MaPLe's MultiModalPromptLearner registers (its trainer saves them under ``prompt_learner.``)."""
    names = ["prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias"]
    names += [f"prompt_learner.compound_prompts_text.{i}" for i in range(depth - 1)]
    for i in range(depth - 1):
        names += [f"prompt_learner.compound_prompt_projections.{i}.weight",
                  f"prompt_learner.compound_prompt_projections.{i}.bias"]
    return names


def tiny_maple(ctx_init: str = "a photo of a", n_ctx: int = N_CTX, seed: int = 0, depth: int = DEPTH,
               name: str = "clipkd-tiny-student"):
    torch.manual_seed(seed)
    clip_model, tokenizer = create_clip(name)
    prompt = build_config([], ["MODEL.PROMPT.N_CTX_TEXT", str(n_ctx), "MODEL.PROMPT.DEPTH_TEXT", str(depth),
                               "MODEL.PROMPT.CTX_INIT", ctx_init]).MODEL.PROMPT
    return clip_model, tokenizer, MaPLeStudent.from_clip(clip_model, tokenizer, prompt, None)


# ------------------------------------------------------------------------------------------------ formulas
def restated_logits(clip_model, tokenizer, p: dict[str, torch.Tensor], images, classnames):
    """MaPLe's CustomCLIP forward written out on open_clip's modules, from the prompt learner's tensors ``p``."""
    n = p["prompt_learner.ctx"].shape[0]
    text_deep = [p[f"prompt_learner.compound_prompts_text.{i}"] for i in range(DEPTH - 1)]
    vision = [F.linear(p["prompt_learner.ctx"], p["prompt_learner.proj.weight"], p["prompt_learner.proj.bias"])]
    vision += [F.linear(t, p[f"prompt_learner.compound_prompt_projections.{i}.weight"],
                        p[f"prompt_learner.compound_prompt_projections.{i}.bias"]) for i, t in enumerate(text_deep)]
    # image tower
    v = clip_model.visual
    b = images.shape[0]
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(b, 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(torch.cat([x, vision[0].expand(b, -1, -1)], dim=1))
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < DEPTH:
            x = torch.cat([x[:, :-n], vision[i].expand(b, -1, -1)], dim=1)
        x = block(x)
    img = v.ln_post(x[:, 0]) @ v.proj
    # text tower: "a photo of a <name>." with the first n word embeddings learned
    ids = tokenizer([f"a photo of a {c}." for c in classnames])
    c = ids.shape[0]
    x = clip_model.token_embedding(ids)
    x = torch.cat([x[:, :1], p["prompt_learner.ctx"].expand(c, -1, -1), x[:, 1 + n:]], dim=1)
    x = x + clip_model.positional_embedding
    for i, block in enumerate(clip_model.transformer.resblocks):
        if 1 <= i < DEPTH:
            x = torch.cat([x[:, :1], text_deep[i - 1].expand(c, -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=clip_model.attn_mask)
    txt = clip_model.ln_final(x)[torch.arange(c), ids.argmax(dim=-1)] @ clip_model.text_projection
    return clip_model.logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()


def test_logits_and_gradients_are_maples():
    clip_model, tokenizer, student = tiny_maple()
    student.train()
    params = student._trainable_targets()
    assert list(params) == maple_names(DEPTH)
    with torch.no_grad():  # the projections start equal (MaPLe clones one layer); spread them so a mix-up shows
        for t in student.compound_prompt_projections.parameters():
            t.add_(0.1 * torch.randn_like(t))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])

    ours = student.logit_scale * student.image_features(images) @ student.text_features(CLASSES).t()
    theirs = restated_logits(clip_model, tokenizer, params, images, CLASSES)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(F.cross_entropy(ours, labels), list(params.values()))
    expect = torch.autograd.grad(F.cross_entropy(theirs, labels), list(params.values()))
    for name, a, e in zip(params, grads, expect):
        assert e.abs().max() > 0, name
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7, msg=name)

    # the coupling: the image tower alone trains the text prompts through the projections
    g = torch.autograd.grad(student.image_features(images).sum(), [params["prompt_learner.ctx"],
                                                                    params["prompt_learner.compound_prompts_text.0"]])
    assert all(t.abs().max() > 0 for t in g)


def test_initialisation_is_maples():
    clip_model, tokenizer, student = tiny_maple()
    words = clip_model.token_embedding(tokenizer(["a photo of a"]))[0, 1:1 + N_CTX]
    assert torch.equal(student.text_encoder.ctx.detach(), words.detach())  # "a photo" learns, "of a" stays fixed
    assert student.text_encoder.class_prompts(["cat"]) == ["a photo of a cat."]
    assert student.proj.weight.shape == (64, 48)  # text width -> vision width
    layers = tiny_maple(depth=3, name="clipkd-tiny-teacher")[2].compound_prompt_projections  # 3 blocks per tower
    assert len(layers) == 2 and layers[0].weight is not layers[1].weight  # two layers that start equal (a clone)
    assert torch.equal(layers[0].weight, layers[1].weight) and torch.equal(layers[0].bias, layers[1].bias)
    assert student.text_encoder.VPT_shallow["1"].std() < 0.05  # N(0, 0.02^2)
    _, _, random_init = tiny_maple(ctx_init="")
    assert random_init.text_encoder.class_prompts(["cat"]) == ["X X cat."]
    with pytest.raises(ConfigError, match="MODEL.PROMPT.CTX_INIT 'a photo' is 2 tokens long, fewer than "
                                          "MODEL.PROMPT.N_CTX_TEXT 3"):
        tiny_maple(ctx_init="a photo", n_ctx=3)


# ------------------------------------------------------------------------------------------------ recipes
def train_cli(root, out, method, *extra):
    return main(["train", "--root", str(root), "--dataset-config", DATASET_CFG, "--config",
                 str(ROOT / "configs" / "methods" / f"{method}.yaml"), "--output-dir", str(out), *TINY,
                 "OPTIM.MAX_EPOCH", "1", *extra])


@pytest.mark.parametrize("method, protocol", [("maple", "inductive"), ("kd_maple", "inductive"),
                                              ("abkd_maple", "inductive"), ("kd_maple", "transductive")])
def test_each_recipe_trains_through_the_cli(synth_root, tmp_path, method, protocol):
    out = tmp_path / method
    assert train_cli(synth_root, out, method, "DISTILL.PROTOCOL", protocol) == 0
    check_results(json.loads((out / "results.json").read_text()))
    cfg = build_config([out / "config.yaml"])
    assert cfg.MODEL.STUDENT.TYPE == "maple" and cfg.MODEL.PROMPT.N_CTX_TEXT == 2
    assert cfg.DISTILL.LOSS == {"maple": cfg.DISTILL.LOSS, "kd_maple": "promptkd_kl", "abkd_maple": "ab"}[method]
    assert list(load_checkpoint(out / "model.pt")["state_dict"]) == maple_names(DEPTH)


# ------------------------------------------------------------------------------------------------ files
def maple_dassl_tensors(student, seed: int = 3) -> tuple[dict[str, torch.Tensor], set[str]]:
    """What MaPLe's trainer saves (fp16 run): the whole CustomCLIP, i.e. the frozen towers under
    ``image_encoder.`` / ``text_encoder.``, ``logit_scale``, the class buffers token_prefix/suffix, and the prompt
    learner: ctx and proj in fp16 (proj.half()), the compound prompts and projections in fp32."""
    g = torch.Generator().manual_seed(seed)
    out = {f"image_encoder.{k}": v.clone() for k, v in student.image_encoder.visual.state_dict().items()}
    text = student.text_encoder
    out.update({f"text_encoder.transformer.{k}": v.clone() for k, v in text.transformer.state_dict().items()})
    out["text_encoder.positional_embedding"] = text.positional_embedding.detach().clone()
    out["logit_scale"] = torch.tensor(4.6)
    out["prompt_learner.token_prefix"] = torch.randn(5, 1, 48, generator=g)  # 5 classes: not this run's 4
    out["prompt_learner.token_suffix"] = torch.randn(5, 29, 48, generator=g)
    learnable = set()
    for key, value in student.trainable_state_dict().items():
        v = torch.randn(value.shape, generator=g) * 0.1
        out[key] = v.half() if key.startswith(("prompt_learner.ctx", "prompt_learner.proj.")) else v
        learnable.add(key)
    return out, learnable


def test_a_maple_dassl_file_loads_and_clipkd_files_keep_its_names(synth_root, tmp_path):
    cfg = config(synth_root, "maple")
    run = Run(cfg)
    run.build()
    tensors, learnable = maple_dassl_tensors(run.student)
    file = tmp_path / "out" / "MultiModalPromptLearner" / "model.pth.tar-5"
    saved = dassl_save(file, tensors, learnable)
    loaded = Run(cfg).load_student_file(tmp_path / "out" / "MultiModalPromptLearner").eval()
    for key, value in loaded.trainable_state_dict().items():
        assert torch.equal(value, saved[key].float()), key
    assert list(loaded.trainable_state_dict()) == maple_names(DEPTH)

    # clipkd's dict goes back in as is, and a MaPLe prompt learner's state dict (its names) loads strictly
    again = Run(cfg)
    again.build()  # seeded as training builds: the same random-init CLIP
    fresh = again.student
    fresh.load_trainable_state_dict(loaded.trainable_state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval().image_features(images), loaded.image_features(images))
        assert torch.equal(fresh.text_features(CLASSES), loaded.text_features(CLASSES))

    # a mismatch is one line naming the key, both shapes and the sizes the file has
    wide = dict(saved)
    wide["prompt_learner.ctx"] = torch.zeros(4, 48)
    with pytest.raises(ModelError) as err:
        fresh.load_trainable_state_dict(wide, source="f.pth", ignore_frozen_clip_weights=True)
    msg = str(err.value)
    assert "\n" not in msg and "'prompt_learner.ctx' has shape (4, 48) in f.pth but the model expects (2, 48)" in msg
    assert "the file's prompts are MODEL.PROMPT.N_CTX_TEXT 4 MODEL.PROMPT.DEPTH_TEXT 2" in msg
    no_proj = {k: v for k, v in saved.items() if not k.startswith("prompt_learner.proj.")}
    with pytest.raises(ModelError, match="missing keys: prompt_learner.proj.weight, prompt_learner.proj.bias"):
        fresh.load_trainable_state_dict(no_proj, ignore_frozen_clip_weights=True)


def test_resume_is_bit_identical(synth_root, tmp_path, monkeypatch):
    cfg = config(synth_root, "kd_maple", "OPTIM.MAX_EPOCH", "3")
    a = check_resume_is_exact(cfg, tmp_path, monkeypatch)
    assert list(a) == maple_names(DEPTH)


def test_fused_sweep_cells_equal_cells_alone_and_report(synth_root, tmp_path, capsys):
    from clipkd.runs.sweep import build_grid, run_grid
    from test_fused import cells_equal_alone

    grid = build_grid(ROOT / "configs" / "methods" / "abkd_maple.yaml", "dtd", "0.5:1:0.5", "0.5:0.5:0.5", [1],
                      tmp_path / "sweep", [*TINY, "OPTIM.MAX_EPOCH", "1"])
    assert len(grid.cells) == 2
    summary = run_grid(grid, str(synth_root), fused=True)
    assert summary.lines()[0] == "sweep: 2 done, 0 skipped (finished before), 0 failed"
    cells_equal_alone(grid, synth_root, tmp_path)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "sweep"), "--sweep"]) == 0
    assert "abkd_maple" in capsys.readouterr().out


@pytest.mark.parametrize("extra, pattern", [
    (["MODEL.PROMPT.DEPTH_TEXT", "3"], "MODEL.PROMPT.DEPTH_TEXT 3 exceeds the 2 blocks of this model's image "
                                       "transformer"),
    (["MODEL.PROMPT.N_CTX_TEXT", "5"], "MODEL.PROMPT.CTX_INIT 'a photo of a' is 4 tokens long, fewer than "
                                       "MODEL.PROMPT.N_CTX_TEXT 5"),
])
def test_bad_sizes_are_one_line_and_nothing_is_written(synth_root, tmp_path, capsys, extra, pattern):
    out = tmp_path / "run"
    assert train_cli(synth_root, out, "maple", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipkd: error: ") and pattern in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())
