"""The distillation run end to end on synthetic data with the tiny CLIPs: train, eval, resume, selection,
frozen weights, and the run-time bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import clipkd.engine.trainer as train_mod
from clipkd.runs.run import Run
from clipkd.cli.main import main
from clipkd.config import build_config
from clipkd.engine.checkpoint import load_checkpoint
from clipkd.errors import ClipkdError, ModelError, TrainingError

ROOT = Path(__file__).resolve().parents[1]
DATASET_CFG = str(ROOT / "configs" / "datasets" / "oxford_pets.yaml")
TINY = [
    "MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
    "MODEL.TEACHER.CHECKPOINT", "zero-shot",
    "MODEL.STUDENT.NAME", "clipkd-tiny-student", "MODEL.STUDENT.PRETRAINED", "",
    "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2",
    "INPUT.SIZE", "(32, 32)", "DATASET.NUM_SHOTS", "4", "DATALOADER.NUM_WORKERS", "0",
    "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.01",
    "OPTIM.WARMUP_CONS_LR", "0.001",
]


def config(root, method="abkd_promptkd", *extra):
    return build_config(
        [DATASET_CFG, ROOT / "configs" / "methods" / f"{method}.yaml"],
        TINY + ["DATASET.ROOT", str(root), *extra],
    )


def fit(cfg, out, resume=False):
    return Run(cfg, out, echo=False).fit(resume=resume)


def interrupt_after_checkpoint(monkeypatch, epoch: int, inside: str = ""):
    """Make the run stop (as Ctrl-C would) right after writing ``last.pt`` for ``epoch`` (in a folder whose path
    contains ``inside``); returns a function that undoes it."""
    real_save = train_mod.save_checkpoint

    def save_then_stop(path, state_dict, **extra):
        real_save(path, state_dict, **extra)
        if inside in str(path) and str(path).endswith("last.pt") and extra.get("epoch") == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
    return lambda: monkeypatch.setattr(train_mod, "save_checkpoint", real_save)


def step_losses(run_dir) -> list[float]:
    """The loss of every training step a run logged."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "step"]


def check_resume_is_exact(cfg, tmp_path, monkeypatch, epoch: int = 1) -> dict:
    """A run stopped after ``epoch``'s checkpoint and resumed gives the uninterrupted run's results, step losses
    and final model (bit for bit); returns that model's state dict."""
    full = fit(cfg, tmp_path / "full")
    undo = interrupt_after_checkpoint(monkeypatch, epoch=epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "cut")
    undo()
    assert fit(cfg, tmp_path / "cut", resume=True) == full
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full") and step_losses(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    return a


def check_results(results: dict):
    assert set(results) >= {"base", "new", "hm"}
    for half, n in (("base", 32), ("new", 24)):  # 7 synthetic classes: 4 base, 3 new, 8 test images each
        assert results[half]["n"] == n
        assert 0 <= results[half]["accuracy"] <= 100 and 0 <= results[half]["macro_f1"] <= 100
    b, n = results["base"]["accuracy"], results["new"]["accuracy"]
    assert results["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)


@pytest.mark.parametrize("student", ["promptkd", "ivlp"])
@pytest.mark.parametrize("protocol", ["inductive", "transductive"])
def test_train_then_eval_cli(synth_root, tmp_path, capsys, student, protocol):
    out = tmp_path / "run"
    rc = main(["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
               str(ROOT / "configs" / "methods" / "abkd_promptkd.yaml"), "--seed", "1", "--output-dir", str(out),
               *TINY, "MODEL.STUDENT.TYPE", student, "DISTILL.PROTOCOL", protocol])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    check_results(results)
    log = (out / "log.txt").read_text()
    assert "* accuracy:" in log and f"{protocol} protocol" in log
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "results"} <= {s["kind"] for s in steps}
    assert all("loss" in s and "lr" in s for s in steps if s["kind"] == "step")
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    for half in ("base", "new"):
        assert again[half] == results[half]
    assert main(["eval", "--run", str(out), "--subsample", "new"]) == 0
    assert "new: accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("loss", ["ab", "kl", "rkl", "js", "skl", "promptkd_kl"])
def test_each_loss_trains(synth_root, tmp_path, loss):
    cfg = config(synth_root, "abkd_promptkd", "DISTILL.LOSS", loss, "OPTIM.MAX_EPOCH", "1")
    check_results(fit(cfg, tmp_path / loss))


def test_distillation_moves_student_and_frozen_weights_stay(synth_root, tmp_path, monkeypatch):
    built = {}
    real_build = Run.build

    def spy(self, *args, **kwargs):
        real_build(self, *args, **kwargs)
        teacher, student = self.teacher, self.student
        built["student"], built["teacher"] = student, teacher
        trainable = {id(p) for p in student.trainable_parameters()}
        built["frozen"] = {n: p.detach().clone() for n, p in student.named_parameters() if id(p) not in trainable}
        built["teacher_state"] = {n: p.detach().clone() for n, p in teacher.state_dict().items()}
        built["before"] = {k: v.clone() for k, v in student.trainable_state_dict().items()}

    monkeypatch.setattr(Run, "build", spy)
    fit(config(synth_root, "abkd_ivlp"), tmp_path / "run")
    student = built["student"]
    assert built["frozen"]  # the CLIP weights
    for name, p in student.named_parameters():
        if name in built["frozen"]:
            assert torch.equal(p.detach(), built["frozen"][name]), name
    for name, t in built["teacher"].state_dict().items():
        assert torch.equal(t, built["teacher_state"][name]), name
    after = student.trainable_state_dict()
    assert any(not torch.equal(after[k], built["before"][k]) for k in after)
    assert set(after) == set(load_checkpoint(tmp_path / "run" / "model.pt")["state_dict"])


def test_resume_is_bit_identical(synth_root, tmp_path, monkeypatch):
    cfg = config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "3")
    full = fit(cfg, tmp_path / "full")

    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / "model.pt").exists()
    undo()
    resumed = fit(cfg, tmp_path / "cut", resume=True)
    assert resumed == full
    a = load_checkpoint(tmp_path / "full" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "step"]

    assert losses("cut") == losses("full")


def test_final_model_val_selects_on_val_never_test(synth_root, tmp_path):
    cfg = config(synth_root, "abkd_promptkd", "TEST.FINAL_MODEL", "val", "OPTIM.MAX_EPOCH", "3")
    results = fit(cfg, tmp_path / "run")
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "epoch"]
    val = [e["val_accuracy"] for e in epochs]
    assert results["epoch"] == val.index(max(val)) + 1
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best-val.pt")
    final = load_checkpoint(tmp_path / "run" / "model.pt")
    assert best["epoch"] == results["epoch"]
    assert all(torch.equal(best["state_dict"][k], final["state_dict"][k]) for k in final["state_dict"])


def test_ivlp_run_becomes_prompted_teacher(synth_root, tmp_path, capsys):
    """One checkpoint format: an ivlp CE run on the teacher's backbone loads as a prompted teacher."""
    teacher_run = tmp_path / "teacher"
    cfg = config(synth_root, "ivlp_teacher", "MODEL.STUDENT.NAME", "clipkd-tiny-teacher")
    trained = fit(cfg, teacher_run)
    ckpt = str(teacher_run / "model.pt")
    capsys.readouterr()
    assert main(["eval", "--zero-shot", "teacher", "--root", str(synth_root), "--dataset-config", DATASET_CFG,
                 "--config", str(ROOT / "configs" / "methods" / "abkd_promptkd.yaml"), "--output",
                 str(tmp_path / "t.json"), *TINY, "MODEL.TEACHER.CHECKPOINT", ckpt]) == 0
    as_teacher = json.loads((tmp_path / "t.json").read_text())
    for half in ("base", "new"):
        assert as_teacher[half]["accuracy"] == pytest.approx(trained[half]["accuracy"])
    cfg = config(synth_root, "abkd_promptkd", "MODEL.TEACHER.CHECKPOINT", ckpt, "OPTIM.MAX_EPOCH", "1")
    check_results(fit(cfg, tmp_path / "student"))


def test_zero_shot_teacher_with_ensemble(synth_root, tmp_path):
    assert main(["eval", "--zero-shot", "teacher", "--root", str(synth_root), "--dataset-config", DATASET_CFG,
                 *TINY, "MODEL.TEACHER.TEMPLATES", "ensemble"]) == 0


# ------------------------------------------------------------------------------------------------ bad input
def train_cli(root, out, *extra):
    return main(["train", "--root", str(root), "--dataset-config", DATASET_CFG, "--config",
                 str(ROOT / "configs" / "methods" / "abkd_promptkd.yaml"), "--output-dir", str(out),
                 *TINY, *extra])


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["DISTILL.LOSS", "hinge"], "DISTILL.LOSS must be one of"),
        (["MODEL.STUDENT.TYPE", "no_such_student"], "MODEL.STUDENT.TYPE must be one of"),
        (["DISTILL.ALPHA", "abc"], "DISTILL.ALPHA must be float"),
        (["DISTILL.ALPHA", "nan"], "DISTILL.ALPHA must be a finite number"),
        (["OPTIM.MAX_EPOCH", "0"], "OPTIM.MAX_EPOCH must be >= 1"),
        (["DATASET.NUM_SHOTS", "-3"], "DATASET.NUM_SHOTS must be >= 0"),
        (["DATALOADER.TRAIN_X.BATCH_SIZE", "0"], "BATCH_SIZE must be >= 1"),
        (["OPTIM.LR", "-0.1"], "OPTIM.LR must be > 0"),
        (["SEED", "-1"], "SEED must be >= 0"),
        (["INPUT.SIZE", "(224, 224)"], r"INPUT.SIZE \(224, 224\) does not fit MODEL.TEACHER.NAME clipkd-tiny-teacher, "
                                       r"which takes 32x32 images; set INPUT.SIZE"),
        (["DATALOADER.TRAIN_X.BATCH_SIZE", "1"], "BatchNorm, which needs at least 2 images"),
        (["OPTIM.PRECISION", "fp16"], "fp16 needs a CUDA device"),
        (["DISTILL.BETA", "nan"], "DISTILL.BETA"),
        (["MODEL.STUDENT.PRETRAINED", "/no/such/weights.pt"], "/no/such/weights.pt"),
    ],
)
def test_bad_run_inputs(synth_root, tmp_path, capsys, extra, pattern):
    import re

    out = tmp_path / "run"
    assert train_cli(synth_root, out, *extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("clipkd: error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]) and "Traceback" not in err
    assert not out.exists()  # a run that cannot start leaves nothing behind


def test_inconsistent_settings_are_refused(synth_root, tmp_path):
    with pytest.raises(ClipkdError, match="CE_WEIGHT needs labels"):
        fit(config(synth_root, "abkd_promptkd", "DISTILL.PROTOCOL", "transductive", "DISTILL.CE_WEIGHT", "1"),
            tmp_path / "a")
    with pytest.raises(ClipkdError, match="nothing to learn from"):
        fit(config(synth_root, "abkd_ivlp", "DISTILL.WEIGHT", "0"), tmp_path / "b")
    imagenet = ["DATASET.NAME", "ImageNet", "TEST.FINAL_MODEL", "val"]
    with pytest.raises(ClipkdError, match="ImageNet has no held-out val split"):
        fit(config(synth_root, "abkd_promptkd", *imagenet), tmp_path / "c")


def test_output_dir_not_empty_is_left_alone(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert train_cli(synth_root, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_teacher_checkpoint_shape_mismatch(synth_root, tmp_path, capsys):
    bad = tmp_path / "teacher.pt"
    torch.save({"state_dict": {"prompt_learner.ctx": torch.zeros(4, 7), "image_encoder.VPT": torch.zeros(4, 96)}},
               bad)
    assert train_cli(synth_root, tmp_path / "run", "MODEL.TEACHER.CHECKPOINT", str(bad)) == 2
    err = capsys.readouterr().err
    assert "prompt_learner.ctx" in err and "(4, 7)" in err.replace("[", "(").replace("]", ")")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(synth_root, tmp_path, monkeypatch):
    import clipkd.methods.kd  # where the KD objective looks its loss builder up

    real = clipkd.methods.kd.build_distill_loss_from_cfg
    calls = {"n": 0}

    def poisoned(cfg):
        fn = real(cfg)

        def loss(s, t, **kw):
            calls["n"] += 1
            value = fn(s, t, **kw)
            return value * float("nan") if calls["n"] > 5 else value
        return loss

    monkeypatch.setattr(clipkd.methods.kd, "build_distill_loss_from_cfg", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss .* epoch 2, step \d+ .*last.pt \(after epoch 1\)"):
        fit(config(synth_root, "abkd_promptkd"), out)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (out / "model.pt").exists() and not (out / "results.json").exists()


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be read"):
        load_checkpoint(path)
    with pytest.raises(ClipkdError):
        main(["eval", "--run", str(tmp_path), "--debug"])


def test_fewshot_setting_trains_and_evaluates_all_classes(synth_root, tmp_path, capsys):
    cfg = config(synth_root, "abkd_promptkd", "DATASET.SUBSAMPLE_CLASSES", "all", "OPTIM.MAX_EPOCH", "1")
    results = fit(cfg, tmp_path / "run")
    assert set(results) == {"all", "epoch", "selected_on", "teacher"} and results["all"]["n"] == 7 * 8
    assert "7 classes" in (tmp_path / "run" / "log.txt").read_text()
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--subsample", "base"]) == 2
    assert "evaluates all, not base" in capsys.readouterr().err


def test_a_method_that_needs_a_prompted_teacher_refuses_to_start_without_one(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(synth_root, out, "MODEL.TEACHER.CHECKPOINT", "") == 2
    err = capsys.readouterr().err
    assert "MODEL.TEACHER.PROMPTED True" in err and "scripts/teacher.sh" in err and "zero-shot" in err
    assert not out.exists()
    results = fit(config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "1"), out)  # TINY: CHECKPOINT zero-shot
    assert results["teacher"] == "zero-shot" and results["selected_on"] == "last"
    assert json.loads((out / "results.json").read_text())["teacher"] == "zero-shot"


def test_best_base_test_selection_is_the_reference_codes_and_says_so(synth_root, tmp_path):
    cfg = config(synth_root, "abkd_promptkd", "TEST.FINAL_MODEL", "best_base_test", "OPTIM.MAX_EPOCH", "3")
    results = fit(cfg, tmp_path / "run")
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "epoch"]
    test_acc = [e["base_test_accuracy"] for e in epochs]  # the reference code's selection metric
    assert results["epoch"] == test_acc.index(max(test_acc)) + 1
    assert results["base"]["accuracy"] == pytest.approx(max(test_acc))
    assert results["selected_on"] == "base_test"
    assert "base TEST (the reference code's choice)" in (tmp_path / "run" / "log.txt").read_text()
