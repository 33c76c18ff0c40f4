"""clipkd.models: factory, IVLP prompt placement, teacher, students. Tiny random models only (no downloads)."""

from __future__ import annotations

import copy
import logging
import math
import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clipkd.config import get_cfg_defaults  # noqa: E402
from clipkd.errors import ConfigError, ModelError  # noqa: E402
from clipkd.models import (  # noqa: E402
    IVLPStudent,
    Projector,
    PromptedTextEncoder,
    PromptedVisionEncoder,
    PromptKDStudent,
    Teacher,
    build_student,
    build_teacher,
    create_clip,
    image_size,
    ivlp_state_dict,
    load_ivlp_state_dict,
    read_prompt_checkpoint,
    uses_quick_gelu,
)

TEACHER = "clipkd-tiny-teacher"
STUDENT = "clipkd-tiny-student"
CLASSES = ["cat", "dog", "annual crop land", "2012 Tesla Model S"]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny(name: str = TEACHER, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_clip(name, **kw)


def prompted_cfg(**prompt):
    cfg = get_cfg_defaults()
    cfg.MODEL.TEACHER.NAME = TEACHER
    cfg.MODEL.STUDENT.NAME = STUDENT
    cfg.DATASET.NAME = "oxford_pets"
    cfg.MODEL.PROMPT.N_CTX_VISION = prompt.get("n_ctx_vision", 2)
    cfg.MODEL.PROMPT.N_CTX_TEXT = prompt.get("n_ctx_text", 4)
    cfg.MODEL.PROMPT.DEPTH_VISION = prompt.get("depth_vision", 2)
    cfg.MODEL.PROMPT.DEPTH_TEXT = prompt.get("depth_text", 2)
    return cfg


# ------------------------------------------------------------------------------------------------ factory


class _Pickled:
    """A Python object in a checkpoint: weights_only loading must refuse it."""


def _save_safetensors(model, path):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _random_init_notices(records):
    return [r for r in records
            if "No pretrained weights" in r.getMessage() or "initialized randomly" in r.getMessage()]


@pytest.fixture(scope="module")
def torchscript_archive(tmp_path_factory):
    """A tiny QuickGELU CLIP scripted once and saved as a TorchScript archive, as OpenAI's .pt files are."""
    src, _ = tiny(TEACHER, seed=4, quick_gelu=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
            scripted = torch.jit.script(copy.deepcopy(src))
    except Exception as e:  # pragma: no cover - depends on torch / open_clip scriptability
        pytest.skip(f"open_clip CLIP cannot be scripted with this torch: {e}")
    path = tmp_path_factory.mktemp("archive") / "ViT-tiny.pt"  # no 'openai' in the path
    scripted.save(str(path))
    return path, src.state_dict()


def test_tiny_models_build_randomly_initialised(images):
    t, tok = tiny(TEACHER, seed=0)
    s, _ = tiny(STUDENT, seed=0)
    t2, _ = tiny(TEACHER, seed=1)
    assert not t.training
    with torch.no_grad():
        assert t.encode_image(images).shape == (8, 64)
        assert s.encode_image(images).shape == (8, 48)
        assert t.encode_text(tok(CLASSES)).shape == (4, 64)
    assert t.visual.transformer.width == 96 and len(t.visual.transformer.resblocks) == 3
    assert s.visual.transformer.width == 64 and len(s.visual.transformer.resblocks) == 2
    assert not torch.equal(t.visual.conv1.weight, t2.visual.conv1.weight)
    assert tok.context_length == t.context_length == 32


def test_random_init_is_quiet(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    tiny(TEACHER)
    path = _save_safetensors(tiny(STUDENT)[0], tmp_path / "w.safetensors")
    create_clip(STUDENT, str(path))  # clipkd loads the weights right after open_clip builds the model
    assert _random_init_notices(caplog.records) == []
    # The filter lives only for the call: open_clip's own random build still says so.
    open_clip.create_model(STUDENT)
    assert len(_random_init_notices(caplog.records)) == 1


def test_quick_gelu_when_declared():
    assert not uses_quick_gelu(tiny(TEACHER)[0])
    model, _ = tiny(TEACHER, quick_gelu=True)
    assert uses_quick_gelu(model)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_quick_gelu_from_quickgelu_model_name(monkeypatch):
    assert open_clip.get_model_config("ViT-B-16-quickgelu")["quick_gelu"] is True  # open_clip's own names
    cfg = open_clip.get_model_config(TEACHER)
    cfg["quick_gelu"] = True
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, f"{TEACHER}-quickgelu", cfg)
    assert uses_quick_gelu(create_clip(f"{TEACHER}-quickgelu")[0])


def test_quick_gelu_from_config_keys():
    cfg = prompted_cfg()
    cfg.MODEL.STUDENT.TYPE = "ivlp"
    assert not uses_quick_gelu(build_teacher(cfg)) and not uses_quick_gelu(build_student(cfg))
    cfg.MODEL.TEACHER.QUICK_GELU = True
    cfg.MODEL.STUDENT.QUICK_GELU = True
    assert uses_quick_gelu(build_teacher(cfg)) and uses_quick_gelu(build_student(cfg))


@pytest.mark.parametrize("folder", ["not-openai-weights", "openai"])
def test_path_never_picks_quick_gelu(tmp_path, images, folder):
    src, tok = tiny(TEACHER, seed=3)
    path = _save_safetensors(src, tmp_path / folder / "open_clip_model.safetensors")
    torch.manual_seed(99)
    model, _ = create_clip(TEACHER, str(path))
    assert not uses_quick_gelu(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), src.encode_image(images))
    declared, _ = create_clip(TEACHER, str(path), quick_gelu=True)
    assert uses_quick_gelu(declared)
    assert torch.equal(declared.visual.conv1.weight, src.visual.conv1.weight)


def test_gelu_file_for_openai_architecture_warns(tmp_path, monkeypatch, caplog):
    path = _save_safetensors(tiny(TEACHER, seed=3)[0], tmp_path / "w.safetensors")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TEACHER, {"openai": {"hf_hub": "fake/tiny/"}})
    caplog.set_level(logging.WARNING, logger="clipkd.models.factory")
    model, _ = create_clip(TEACHER, str(path), config_key="MODEL.STUDENT.PRETRAINED")
    assert not uses_quick_gelu(model)
    [record] = [r for r in caplog.records if r.name == "clipkd.models.factory"]
    msg = record.getMessage()
    assert record.levelno == logging.WARNING
    assert str(path) in msg and "MODEL.STUDENT.QUICK_GELU" in msg and f"{TEACHER}-quickgelu" in msg
    caplog.clear()
    assert uses_quick_gelu(create_clip(TEACHER, str(path), quick_gelu=True)[0])
    assert [r for r in caplog.records if r.name == "clipkd.models.factory"] == []


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "bin_wrapped"])
def test_local_weights_file_roundtrip(tmp_path, images, fmt):
    src, tok = tiny(TEACHER, seed=3)
    sd = src.state_dict()
    if fmt == "safetensors":
        path = _save_safetensors(src, tmp_path / "w.safetensors")
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    else:
        path = tmp_path / "w.bin"
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 1}, path)
    torch.manual_seed(99)  # a different random init that the file must overwrite
    model, _ = create_clip(TEACHER, str(path))
    assert not uses_quick_gelu(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), src.encode_image(images))
        assert torch.equal(model.encode_text(tok(CLASSES)), src.encode_text(tok(CLASSES)))


def test_torchscript_archive_is_loaded_with_quick_gelu(torchscript_archive):
    path, ref = torchscript_archive
    model, _ = create_clip(TEACHER, str(path))  # detection comes from the archive itself, not its path
    assert uses_quick_gelu(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with pytest.raises(ModelError, match=r"ViT-tiny\.pt does not fit the model clipkd-tiny-student: unexpected "
                                         r"keys: visual\.transformer\.resblocks\.2\..*MODEL\.STUDENT\.NAME"):
        create_clip(STUDENT, str(path), config_key="MODEL.STUDENT.PRETRAINED")


def test_openai_tag_forces_quick_gelu(tmp_path, monkeypatch):
    src, _ = tiny(TEACHER, seed=5)
    path = _save_safetensors(src, tmp_path / "open_clip_model.safetensors")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TEACHER, {"openai": {"hf_hub": "fake/tiny/"}})
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", lambda *a, **k: str(path))
    model, _ = create_clip(TEACHER, "openai", quick_gelu=False)
    assert uses_quick_gelu(model)
    assert torch.equal(model.visual.conv1.weight, src.visual.conv1.weight)


def test_missing_and_bad_weights_files(tmp_path):
    missing = tmp_path / "nope" / "ViT-B-16.pt"
    with pytest.raises(ModelError, match="not found.*nope"):
        create_clip(TEACHER, str(missing))
    with pytest.raises(ModelError, match="is a folder"):
        create_clip(TEACHER, str(tmp_path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        create_clip(TEACHER, str(junk))
    student, _ = tiny(STUDENT)
    wrong = tmp_path / "student.pt"
    torch.save(student.state_dict(), wrong)
    with pytest.raises(ModelError, match=r"student.pt does not fit the model.*shape.*clipkd-tiny-teacher") as err:
        create_clip(TEACHER, str(wrong))
    msg = str(err.value)
    assert "missing keys: visual.transformer.resblocks.2." in msg and "MODEL.TEACHER.NAME" in msg
    assert "tensor 'visual.class_embedding' has shape (64,) in the file but the model expects (96,)" in msg
    teacher_sd = tiny(TEACHER)[0].state_dict()
    short = tmp_path / "short.pt"
    torch.save({k: v for k, v in teacher_sd.items() if k != "logit_scale"}, short)
    with pytest.raises(ModelError, match=r"short.pt does not fit the model.*missing keys: logit_scale"):
        create_clip(TEACHER, str(short))
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": teacher_sd, "optimizer": _Pickled()}, pickled)
    with pytest.raises(ModelError, match=r"pickled.pt is not a plain state dict.*weights_only=False"):
        create_clip(TEACHER, str(pickled))
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(ModelError, match=r"empty.pt holds no state dict.*epoch"):
        create_clip(TEACHER, str(empty))
    with pytest.raises(ModelError, match="neither a pretrained tag"):
        create_clip(TEACHER, "laion2b")
    with pytest.raises(ModelError, match="unknown model architecture"):
        create_clip("ViT-B-17")


def test_offline_tag_names_the_cache(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", no_network)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as err:
        create_clip("ViT-B/16", "openai", config_key="MODEL.STUDENT.PRETRAINED")
    msg = str(err.value)
    assert str(tmp_path / "hf" / "hub") in msg
    assert "HF_HUB_OFFLINE=1" in msg and "HF_HOME" in msg
    assert "MODEL.STUDENT.PRETRAINED /path/to/file" in msg


def test_image_size():
    assert image_size(tiny(TEACHER)[0]) == (32, 32)
    assert image_size(SimpleNamespace(visual=SimpleNamespace(image_size=224))) == (224, 224)  # ModifiedResNet
    assert image_size(SimpleNamespace(visual=SimpleNamespace(image_size=(224, 336)))) == (224, 336)
    with pytest.raises(ModelError, match="input size"):
        image_size(SimpleNamespace(visual=SimpleNamespace()))


# ------------------------------------------------------------------------------------------------ prompts


def test_no_prompts_is_exactly_open_clip(images):
    model, tok = tiny(TEACHER)
    ids = tok(CLASSES)
    with torch.no_grad():
        for n_ctx, depth in [(0, 0), (4, 0), (0, 3)]:
            vis = PromptedVisionEncoder(model.visual, n_ctx, depth)
            txt = PromptedTextEncoder(model, tok, n_ctx, depth)
            assert vis.VPT is None and len(vis.VPT_shallow) == 0 and txt.ctx is None
            assert torch.equal(vis(images), model.encode_image(images))
            assert torch.equal(txt(ids), model.encode_text(ids))
            assert ivlp_state_dict(vis) == {} and ivlp_state_dict(txt) == {}


def _block_inputs(blocks):
    seen = {}
    handles = [b.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
               for i, b in enumerate(blocks)]
    return seen, handles


def test_vision_prompt_placement(images):
    model, _ = tiny(TEACHER)
    n, depth = 3, 2
    vis = PromptedVisionEncoder(model.visual, n, depth)
    blocks = model.visual.transformer.resblocks
    seen, handles = _block_inputs(blocks)
    with torch.no_grad():
        out = vis(images)
        tokens = vis.tokens(images)
    for h in handles:
        h.remove()
    grid = (32 // 8) ** 2
    assert tokens.shape == (8, 1 + grid + n, 96)
    assert all(x.shape[1] == 1 + grid + n for x in seen.values())
    # block 0: VPT appended without positional embedding, then ln_pre over all tokens
    assert torch.allclose(seen[0][:, -n:], model.visual.ln_pre(vis.VPT).expand(8, -1, -1), atol=1e-6)
    # block 1 (< depth): its own prompt replaces the last n tokens; block 2 (>= depth): carried over
    assert torch.equal(seen[1][:, -n:], vis.VPT_shallow["1"].detach().expand(8, -1, -1))
    assert not torch.equal(seen[2][:, -n:], seen[1][:, -n:])
    with torch.no_grad():
        assert not torch.allclose(out, model.encode_image(images))


def test_text_prompt_placement():
    model, tok = tiny(TEACHER)
    n, depth = 4, 3
    txt = PromptedTextEncoder(model, tok, n, depth, ctx_init="")
    assert txt.class_prompts(["cat"]) == ["X X X X cat."]
    seen, handles = _block_inputs(model.transformer.resblocks)
    ids = txt.tokenize(txt.class_prompts(CLASSES))
    with torch.no_grad():
        out = txt(ids)
    for h in handles:
        h.remove()
    pos = model.positional_embedding[1 : 1 + n]
    assert torch.allclose(seen[0][:, 1 : 1 + n], (txt.ctx + pos).expand(4, -1, -1), atol=1e-6)
    for i in (1, 2):
        assert torch.equal(seen[i][:, 1 : 1 + n], txt.VPT_shallow[str(i)].detach().expand(4, -1, -1))
    # tokens outside 1..n are the class-name tokens, untouched by the replacement
    emb = model.token_embedding(ids) + model.positional_embedding
    assert torch.allclose(seen[0][:, 1 + n :], emb[:, 1 + n :], atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(out, model.encode_text(ids))


def test_ctx_init_phrase_reproduces_zero_shot_at_depth_one():
    model, tok = tiny(TEACHER)
    txt = PromptedTextEncoder(model, tok, 4, 1, ctx_init="a photo of a")
    assert txt.class_prompts(["cat"]) == ["a photo of a cat."]
    with torch.no_grad():
        ref = model.encode_text(tok([f"a photo of a {c}." for c in CLASSES]))
        assert torch.equal(txt.encode(txt.class_prompts(CLASSES)), ref)
        # 2 learnable tokens from a 4-word phrase (IVLP / PromptSRC / MaPLe): "[a] [photo] of a cat.", still zero-shot
        two = PromptedTextEncoder(model, tok, 2, 1, ctx_init="a photo of a")
        assert two.class_prompts(["cat"]) == ["a photo of a cat."] and two.ctx.shape[0] == 2
        assert torch.equal(two.encode(two.class_prompts(CLASSES)), ref)
    with pytest.raises(ConfigError, match="CTX_INIT 'a photo of a' is 4 tokens long, fewer than .*N_CTX_TEXT 5"):
        PromptedTextEncoder(model, tok, 5, 1, ctx_init="a photo of a")
    with pytest.raises(ConfigError, match="DEPTH_VISION to at most 3"):
        PromptedVisionEncoder(model.visual, 4, 9)


def _ivlp(seed=0, name=TEACHER, n_text=4, n_vis=2, depth_text=3, depth_vision=2, ctx_init="a photo of a"):
    model, tok = tiny(name, seed=seed)
    torch.manual_seed(seed + 100)
    return IVLPStudent(model, tok, n_ctx_text=n_text, n_ctx_vision=n_vis, depth_text=depth_text,
                       depth_vision=depth_vision, ctx_init=ctx_init)


def test_ivlp_keys_are_promptsrc_names():
    s = _ivlp(depth_text=3, depth_vision=2)
    assert set(ivlp_state_dict(s)) == {
        "prompt_learner.ctx",
        "image_encoder.VPT",
        "image_encoder.transformer.resblocks.1.VPT_shallow",
        "text_encoder.transformer.resblocks.1.VPT_shallow",
        "text_encoder.transformer.resblocks.2.VPT_shallow",
    }
    assert ivlp_state_dict(s)["prompt_learner.ctx"].shape == (4, 64)
    assert ivlp_state_dict(s)["image_encoder.VPT"].shape == (2, 96)
    assert set(s.trainable_state_dict()) == set(ivlp_state_dict(s))


def test_load_ivlp_state_dict_is_strict():
    a, b = _ivlp(seed=0), _ivlp(seed=1)
    sd = ivlp_state_dict(a)
    full = dict(sd)
    full["prompt_learner.token_prefix"] = torch.zeros(4, 1, 64)
    full["prompt_learner.token_suffix"] = torch.zeros(4, 27, 64)
    full["image_encoder.conv1.weight"] = torch.zeros(1)  # frozen CLIP weights a Dassl checkpoint carries
    full["prompt_learner.ZS_image_encoder.proj"] = torch.zeros(1)
    full["logit_scale"] = torch.zeros(())
    load_ivlp_state_dict(b, full)
    for k, v in ivlp_state_dict(b).items():
        assert torch.equal(v, sd[k])

    missing = {k: v for k, v in sd.items() if k != "image_encoder.VPT"}
    with pytest.raises(ModelError, match=r"missing keys: image_encoder\.VPT"):
        load_ivlp_state_dict(b, missing)
    extra = dict(sd, **{"text_encoder.transformer.resblocks.7.VPT_shallow": torch.zeros(4, 64)})
    with pytest.raises(ModelError, match=r"unexpected keys: text_encoder\.transformer\.resblocks\.7\.VPT_shallow"):
        load_ivlp_state_dict(b, extra)
    bad = dict(sd, **{"prompt_learner.ctx": torch.zeros(4, 768)})
    with pytest.raises(ModelError, match=r"'prompt_learner\.ctx' has shape \(4, 768\).*expects \(4, 64\)"):
        load_ivlp_state_dict(b, bad)
    with pytest.raises(ModelError, match="unexpected keys: image_encoder.conv1.weight"):
        load_ivlp_state_dict(b, full, ignore_frozen_clip_weights=False)


# ------------------------------------------------------------------------------------------------ teacher


def test_teacher_text_features_cached_and_frozen(images):
    model, tok = tiny(TEACHER)
    teacher = Teacher(model, tok, templates=("a photo of a {}, a type of pet.",))
    calls = []
    real_forward = teacher.text_encoder.forward
    teacher.text_encoder.forward = lambda ids: (calls.append(ids.shape[0]), real_forward(ids))[1]
    f1 = teacher.text_features(CLASSES)
    f2 = teacher.text_features(list(CLASSES))
    assert f1 is f2 and calls == [4]
    assert f1.shape == (4, 64) and torch.allclose(f1.norm(dim=-1), torch.ones(4))
    teacher.text_features(CLASSES[:2])
    assert calls == [4, 2]
    with torch.no_grad():
        ref = model.encode_text(tok([f"a photo of a {c}, a type of pet." for c in CLASSES]))
    assert torch.allclose(f1, ref / ref.norm(dim=-1, keepdim=True), atol=1e-6)

    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    x = images.clone().requires_grad_(True)
    feats = teacher.image_features(x)
    assert not feats.requires_grad and torch.allclose(feats.norm(dim=-1), torch.ones(8))
    assert teacher.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert Teacher(model, tok).logit_scale == 100.0


def test_teacher_template_ensemble():
    model, tok = tiny(TEACHER)
    templates = ("a photo of a {}.", "a sketch of a {}.", lambda c: f"itap of a {c}.")
    teacher = Teacher(model, tok, templates=templates)
    assert teacher.mode == "ensemble"
    with torch.no_grad():
        per = []
        for t in ("a photo of a {}.", "a sketch of a {}.", "itap of a {}."):
            f = model.encode_text(tok([t.format(c) for c in CLASSES]))
            per.append(f / f.norm(dim=-1, keepdim=True))
        ref = torch.stack(per).mean(0)
        ref = ref / ref.norm(dim=-1, keepdim=True)
    assert torch.allclose(teacher.text_features(CLASSES), ref, atol=1e-6)

    cfg = prompted_cfg()
    cfg.MODEL.TEACHER.TEMPLATES = "ensemble"
    ens = build_teacher(cfg)
    assert len(ens.templates) == 80 and ens.text_features(CLASSES[:2]).shape == (2, 64)
    cfg.MODEL.TEACHER.TEMPLATES = "dataset"
    assert build_teacher(cfg).templates == ("a photo of a {}, a type of pet.",)


def test_prompted_teacher_from_ivlp_checkpoint(tmp_path, images):
    ivlp = _ivlp(seed=0, depth_text=3, depth_vision=3).eval()
    weights = tmp_path / "tiny-teacher.pt"
    # the teacher needs the same CLIP weights: rebuild them from seed 0 and save as its PRETRAINED file
    base, _ = tiny(TEACHER, seed=0)
    torch.save(base.state_dict(), weights)
    ckpt = tmp_path / "model-best.pth.tar"
    torch.save({"state_dict": ivlp.trainable_state_dict(), "epoch": 20}, ckpt)

    cfg = prompted_cfg()
    cfg.MODEL.TEACHER.PRETRAINED = str(weights)
    cfg.MODEL.TEACHER.CHECKPOINT = str(ckpt)
    teacher = build_teacher(cfg)
    assert teacher.mode == "prompted"
    assert teacher.text_encoder.n_ctx == 4 and teacher.text_encoder.depth == 3
    assert teacher.image_encoder.n_ctx == 2 and teacher.image_encoder.depth == 3
    with torch.no_grad():
        assert torch.equal(teacher.text_features(CLASSES), ivlp.text_features(CLASSES))
        assert torch.equal(teacher.image_features(images), ivlp.image_features(images))
    assert set(read_prompt_checkpoint(ckpt)) == set(ivlp_state_dict(ivlp))

    cfg.MODEL.TEACHER.CHECKPOINT = str(tmp_path / "missing.pth.tar")
    with pytest.raises(ModelError, match="missing.pth.tar"):
        build_teacher(cfg)


class _DasslWarmupScheduler:
    """Stands for a Dassl scheduler class, pickled into a checkpoint and not importable when loading."""

    def __init__(self):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        self.successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)


def test_teacher_loads_a_dassl_style_full_checkpoint(tmp_path, monkeypatch):
    import sys
    import types

    ivlp = _ivlp(seed=0, depth_text=2, depth_vision=2).eval()
    sd = dict(ivlp.trainable_state_dict())
    # Dassl saves the whole CustomCLIP: frozen encoders, PromptSRC's frozen zero-shot copy, class buffers
    sd.update({"image_encoder.conv1.weight": torch.zeros(96, 3, 8, 8), "text_encoder.positional_embedding":
               torch.zeros(32, 64), "prompt_learner.ZS_image_encoder.proj": torch.zeros(96, 64),
               "logit_scale": torch.zeros(()), "prompt_learner.token_prefix": torch.zeros(3, 1, 64),
               "prompt_learner.token_suffix": torch.zeros(3, 27, 64)})
    fake = types.ModuleType("fake_dassl_lr")
    monkeypatch.setitem(sys.modules, "fake_dassl_lr", fake)
    monkeypatch.setattr(_DasslWarmupScheduler, "__module__", "fake_dassl_lr")
    fake._DasslWarmupScheduler = _DasslWarmupScheduler
    ckpt = tmp_path / "model-best.pth.tar"
    torch.save({"state_dict": sd, "epoch": 20, "scheduler": {"warmup": _DasslWarmupScheduler()},
                "val_result": None}, ckpt)
    monkeypatch.delitem(sys.modules, "fake_dassl_lr")
    with pytest.raises(pickle.UnpicklingError):  # what plain weights_only loading makes of it
        torch.load(ckpt, weights_only=True)

    loaded = read_prompt_checkpoint(ckpt)
    assert torch.equal(loaded["prompt_learner.ctx"], sd["prompt_learner.ctx"])
    base, tok = tiny(TEACHER, seed=0)
    teacher = Teacher(base, tok, prompts=loaded)
    with torch.no_grad():
        assert torch.equal(teacher.text_features(CLASSES), ivlp.text_features(CLASSES))


# ------------------------------------------------------------------------------------------------ students


def _frozen_snapshot(model):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trainable}


def _kd_steps(student, teacher, images, steps=3):
    opt = torch.optim.SGD(student.trainable_parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    student.train()
    t_logits = teacher.logit_scale * teacher.image_features(images) @ teacher.text_features(CLASSES).t()
    for _ in range(steps):
        s_logits = student.logit_scale * student.image_features(images) @ student.text_features(CLASSES).t()
        loss = torch.nn.functional.kl_div(s_logits.log_softmax(-1), t_logits.softmax(-1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_promptkd_student_trains_only_prompts_and_projector(images):
    cfg = prompted_cfg(n_ctx_vision=2, depth_vision=2)
    teacher = build_teacher(cfg)
    torch.manual_seed(7)
    student = build_student(cfg, teacher)
    assert isinstance(student, PromptKDStudent)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names == {"image_encoder.VPT", "image_encoder.VPT_shallow.1", "projector.layers.0.weight",
                     "projector.layers.0.bias", "projector.layers.1.weight", "projector.layers.1.bias",
                     "projector.layers.3.weight", "projector.layers.3.bias"}
    assert not any("token_embedding" in n or n.startswith("text") for n, _ in student.named_parameters())
    assert student.text_features(CLASSES) is teacher.text_features(CLASSES)
    twin = copy.deepcopy(student)  # shares the teacher instead of copying it
    assert twin.text_features(CLASSES) is teacher.text_features(CLASSES)
    assert twin.image_encoder.VPT is not student.image_encoder.VPT
    assert torch.equal(twin.image_encoder.VPT, student.image_encoder.VPT)
    assert student.image_features(images).shape == (8, teacher.embed_dim)

    frozen = _frozen_snapshot(student)
    before = {k: v.clone() for k, v in student.trainable_state_dict().items()}
    _kd_steps(student, teacher, images)
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    after = student.trainable_state_dict()
    for k in ("image_encoder.VPT", "image_encoder.transformer.resblocks.1.VPT_shallow",
              "VPT_image_trans.conv1.0.weight", "VPT_image_trans.conv1.1.running_mean"):
        assert not torch.equal(after[k], before[k]), k

    student.train()
    assert student.training and student.projector.training
    assert not any(m.training for m in student.image_encoder.visual.modules())
    student.eval()
    assert not student.projector.training

    torch.manual_seed(7)  # same frozen CLIP; different prompts / projector until loaded
    clone = build_student(cfg, teacher)
    assert not torch.equal(clone.image_encoder.VPT, student.image_encoder.VPT)
    clone.load_trainable_state_dict(student.trainable_state_dict())
    clone.eval()
    with torch.no_grad():
        assert torch.equal(clone.image_features(images), student.image_features(images))
    bad = dict(student.trainable_state_dict())
    bad["VPT_image_trans.conv1.3.weight"] = torch.zeros(10, 48, 1, 1)
    with pytest.raises(ModelError, match=r"'VPT_image_trans\.conv1\.3\.weight' has shape \(10, 48, 1, 1\)"):
        clone.load_trainable_state_dict(bad)


def test_ivlp_student_trains_only_prompts(images):
    cfg = prompted_cfg(n_ctx_vision=2, depth_vision=2, n_ctx_text=4, depth_text=2)
    cfg.MODEL.STUDENT.TYPE = "ivlp"
    teacher = build_teacher(cfg)
    student = build_student(cfg, teacher)
    assert isinstance(student, IVLPStudent)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names == {"image_encoder.VPT", "image_encoder.VPT_shallow.1", "text_encoder.ctx",
                     "text_encoder.VPT_shallow.1"}
    frozen = _frozen_snapshot(student)
    before = {k: v.clone() for k, v in student.trainable_state_dict().items()}
    _kd_steps(student, teacher, images)
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    for k, v in student.trainable_state_dict().items():
        assert not torch.equal(v, before[k]), k
    assert not any(m.training for m in student.text_encoder.transformer.modules())


def test_ivlp_text_cache_in_eval_only():
    s = _ivlp()
    calls = []
    real_forward = s.text_encoder.forward
    s.text_encoder.forward = lambda ids: (calls.append(1), real_forward(ids))[1]
    s.train()
    s.text_features(CLASSES)
    s.text_features(CLASSES)
    assert len(calls) == 2  # training: always recomputed (differentiable)
    s.eval()
    with torch.no_grad():
        a = s.text_features(CLASSES)
        b = s.text_features(CLASSES)
    assert a is b and len(calls) == 3
    with torch.no_grad():
        s.text_encoder.ctx.add_(0.1)  # an in-place update, as an optimizer step makes
        c = s.text_features(CLASSES)
    assert len(calls) == 4 and not torch.equal(a, c)
    assert s.text_features(CLASSES).requires_grad  # grad enabled: fresh and differentiable


def test_builders_reject_bad_types():
    cfg = prompted_cfg()
    cfg.MODEL.STUDENT.TYPE = "no_such_student"
    with pytest.raises(ConfigError, match="MODEL.STUDENT.TYPE"):
        build_student(cfg, None)
    cfg.MODEL.STUDENT.TYPE = "promptkd"
    with pytest.raises(ConfigError, match="needs the teacher"):
        build_student(cfg, None)


def test_projector_size_matches_promptkd():
    proj = Projector(512, 768)  # ViT-B/16 -> ViT-L/14
    vpt = 4 * 768 * 9  # 4 visual prompt tokens at depth 9, width 768
    n = sum(p.numel() for p in proj.parameters()) + vpt
    assert 1.00e6 < n < 1.02e6
