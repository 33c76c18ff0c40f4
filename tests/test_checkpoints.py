"""Reading PromptKD / PromptSRC checkpoints as released: teacher files (file, VLPromptLearner folder, PromptKD's
teacher_model root), student files through ``clipkd eval --checkpoint``, and clipkd's own files under PromptKD's
names. The files are built here the way Dassl writes them, at tiny sizes: ``torch.save({"state_dict", "epoch",
"optimizer", "scheduler", "val_result"})`` after one SGD-with-momentum step, with the warm-up scheduler's state
holding a pickled CosineAnnealingLR (which holds the optimizer), fp16 prompts, frozen CLIP weights and the
class-dependent buffers."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from clipkd.cli.main import main
from clipkd.engine.checkpoint import save_checkpoint
from clipkd.runs.run import Run
from clipkd.errors import ModelError
from clipkd.models.state import _load_tolerant, read_prompt_checkpoint
from clipkd.models.teacher import build_teacher
from test_train import DATASET_CFG, ROOT, TINY, config

METHOD_CFG = str(ROOT / "configs" / "methods" / "abkd_promptkd.yaml")
CLASSES = ["cat", "dog", "annual crop land"]
FAKE_MODULE = "fake_dassl_lr"  # where the warm-up scheduler class claims to live when pickled
# The tiny teachers run on a random-init CLIP (no PRETRAINED), which build_teacher warns about.
pytestmark = pytest.mark.filterwarnings("ignore:MODEL.TEACHER.CHECKPOINT is set")


class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Stands for Dassl's warm-up scheduler: a constant lr for ``warmup_epoch`` epochs, then ``successor``.

    Its state (what Dassl saves under "scheduler") holds the successor, a whole CosineAnnealingLR object that
    holds the optimizer. Unpickling an instance must never run it: ``__setstate__`` raises.
    """

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.cons_lr = cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def __setstate__(self, state):
        raise AssertionError("the checkpoint loader ran a pickled class")


def _module_with(tensors: dict[str, torch.Tensor], trainable: set[str]) -> nn.Module:
    """A module whose state_dict has exactly these keys (parameters for ``trainable``, buffers otherwise)."""
    root = nn.Module()
    for key, value in tensors.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        if key in trainable:
            mod.register_parameter(leaf, nn.Parameter(value.clone()))
        else:
            mod.register_buffer(leaf, value.clone())
    return root


def dassl_save(path, tensors: dict[str, torch.Tensor], trainable: set[str], *, scheduler_object: bool = False):
    """Write ``tensors`` as Dassl does after an epoch; returns the state dict as saved (after the SGD step).

    ``scheduler_object`` pickles the scheduler object itself (a class of this test module, by reference) instead
    of its state dict, for the test that the loader never imports or runs such a class."""
    model = _module_with(tensors, trainable)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=5e-4)
    sched = ConstantWarmupScheduler(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20), 1, 1e-5)
    (1000 * sum((p.float() ** 2).sum() for p in params)).backward()  # visible at the warm-up lr in fp16
    opt.step()
    sched.step()
    assert opt.state_dict()["state"][0]["momentum_buffer"] is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 20, "optimizer": opt.state_dict(),
                "scheduler": sched if scheduler_object else sched.state_dict(), "val_result": 0.9}, path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def teacher_tensors(seed: int = 0, ctx_width: int = 64) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A PromptKD teacher's state dict for the tiny teacher (n_ctx 4 text / 2 vision, depth 2): fp16 prompts,
    some frozen CLIP weights, PromptSRC's frozen zero-shot copy and PromptKD's four class buffers."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    prompts = {"prompt_learner.ctx": r(4, ctx_width), "image_encoder.VPT": r(2, 96),
               "image_encoder.transformer.resblocks.1.VPT_shallow": r(2, 96),
               "text_encoder.transformer.resblocks.1.VPT_shallow": r(4, 64)}
    frozen = {"image_encoder.conv1.weight": r(96, 3, 8, 8), "image_encoder.class_embedding": r(96),
              "text_encoder.positional_embedding": r(32, 64), "logit_scale": torch.tensor(4.6),
              "prompt_learner.ZS_image_encoder.proj": r(96, 64),
              "prompt_learner.token_prefix": r(2, 1, 64), "prompt_learner.token_suffix": r(2, 27, 64),
              "prompt_learner.token_prefix2": r(1, 1, 64), "prompt_learner.token_suffix2": r(1, 27, 64)}
    return {**prompts, **frozen}, set(prompts)


def teacher_cfg(root, checkpoint):
    return config(root, "abkd_promptkd", "MODEL.TEACHER.CHECKPOINT", str(checkpoint))


def teacher_outputs(cfg, images):
    torch.manual_seed(0)  # the same random-init CLIP for every teacher
    teacher = build_teacher(cfg)
    assert teacher.mode == "prompted"
    with torch.no_grad():
        return teacher.text_features(CLASSES), teacher.image_features(images)


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ teachers


def test_dassl_teacher_file_loads_in_every_form(tmp_path, images):
    tensors, trainable = teacher_tensors()
    root = tmp_path / "teacher_model"
    file = root / "OxfordPets" / "VLPromptLearner" / "model-best.pth.tar"
    saved = dassl_save(file, tensors, trainable)
    with pytest.raises(pickle.UnpicklingError):  # what plain weights_only loading makes of it
        torch.load(file, weights_only=True)

    prompts = {k: saved[k] for k in trainable}
    assert prompts["prompt_learner.ctx"].dtype == torch.float16
    assert not torch.equal(prompts["prompt_learner.ctx"], tensors["prompt_learner.ctx"])  # SGD stepped
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": prompts}, plain)
    text, image = teacher_outputs(teacher_cfg(tmp_path, plain), images)

    loaded = read_prompt_checkpoint(file)
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded["prompt_learner.ctx"], prompts["prompt_learner.ctx"])

    # Dassl epoch files only (no model-best): the highest epoch; a clipkd run folder: its model.pt
    epochs = tmp_path / "epochs" / "VLPromptLearner"
    dassl_save(epochs / "model.pth.tar-5", teacher_tensors(seed=5)[0], trainable)
    (epochs / "model.pth.tar-20").write_bytes(file.read_bytes())
    run_dir = tmp_path / "ivlp_run"
    save_checkpoint(run_dir / "model.pt", prompts, epoch=20, student_type="ivlp")

    forms = [file, file.parent, root, epochs, epochs.parent, run_dir]
    for form in forms:
        t, i = teacher_outputs(teacher_cfg(tmp_path, form), images)
        assert torch.equal(t, text) and torch.equal(i, image), form

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"holds no checkpoint.*model-best\.pth\.tar.*OxfordPets/VLPromptLearner"):
        build_teacher(teacher_cfg(tmp_path, empty))


def test_loader_never_imports_or_runs_pickled_classes(tmp_path, monkeypatch):
    tensors, trainable = teacher_tensors()
    fake = types.ModuleType(FAKE_MODULE)
    fake.ConstantWarmupScheduler = ConstantWarmupScheduler
    monkeypatch.setitem(sys.modules, FAKE_MODULE, fake)
    monkeypatch.setattr(ConstantWarmupScheduler, "__module__", FAKE_MODULE)
    file = tmp_path / "model.pth.tar-20"
    saved = dassl_save(file, tensors, trainable, scheduler_object=True)
    assert f"{FAKE_MODULE}.ConstantWarmupScheduler" in torch.serialization.get_unsafe_globals_in_checkpoint(file)

    # From here on, importing the class's module is recorded and refused.
    monkeypatch.delitem(sys.modules, FAKE_MODULE)
    asked = []

    class RefuseImport:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] == FAKE_MODULE:
                asked.append(name)
                raise ImportError(f"{name} must not be imported")
            return None

    monkeypatch.setattr(sys, "meta_path", [RefuseImport, *sys.meta_path])
    whole = _load_tolerant(file)
    assert asked == []
    sched = whole["scheduler"]
    assert not isinstance(sched, ConstantWarmupScheduler) and repr(sched).startswith("<not loaded: fake_dassl_lr.")
    successor = sched._state["successor"]  # what the stand-in was given, never interpreted
    assert not isinstance(successor, torch.optim.lr_scheduler.LRScheduler)
    assert repr(successor) == "<not loaded: torch.optim.lr_scheduler.CosineAnnealingLR>"
    optimizer = successor._state["optimizer"]
    assert not isinstance(optimizer, torch.optim.Optimizer)
    assert type(optimizer._state["state"]) is dict  # the momentum state's defaultdict, read as a plain dict
    assert whole["optimizer"]["state"][0]["momentum_buffer"].shape == (4, 64)

    loaded = read_prompt_checkpoint(file)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    # A file that would run a command when unpickled in full only yields an inert stand-in.
    marker = tmp_path / "ran"

    class RunsCommand:
        def __reduce__(self):
            return subprocess.check_call, (["touch", str(marker)],)

    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"prompt_learner.ctx": torch.zeros(4, 64)}, "extra": RunsCommand()}, evil)
    assert set(read_prompt_checkpoint(evil)) == {"prompt_learner.ctx"}
    assert not marker.exists()


def test_teacher_prompt_mismatch_is_named(tmp_path):
    tensors, trainable = teacher_tensors(ctx_width=768)  # trained for another text width
    file = tmp_path / "model-best.pth.tar"
    dassl_save(file, tensors, trainable)
    with pytest.raises(ModelError, match=r"'prompt_learner\.ctx' has shape \(4, 768\) in checkpoint .*model-best"
                                         r"\.pth\.tar but the model expects \(4, 64\)"):
        build_teacher(teacher_cfg(tmp_path, file))
    # token_prefix2/suffix2 (PromptKD's modules) are dropped; a prompt missing below the deepest one is named
    tensors, trainable = teacher_tensors()
    gap = "text_encoder.transformer.resblocks.{}.VPT_shallow"
    tensors[gap.format(2)] = tensors.pop(gap.format(1))
    dassl_save(file, tensors, (trainable - {gap.format(1)}) | {gap.format(2)})
    with pytest.raises(ModelError, match=r"missing keys: text_encoder\.transformer\.resblocks\.1\.VPT_shallow") as e:
        build_teacher(teacher_cfg(tmp_path, file))
    assert "token_prefix2" not in str(e.value)
    with pytest.raises(ModelError, match="not found"):
        build_teacher(teacher_cfg(tmp_path, tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ students


def promptkd_student_file(student, seed: int = 3) -> tuple[dict[str, torch.Tensor], set[str]]:
    """What PromptKD's student saves, for this student's sizes: its frozen CLIP image tower under
    ``image_encoder.``, fp16 prompts, the projector as VPT_image_trans.conv1.* (convs fp16, as PromptKD's
    convert_weights leaves them; BatchNorm fp32 with running stats) and logit_scale."""
    g = torch.Generator().manual_seed(seed)
    out = {f"image_encoder.{k}": v.clone() for k, v in student.image_encoder.visual.state_dict().items()}
    out["logit_scale"] = torch.tensor(4.6)
    trainable = set()
    for key, value in student.trainable_state_dict().items():
        if not value.is_floating_point():
            out[key] = torch.tensor(7)
            continue
        v = torch.randn(value.shape, generator=g) * 0.1
        if key.endswith("running_var"):
            v = v.abs() + 0.5
        half = "VPT" in key.split(".")[-1] or key.endswith(("0.weight", "0.bias", "3.weight", "3.bias"))
        out[key] = v.half() if half else v
        if "running" not in key:
            trainable.add(key)
    return out, trainable


def test_promptkd_student_file_evaluates_like_model_pt(synth_root, tmp_path, capsys, images):
    cfg = config(synth_root)
    run = Run(cfg)
    run.build()
    student = run.student
    names = set(student.trainable_state_dict())
    assert {"VPT_image_trans.conv1.0.weight", "VPT_image_trans.conv1.1.running_mean",
            "VPT_image_trans.conv1.1.num_batches_tracked", "VPT_image_trans.conv1.3.bias"} <= names
    assert not any(k.startswith("projector") for k in names)

    tensors, trainable = promptkd_student_file(student)
    pk_dir = tmp_path / "promptkd_out"
    saved = dassl_save(pk_dir / "VLPromptLearner" / "model-best.pth.tar", tensors, trainable)
    # the same tensors as clipkd's own run folder (fp32, clipkd's names = PromptKD's names)
    run_dir = tmp_path / "clipkd_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(cfg.dump())
    save_checkpoint(run_dir / "model.pt", {k: saved[k].float() if saved[k].is_floating_point() else saved[k]
                                           for k in names}, epoch=2, student_type="promptkd")

    out_dir = tmp_path / "eval_out"
    assert main(["eval", "--checkpoint", str(pk_dir), "--root", str(synth_root), "--dataset-config", DATASET_CFG,
                 "--config", METHOD_CFG, "--output-dir", str(out_dir), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "base: accuracy" in printed and "new: accuracy" in printed and "HM:" in printed
    from_file = json.loads((out_dir / "results.json").read_text())
    assert main(["eval", "--run", str(run_dir), "--output", str(tmp_path / "run.json")]) == 0
    from_run = json.loads((tmp_path / "run.json").read_text())
    for half in ("base", "new", "hm"):
        assert from_file[half] == from_run[half], half

    a = Run(cfg).load_student_file(pk_dir / "VLPromptLearner" / "model-best.pth.tar").eval()
    b = Run.load(run_dir).model("final").eval()
    with torch.no_grad():
        assert torch.equal(a.image_features(images), b.image_features(images))

    assert main(["eval", "--checkpoint", str(pk_dir), "--run", str(run_dir)]) == 2
    assert "give one of --run DIR, --checkpoint FILE or --zero-shot" in capsys.readouterr().err


def test_student_file_problems_are_named_and_old_names_load(tmp_path):
    from clipkd.models import build_student

    cfg = config(tmp_path)
    teacher = build_teacher(cfg)
    student = build_student(cfg, teacher)
    tensors, _ = promptkd_student_file(student)

    # PromptKD's own loader is non-strict: a file without the projector leaves a random one. clipkd names it.
    no_projector = {k: v for k, v in tensors.items() if not k.startswith("VPT_image_trans.")}
    with pytest.raises(ModelError, match=r"missing keys: VPT_image_trans\.conv1\.0\.weight"):
        student.load_trainable_state_dict(no_projector, source="f.pth.tar", ignore_frozen_clip_weights=True)
    deeper = dict(tensors, **{"image_encoder.transformer.resblocks.4.VPT_shallow": torch.zeros(4, 64)})
    with pytest.raises(ModelError, match=r"unexpected keys: image_encoder\.transformer\.resblocks\.4\.VPT_shallow"
                                         r".*N_CTX_VISION 4 MODEL\.PROMPT\.DEPTH_VISION 5"):
        student.load_trainable_state_dict(deeper, source="f.pth.tar", ignore_frozen_clip_weights=True)
    wrong = dict(tensors, **{"VPT_image_trans.conv1.0.weight": torch.zeros(10, 48, 1, 1)})
    with pytest.raises(ModelError, match=r"'VPT_image_trans\.conv1\.0\.weight' has shape \(10, 48, 1, 1\) in f"
                                         r"\.pth\.tar but the model expects \(64, 48, 1, 1\)"):
        student.load_trainable_state_dict(wrong, source="f.pth.tar", ignore_frozen_clip_weights=True)
    with pytest.raises(ModelError, match=r"unexpected keys: image_encoder\."):  # strict by default
        student.load_trainable_state_dict(tensors)

    # clipkd files written before the rename (projector.layers.*) still load, into the same tensors
    new = {k: v.float() if v.is_floating_point() else v
           for k, v in tensors.items() if k in student.trainable_state_dict()}
    old = {k.replace("VPT_image_trans.conv1.", "projector.layers."): v for k, v in new.items()}
    assert any(k.startswith("projector.layers.") for k in old)
    old_file = tmp_path / "old-model.pt"
    save_checkpoint(old_file, old, epoch=2)
    from clipkd.engine.checkpoint import load_checkpoint

    student.load_trainable_state_dict(load_checkpoint(old_file)["state_dict"], source=str(old_file))
    assert all(torch.equal(v, new[k]) for k, v in student.trainable_state_dict().items())
    with pytest.raises(ModelError, match="holds both 'projector.layers.0.weight'"):
        student.load_trainable_state_dict({**new, **old})

    # a student file is not a teacher
    with pytest.raises(ModelError, match="holds a PromptKD student"):
        build_teacher(teacher_cfg(tmp_path, old_file))


@pytest.mark.parametrize("key", ["prompt_learner.ctx", "image_encoder.VPT",
                                 "text_encoder.transformer.resblocks.1.VPT_shallow"])
def test_teacher_file_with_a_non_tensor_prompt_is_a_model_error(tmp_path, key):
    """A non-tensor value inside ``state_dict`` (e.g. a list or a string where a prompt should be) is named as the
    key and what it holds, not a raw AttributeError from sizing the prompts (nothing is executed either way)."""
    tensors, trainable = teacher_tensors()
    file = tmp_path / "model-best.pth.tar"
    dassl_save(file, tensors, trainable)
    saved = torch.load(file, weights_only=False)
    saved["state_dict"][key] = [[0.0] * 4]  # plain containers load with weights_only; not a tensor
    torch.save(saved, file)
    with pytest.raises(ModelError, match=rf"model-best\.pth\.tar.*'{key}' is a list, not a tensor"):
        build_teacher(teacher_cfg(tmp_path, file))
    # a bare state dict with a string value, read by the student loader, is named the same way
    from clipkd.models import build_student

    cfg = config(tmp_path)
    student = build_student(cfg, build_teacher(cfg))
    state = dict(student.trainable_state_dict(), **{"image_encoder.VPT": "not a tensor"})
    with pytest.raises(ModelError, match=r"'image_encoder\.VPT' is a str, not a tensor"):
        student.load_trainable_state_dict(state, source="f.pth.tar")
