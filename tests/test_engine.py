"""The engine's pieces and the faults a run must survive: the Distiller's loss, the folder lock, resume
hygiene, CLI resume, write errors, and the trainer's less common settings (bf16, grad clip, AdamW, workers)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import clipkd.engine.trainer as train_mod
from clipkd.cli.main import main
from clipkd.engine.checkpoint import load_checkpoint, save_checkpoint
from clipkd.methods.distiller import Distiller
from clipkd.methods.kd import KDObjective
from clipkd.runs.run import Run
from clipkd.rundir import RunDir
from clipkd.errors import ConfigError, TrainingError
from clipkd.fileio import OutputError, atomic_write_text, stale_temp_files
from clipkd.losses import build_distill_loss
from test_train import DATASET_CFG, ROOT, TINY, check_results, config, fit, interrupt_after_checkpoint, train_cli


def steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]


# ------------------------------------------------------------------------------------------------ Distiller
@pytest.mark.parametrize("weight, ce_weight", [(2.0, 0.0), (0.0, 1.0), (3.0, 0.5)])
def test_distiller_loss_is_the_objective_on_both_models_logits(synth_root, weight, ce_weight):
    run = Run(config(synth_root, "abkd_promptkd"))
    run.build()
    classnames = run.data.train.classnames
    kl = build_distill_loss("kl")
    distiller = Distiller(run.student, run.teacher, classnames, KDObjective(kl, weight, ce_weight))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    run.student.eval()  # BatchNorm in eval: the two forwards below see the same statistics
    distiller.eval()
    out = distiller(images, labels)
    with torch.no_grad():
        t_text = run.teacher.text_features(classnames)
        t_logits = run.teacher.logit_scale * run.teacher.image_features(images) @ t_text.t()
    s_logits = run.student.logit_scale * run.student.image_features(images) @ t_text.t()
    expected = weight * kl(s_logits, t_logits) + ce_weight * F.cross_entropy(s_logits, labels)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, s_logits)
    assert ("kd" in out.terms) == (weight > 0) and ("ce" in out.terms) == (ce_weight > 0)
    assert "teacher" not in dict(distiller.named_modules())  # frozen teacher: not part of what DDP syncs
    assert all(not n.startswith("teacher") for n, _ in distiller.named_parameters())


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_run_into_a_locked_folder_is_refused(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.acquire()  # as a first `clipkd train` would, still running
    try:
        assert train_cli(synth_root, out) == 2
        err = capsys.readouterr().err
        assert f"output dir {out} is in use by process {os.getpid()}" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the second run written
    finally:
        holder.release()
    assert not out.exists() or not any(out.iterdir())


def test_a_stale_lock_of_a_killed_run_is_taken_over(synth_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text('{"pid": 999999, "host": "gone", "since": "yesterday"}')  # no flock held
    check_results(fit(config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "1"), out))
    assert not (out / ".lock").exists()


def test_output_path_that_is_a_file(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("not a folder")
    assert train_cli(synth_root, out) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------------ resume
def test_resume_trims_metrics_and_removes_stale_temp_files(synth_root, tmp_path, monkeypatch):
    cfg = config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "3")
    full = fit(cfg, tmp_path / "full")
    real_save = train_mod.save_checkpoint

    def killed_during_epoch_2_save(path, state_dict, **extra):
        if str(path).endswith("last.pt") and extra.get("epoch") == 2:
            (Path(path).parent / ".last.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # as kill -9 leaves
            raise KeyboardInterrupt
        real_save(path, state_dict, **extra)

    monkeypatch.setattr(train_mod, "save_checkpoint", killed_during_epoch_2_save)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, cut)
    assert max(s["epoch"] for s in steps(cut)) == 2  # epoch 2's steps were logged, its checkpoint was not
    assert stale_temp_files(cut / "checkpoints")
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert fit(cfg, cut, resume=True) == full
    assert [s["loss"] for s in steps(cut)] == [s["loss"] for s in steps(tmp_path / "full")]
    assert len(steps(cut)) == len(steps(tmp_path / "full"))
    assert not stale_temp_files(cut / "checkpoints") and not (cut / ".lock").exists()


def test_train_resume_through_the_cli(synth_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--root", str(synth_root), "--dataset-config", DATASET_CFG, "--config",
            str(ROOT / "configs/methods/abkd_promptkd.yaml"), "--seed", "2", "--output-dir", str(out), *TINY]
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    assert main(args) == 130  # interrupted
    undo()
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "resumed from" in (out / "log.txt").read_text()
    assert load_checkpoint(out / "model.pt")["epoch"] == 2
    assert main([*args, "--resume", "OPTIM.LR", "0.5"]) == 2
    assert "config differs" in capsys.readouterr().err


def test_unreadable_model_reaches_the_checkpoint_check(synth_root, tmp_path, capsys):
    out = tmp_path / "run"
    fit(config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "1"), out)
    (out / "model.pt").write_bytes(b"garbage")
    assert main(["eval", "--run", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'model.pt'} cannot be read" in err


# ------------------------------------------------------------------------------------------------ writes
def test_atomic_write_reports_a_full_disk_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    from clipkd.fileio import atomic_write

    with pytest.raises(OutputError, match=rf"cannot write {target}: No space left on device; free some space"):
        atomic_write(target, full)
    assert target.read_text() == "old" and not stale_temp_files(tmp_path)


def test_disk_full_while_saving_a_checkpoint_is_one_line(synth_root, tmp_path, monkeypatch, capsys):
    real = torch.save

    def no_space(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:  # checkpoints/last.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", no_space)
    out = tmp_path / "run"
    assert train_cli(synth_root, out) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "last.pt: No space left on device" in err and "Traceback" not in err
    assert not stale_temp_files(out / "checkpoints") and not (out / ".lock").exists()


def test_unwritable_output_folder_is_one_line(synth_root, tmp_path, capsys):
    parent = tmp_path / "file"
    parent.write_text("x")  # a path below a file cannot be created, even by root
    assert train_cli(synth_root, parent / "run") == 2
    err = capsys.readouterr().err
    assert err.count("clipkd: error:") == 1 and str(parent / "run") in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ settings
def test_bf16_autocast_on_cpu_trains(synth_root, tmp_path):
    results = fit(config(synth_root, "abkd_promptkd", "OPTIM.PRECISION", "bf16", "OPTIM.MAX_EPOCH", "1"),
                  tmp_path / "run")
    check_results(results)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps(tmp_path / "run"))


def test_grad_clip_is_applied(synth_root, tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        norm = real(params, max_norm, *args, **kwargs)
        seen.append((max_norm, float(norm)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    fit(config(synth_root, "abkd_promptkd", "OPTIM.GRAD_CLIP", "0.001", "OPTIM.MAX_EPOCH", "1"), tmp_path / "run")
    assert seen and all(m == 0.001 for m, _ in seen)
    assert any(norm > 0.001 for _, norm in seen)  # it had something to clip


def test_adamw_trains_with_adam_state(synth_root, tmp_path):
    out = tmp_path / "run"
    check_results(fit(config(synth_root, "abkd_promptkd", "OPTIM.NAME", "adamw", "OPTIM.MAX_EPOCH", "1"), out))
    state = load_checkpoint(out / "checkpoints" / "last.pt")["optimizer"]["state"]
    assert state and all("exp_avg" in s for s in state.values())


def test_loader_workers_do_not_change_the_run(synth_root, tmp_path):
    """Each image's augmentation is seeded by (seed, epoch, index): worker processes give the same batches."""
    a = fit(config(synth_root, "abkd_promptkd", "DATALOADER.NUM_WORKERS", "0"), tmp_path / "w0")
    b = fit(config(synth_root, "abkd_promptkd", "DATALOADER.NUM_WORKERS", "2"), tmp_path / "w2")
    assert a == b
    assert [s["loss"] for s in steps(tmp_path / "w0")] == [s["loss"] for s in steps(tmp_path / "w2")]


def test_eval_of_an_interrupted_run_names_the_missing_model(synth_root, tmp_path):
    cfg = config(synth_root, "abkd_promptkd")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(cfg.dump())
    with pytest.raises(Exception, match="model.pt not found"):
        Run.load(out).evaluate()


def test_run_evaluate_refuses_a_half_it_does_not_have(synth_root):
    run = Run(config(synth_root, "abkd_promptkd", "DATASET.SUBSAMPLE_CLASSES", "all"))
    with pytest.raises(ConfigError, match="evaluates all, not base"):
        run.evaluate(["base"], which="teacher")


def test_fit_needs_a_folder(synth_root):
    with pytest.raises(TrainingError, match="output folder"):
        Run(config(synth_root, "abkd_promptkd")).fit()


def test_checkpoint_temp_name_is_unique(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"x": torch.zeros(1)})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_tensorboard_sink_is_opt_in(synth_root, tmp_path, capsys):
    import importlib.util

    out = tmp_path / "run"
    rc = train_cli(synth_root, out, "OPTIM.MAX_EPOCH", "1", "--tensorboard")
    if importlib.util.find_spec("tensorboard") is None:
        assert rc == 2
        assert "pip install 'clipkd[tensorboard]'" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert rc == 0 and any((out / "tensorboard").iterdir())
    plain = tmp_path / "plain"
    assert train_cli(synth_root, plain, "OPTIM.MAX_EPOCH", "1") == 0 and not (plain / "tensorboard").exists()


def test_eval_of_a_student_file_needs_the_prompted_teacher_too(synth_root, tmp_path, capsys):
    """A PromptKD student's classifier is its teacher's class embeddings: evaluating one under a recipe that
    names a prompted teacher, without the teacher, must not silently use a zero-shot one."""
    out = tmp_path / "run"
    fit(config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "1"), out)
    args = ["eval", "--checkpoint", str(out / "model.pt"), "--root", str(synth_root), "--dataset-config",
            DATASET_CFG, "--config", str(ROOT / "configs/methods/abkd_promptkd.yaml"), *TINY]
    assert main([*args, "MODEL.TEACHER.CHECKPOINT", ""]) == 2
    assert "MODEL.TEACHER.PROMPTED True" in capsys.readouterr().err
    assert main(args) == 0  # TINY names the zero-shot teacher explicitly, as the run had


def test_epoch_selection_is_test_final_models_measure(monkeypatch):
    """TEST.FINAL_MODEL last selects nothing; val measures the few-shot val list, best_base_test the test list."""
    import clipkd.engine.evaluate as evaluate_mod
    from clipkd.config import build_config
    from clipkd.data.rundata import RunData

    asked = []
    monkeypatch.setattr(evaluate_mod, "evaluate_half",
                        lambda model, split, cfg, device, autocast, items: asked.append((model, split, items))
                        or {"accuracy": 42.0})
    device, data = torch.device("cpu"), RunData(None, "train", {"base": "s", "new": "other"})
    assert evaluate_mod.epoch_selection("m", data, build_config(), device) is None
    for final, items in (("val", "val"), ("best_base_test", "test")):
        select = evaluate_mod.epoch_selection("m", data, build_config([], ["TEST.FINAL_MODEL", final]), device)
        assert select() == 42.0 and asked[-1] == ("m", "s", items)
