"""A run's results are never replaced by an evaluation, and a run keeps using the inputs it trained with: its
paths are stored absolute, and a stored dataset or teacher that changed or went missing is named, not used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from clipkd.cli.main import main
from clipkd.config import build_config
from clipkd.data.synth import synthesize
from clipkd.engine.checkpoint import load_checkpoint, save_checkpoint
from clipkd.rundir import RunDir
from test_train import DATASET_CFG, ROOT, TINY, config, fit, interrupt_after_checkpoint

METHOD = str(ROOT / "configs" / "methods" / "abkd_promptkd.yaml")
TEACHER_METHOD = str(ROOT / "configs" / "methods" / "ivlp_teacher.yaml")


def eval_cli(root, *args):
    return main(["eval", "--root", str(root), "--dataset-config", DATASET_CFG, "--config", METHOD, *args, *TINY])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth_root):
    """A finished one-epoch run, and a copy of its model.pt elsewhere (another run's checkpoint)."""
    base = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPKD_CACHE_DIR", str(base / "cache"))
        fit(config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "1"), base / "run")
    (base / "other").mkdir()
    shutil.copy(base / "run" / "model.pt", base / "other" / "model.pt")
    return base


# ------------------------------------------------------------------------------------------------ eval --output-dir
@pytest.mark.parametrize("how", ["zero-shot", "checkpoint", "run", "output-file"])
def test_eval_never_replaces_a_runs_results(finished, synth_root, capsys, how):
    run = finished / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    if how == "zero-shot":
        rc = eval_cli(synth_root, "--zero-shot", "student", "--output-dir", str(run))
    elif how == "checkpoint":
        rc = eval_cli(synth_root, "--checkpoint", str(finished / "other" / "model.pt"), "--output-dir", str(run))
    elif how == "run":
        rc = main(["eval", "--run", str(run), "--output-dir", str(run)])
    else:
        rc = eval_cli(synth_root, "--zero-shot", "teacher", "--output", str(run / "results.json"))
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("clipkd: error: ") and err.count("\n") == 1
    assert str(run) in err and "results.json" in err and "--output" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_eval_into_a_folder_of_its_own_still_writes(finished, synth_root, tmp_path):
    out = tmp_path / "zs"
    assert eval_cli(synth_root, "--zero-shot", "student", "--output-dir", str(out)) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["base"]["n"] == 32
    # an evaluation folder (no run in it) is rewritten by the next evaluation, as before
    assert eval_cli(synth_root, "--checkpoint", str(finished / "other"), "--output-dir", str(out)) == 0
    assert json.loads((out / "results.json").read_text())["checkpoint"] == str(finished / "other")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no lock left behind


def test_eval_refuses_a_folder_a_run_is_training_in(synth_root, tmp_path, capsys):
    busy = RunDir(tmp_path / "busy")
    busy.acquire()  # what a training process holds (before it has written anything)
    try:
        rc = eval_cli(synth_root, "--zero-shot", "teacher", "--output-dir", str(busy.path))
    finally:
        busy.release()
    err = capsys.readouterr().err
    assert rc == 2 and "in use by process" in err and str(busy.path) in err
    assert not (busy.path / "results.json").exists()


def test_eval_output_dir_that_is_a_file(synth_root, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    assert eval_cli(synth_root, "--zero-shot", "teacher", "--output-dir", str(f)) == 2
    err = capsys.readouterr().err
    assert f"{f} is a file, not a folder" in err and "File exists" not in err
    assert f.read_text() == "mine\n"


def test_eval_checkpoint_empty_folder_says_so(synth_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["eval", "--checkpoint", str(empty), "--root", str(synth_root), "--dataset-config",
               str(ROOT / "configs" / "datasets" / "eurosat.yaml"), *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"the folder {empty} holds no checkpoint (it is empty)" in err and "model.pt" in err and "model-best.pth.tar" in err
    assert "DATASET.NAME" not in err


# ------------------------------------------------------------------------------------------------ stored paths
def test_config_paths_are_absolute_tags_and_words_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "student.safetensors").write_bytes(b"")
    cfg = build_config([], ["DATASET.ROOT", "data", "OUTPUT_DIR", "out", "DISTILL.TEACHER_CACHE", "~/cache",
                            "MODEL.TEACHER.CHECKPOINT", "zero-shot", "MODEL.TEACHER.PRETRAINED", "openai",
                            "MODEL.STUDENT.PRETRAINED", "student.safetensors"])
    assert cfg.DATASET.ROOT == str(tmp_path / "data") and cfg.OUTPUT_DIR == str(tmp_path / "out")
    assert cfg.DISTILL.TEACHER_CACHE == os.path.join(os.path.expanduser("~"), "cache")
    assert cfg.MODEL.TEACHER.CHECKPOINT == "zero-shot" and cfg.MODEL.TEACHER.PRETRAINED == "openai"
    assert cfg.MODEL.STUDENT.PRETRAINED == str(tmp_path / "student.safetensors")
    up = build_config([], ["MODEL.TEACHER.CHECKPOINT", "../t"])
    assert up.MODEL.TEACHER.CHECKPOINT == str(tmp_path.parent / "t")
    assert build_config().DATASET.ROOT == ""


def train_args(out, *extra):
    return ["train", "--root", "data", "--dataset-config", DATASET_CFG, "--config", METHOD, "--output-dir", out,
            *TINY, *extra]


def train_teacher(out):
    assert main(["train", "--root", "data", "--dataset-config", DATASET_CFG, "--config", TEACHER_METHOD,
                 "--output-dir", str(out), *TINY, "MODEL.STUDENT.NAME", "clipkd-tiny-teacher",
                 "OPTIM.MAX_EPOCH", "1"]) == 0


def test_relative_paths_are_stored_absolute(synth_root, tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "data").symlink_to(synth_root)
    synthesize(b / "data", "oxford_pets", classes=5, images_per_class=17, seed=7)  # another dataset, same layout
    monkeypatch.chdir(a)
    train_teacher("teacher")
    student = train_args("run", "MODEL.TEACHER.CHECKPOINT", "teacher", "DISTILL.TEACHER_CACHE", "cache")
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    assert main(student) == 130
    undo()
    saved = yaml.safe_load((a / "run" / "config.yaml").read_text())
    assert saved["DATASET"]["ROOT"] == str(a / "data")
    assert saved["MODEL"]["TEACHER"]["CHECKPOINT"] == str(a / "teacher")
    assert saved["DISTILL"]["TEACHER_CACHE"] == str(a / "cache")
    assert saved["OUTPUT_DIR"] == str(a / "run")

    # the same relative arguments from another folder name other data: refused before anything is written
    monkeypatch.chdir(b)
    (b / "run").symlink_to(a / "run")
    before = sorted(str(p) for p in (a / "run").rglob("*"))
    capsys.readouterr()
    assert main([*student, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "DATASET.ROOT" in err and str(a / "data") in err and str(b / "data") in err
    assert sorted(str(p) for p in (a / "run").rglob("*")) == before

    monkeypatch.chdir(a)
    assert main([*student, "--resume"]) == 0
    results = json.loads((a / "run" / "results.json").read_text())
    assert results["teacher"] == f"prompted: {a / 'teacher'}"

    # evaluating the run from another folder uses the run's own data and teacher
    monkeypatch.chdir(b)
    assert main(["eval", "--run", str(a / "run"), "--output", "again.json"]) == 0
    again = json.loads((b / "again.json").read_text())
    for half in ("base", "new"):
        assert again[half] == results[half]


def perturb(checkpoint: Path) -> None:
    """Rewrite a checkpoint with other prompt values (a teacher retrained into the same folder)."""
    ckpt = load_checkpoint(checkpoint)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    save_checkpoint(checkpoint, state, **{k: v for k, v in ckpt.items() if k != "state_dict"})


def test_changed_or_missing_inputs_are_named(synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(synth_root / "oxford_pets", tmp_path / "data" / "oxford_pets")
    train_teacher("teacher")
    teacher = tmp_path / "teacher" / "model.pt"
    original = teacher.read_bytes()
    student = train_args("run", "MODEL.TEACHER.CHECKPOINT", "teacher")
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1)
    assert main(student) == 130
    undo()

    perturb(teacher)
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    capsys.readouterr()
    assert main([*student, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "MODEL.TEACHER.CHECKPOINT" in err and str(teacher) in err and "changed" in err
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before
    teacher.write_bytes(original)
    os.utime(teacher, (0, 0))  # the same bytes with another time (a copy) are the same teacher
    assert main([*student, "--resume"]) == 0
    assert main(["eval", "--run", "run"]) == 0

    perturb(teacher)  # a finished run: evaluated again, or on another dataset, with another teacher
    for transfer in ([], ["--dataset", "dtd", "--root", str(synth_root)]):
        capsys.readouterr()
        assert main(["eval", "--run", "run", *transfer]) == 2
        err = capsys.readouterr().err
        assert "MODEL.TEACHER.CHECKPOINT" in err and str(teacher) in err and "changed" in err
    assert not (tmp_path / "run" / "eval").exists()
    teacher.write_bytes(original)

    shutil.move(teacher, tmp_path / "teacher.pt")
    capsys.readouterr()
    assert main(["eval", "--run", "run"]) == 2
    err = capsys.readouterr().err
    assert "MODEL.TEACHER.CHECKPOINT" in err and str(teacher) in err and "missing" in err
    shutil.move(tmp_path / "teacher.pt", teacher)

    (tmp_path / "data").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["eval", "--run", "run"]) == 2
    err = capsys.readouterr().err
    assert "DATASET.ROOT" in err and str(tmp_path / "data") in err and "missing" in err and "--root" in err
    assert main(["eval", "--run", "run", "--root", "moved"]) == 0  # the same data in another place is the same
    (tmp_path / "moved").rename(tmp_path / "data")

    split = tmp_path / "data" / "oxford_pets" / "split_zhou_OxfordPets.json"
    lists = json.loads(split.read_text())
    lists["test"] = lists["test"][1:]
    split.write_text(json.dumps(lists))
    capsys.readouterr()
    assert main(["eval", "--run", "run"]) == 2
    err = capsys.readouterr().err
    assert "DATASET.ROOT" in err and str(tmp_path / "data") in err and "test" in err
