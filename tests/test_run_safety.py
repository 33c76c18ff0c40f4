"""A run's results are never replaced by an evaluation, and a run keeps using the inputs it trained with: its
paths are stored absolute, and a stored dataset or teacher that changed or went missing is named, not used."""

from __future__ import annotations

import json
import shutil

import pytest

from clipkd.cli.main import main
from clipkd.engine.rundir import RunDir
from test_train import DATASET_CFG, ROOT, TINY, config, fit

METHOD = str(ROOT / "configs" / "methods" / "abkd_promptkd.yaml")


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
