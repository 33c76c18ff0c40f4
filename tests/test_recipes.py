"""One recipe and one reuse rule for every way a run is launched (clipkd train, clipkd sweep, plain or fused, and
the scripts), and a sweep's size known before anything is built. Cheap: configs only, no training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipkd.cli.main import build_parser, main
from clipkd.config import build_config, flatten
from clipkd.runs.sweep import build_grid, decimal_range

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLIPKD = str(Path(sys.executable).parent / "clipkd")
METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))
STEMS = sorted(p.stem for p in (CONFIGS / "datasets").glob("*.yaml"))
RECORD = """#!/usr/bin/env bash
# records the arguments of each call, one call a line, the arguments separated by \\x1f
printf '%s\\x1f' "$@" >> "$CALLS"; echo >> "$CALLS"
"""


def flat(cfg) -> dict:
    return {k: v for k, v in flatten(cfg).items() if k != "OUTPUT_DIR"}


def train_cfg(argv: list[str], parser=build_parser()):
    from clipkd.cli.train_cmd import train_config

    return train_config(parser.parse_args(["train", *argv]))


# ------------------------------------------------------------------------------------------------ item 4: one recipe
def test_every_method_on_every_dataset_is_the_same_recipe_in_sweep_scripts_and_train(tmp_path, monkeypatch):
    """The sweep's cell, the scripts' run (scripts/base2new.sh, its arguments read back by clipkd train's parser)
    and clipkd train --method M --dataset STEM merge the same files: configs/per_dataset/M/STEM.yaml included."""
    import copy

    import yaml

    # the case of the issue: kd_promptkd on DTD trains with PromptKD's per-dataset KD weight, in the sweep too
    method = str(CONFIGS / "methods/kd_promptkd.yaml")
    grid = build_grid(method, "dtd", None, None, [1], tmp_path / "s", vary=[("OPTIM.LR", "0.1")])
    assert grid.config(grid.cells[0], "/data").DISTILL.WEIGHT == 200.0

    parsed, real = {}, yaml.safe_load  # each file parsed once: ~700 configs are built below

    def safe_load(text: str):
        if text not in parsed:
            parsed[text] = real(text)
        return copy.deepcopy(parsed[text])

    monkeypatch.setattr(yaml, "safe_load", safe_load)
    fake = tmp_path / "clipkd"
    fake.write_text(RECORD)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    loop = 'for m in $METHODS; do for s in $STEMS; do bash "$REPO/scripts/base2new.sh" "$s" 1 "$m" || exit 1; done; done'
    env = {**os.environ, "DATA": "/data", "OUTPUT": str(tmp_path / "out"), "CLIPKD": str(fake), "CALLS": str(calls),
           "METHODS": " ".join(METHODS), "STEMS": " ".join(STEMS), "REPO": str(ROOT)}
    env.pop("TEACHERS", None)
    proc = subprocess.run(["bash", "-c", loop], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    scripted = [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()]
    assert len(scripted) == len(METHODS) * len(STEMS) >= 15 * 15
    per_dataset = 0
    for (method, stem), argv in zip([(m, s) for m in METHODS for s in STEMS], scripted):
        assert argv[0] == "train"
        by_script = flat(train_cfg(argv[1:]))
        by_train = flat(train_cfg(["--root", "/data", "--method", method, "--dataset", stem, "--seed", "1",
                                   "--output-dir", str(tmp_path / "t"), "DATASET.SUBSAMPLE_CLASSES", "base"]))
        grid = build_grid(method, stem, None, None, [1], tmp_path / "sweep", ["DATASET.SUBSAMPLE_CLASSES", "base"],
                          vary=[("SEED", "1")])
        by_sweep = flat(grid.config(grid.cells[0], "/data"))
        assert by_script == by_train == by_sweep, (method, stem)
        extra = CONFIGS / "per_dataset" / method / f"{stem}.yaml"
        if extra.is_file():  # the per-dataset file is really merged: its values are in the config
            per_dataset += 1
            alone = flatten(build_config([CONFIGS / "datasets" / f"{stem}.yaml", CONFIGS / "methods" / f"{method}.yaml",
                                          extra]))
            assert all(by_sweep[k] == v for k, v in alone.items() if k not in ("DATASET.ROOT", "SEED", "OUTPUT_DIR",
                                                                               "DATASET.SUBSAMPLE_CLASSES"))
    assert per_dataset >= 6


def test_recipes_are_found_from_any_working_directory(tmp_path):
    """The method names resolve in the checkout's configs/ (found from the package), not the working directory."""
    elsewhere = {"cwd": tmp_path, "capture_output": True, "text": True}
    proc = subprocess.run([CLIPKD, "config", "show", "--method", "kd_promptkd", "--dataset", "fgvc_aircraft"],
                          **elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "WEIGHT: 200.0" in proc.stdout and "FGVCAircraft" in proc.stdout
    proc = subprocess.run([CLIPKD, "sweep", "--method", "kd_promptkd", "--dataset", "oxford_flowers", "--vary",
                           "OPTIM.LR", "0.1", "--dry-run"], **elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert str(CONFIGS / "methods/kd_promptkd.yaml") in proc.stdout  # the printed command is self-contained
    proc = subprocess.run([CLIPKD, "config", "show", "--method", "no_such", "--dataset", "dtd"], **elsewhere)
    assert proc.returncode == 2 and "unknown method 'no_such'" in proc.stderr and "kd_promptkd" in proc.stderr


def test_train_method_needs_a_dataset_and_one_only(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--method", "kd_promptkd", "--output-dir", out]) == 2
    assert "--dataset STEM or --dataset-config" in capsys.readouterr().err
    assert main(["train", "--method", "kd_promptkd", "--dataset", "dtd", "--dataset-config",
                 str(CONFIGS / "datasets/dtd.yaml"), "--output-dir", out]) == 2
    assert "give the dataset once" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ item 3: reuse
def _finish(folder: Path, cfg, results: dict | None = None) -> str:
    """A folder as a finished run leaves it (only what the reuse decision reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(cfg.dump())
    text = json.dumps(results or {"base": {"accuracy": 50.0}}) + "\n"
    (folder / "results.json").write_text(text)
    return text


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_a_finished_sweep_rerun_with_other_settings_is_refused_not_skipped(tmp_path, capsys, fused):
    method = str(CONFIGS / "methods/abkd_promptkd.yaml")
    sweep = ["sweep", "--alpha", "0.5:1:0.5", "--beta", "0:0:1", "--dataset", "dtd", "--root", "/data", "--config",
             method, "--output", str(tmp_path), *(["--fused"] if fused else [])]
    grid = build_grid(method, "dtd", "0.5:1:0.5", "0:0:1", [1], tmp_path, ["OPTIM.MAX_EPOCH", "2"])
    written = {c.out: _finish(c.out, grid.config(c, "/data")) for c in grid.cells}
    assert main([*sweep, "OPTIM.MAX_EPOCH", "2"]) == 0  # the same settings: skipped
    assert "0 done, 2 skipped (finished before), 0 failed" in capsys.readouterr().out
    assert main([*sweep, "OPTIM.MAX_EPOCH", "3"]) == 1
    err = capsys.readouterr().err
    assert "0 done, 0 skipped (finished before), 2 failed" in err
    for out, text in written.items():
        assert f"failed {out}: {out} holds a finished run" in err
        assert (out / "results.json").read_text() == text
    assert "OPTIM.MAX_EPOCH (2 there, 3 now)" in err and "--output" in err


def test_train_resume_skips_a_run_finished_with_this_config_and_names_any_difference(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--root", "/data", "--dataset", "dtd", "--method", "kd_promptkd", "--seed", "1",
            "--output-dir", str(out)]
    text = _finish(out, train_cfg(args[1:]))
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.strip() == f"skip {out} (finished)"
    assert main([*args, "--resume", "DATASET.NUM_SHOTS", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a finished run" in err and "DATASET.NUM_SHOTS (16 there, 4 now)" in err
    assert "--output-dir" in err and (out / "results.json").read_text() == text
    assert main(args) == 2  # without --resume a used folder stays refused
    assert "is not empty" in capsys.readouterr().err


def test_scripts_refuse_a_finished_run_with_another_protocol_or_shot_count(tmp_path):
    """base2new.sh over a run it finished: skipped with the same arguments, an error naming the key otherwise."""
    fake = tmp_path / "record"
    fake.write_text(RECORD)
    fake.chmod(0o755)
    env = {**os.environ, "DATA": str(tmp_path / "data"), "OUTPUT": str(tmp_path / "out"), "CALLS": str(tmp_path / "c")}
    env.pop("TEACHERS", None)
    base2new = ["bash", str(ROOT / "scripts/base2new.sh"), "dtd", "1", "kd_promptkd"]
    subprocess.run(base2new, env={**env, "CLIPKD": str(fake)}, check=True)
    argv = (tmp_path / "c").read_text().split("\x1f")[:-1]
    out = tmp_path / "out/base2new/kd_promptkd/dtd/seed1"
    text = _finish(out, train_cfg(argv[1:]))
    proc = subprocess.run(base2new, env={**env, "CLIPKD": CLIPKD}, capture_output=True, text=True)
    assert proc.returncode == 0 and f"skip {out} (finished)" in proc.stdout, proc.stderr
    for key, value, before in (("DATASET.NUM_SHOTS", "4", "16"), ("DISTILL.PROTOCOL", "transductive", "'inductive'")):
        proc = subprocess.run([*base2new, key, value], env={**env, "CLIPKD": CLIPKD}, capture_output=True, text=True)
        assert proc.returncode == 2 and "skip" not in proc.stdout
        assert f"{out} holds a finished run" in proc.stderr and f"{key} ({before} there" in proc.stderr
    assert (out / "results.json").read_text() == text


# ------------------------------------------------------------------------------------------------ item 8: size
@pytest.mark.parametrize("text", ["0:1:0.1", "0:0.3:0.1", "-1:1:0.25", "0:1:0.3", "2:2:1", "0:1e-3:1e-4",
                                  "1e300:1.001e300:1e297", "0.1:0.35:0.05"])
def test_range_count_is_exact(text):
    from clipkd.runs.sweep import range_count

    assert range_count(text, "alpha") == len(decimal_range(text, "alpha"))


def test_sweep_size_is_counted_before_anything_is_built(capsys):
    dry = ["sweep", "--dataset", "dtd", "--beta", "0:1:1", "--dry-run"]
    assert main([*dry, "--alpha=0:1:1e-5"]) == 2  # 100001 x 2 cells: refused, nothing printed
    out, err = capsys.readouterr()
    assert not out and "200,002 cells" in err and "--max-cells 10,000" in err
    assert main([*dry, "--alpha=0:1:1e-400"]) == 2  # 1e400 cells: counted, not listed
    assert "about 2.00E+400 cells" in capsys.readouterr().err
    assert main([*dry, "--alpha=1e400:1e401:1"]) == 2
    assert "out of a float's range" in capsys.readouterr().err
    assert main([*dry, "--alpha=0:1:1", "--seeds", "1", "2", "--vary", "OPTIM.LR", "0.1,0.2", "--max-cells", "16"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2 * 2 * 2 * 2
    assert main([*dry, "--alpha=0:1:1", "--seeds", "1", "2", "--vary", "OPTIM.LR", "0.1:0.2:0.1", "--max-cells",
                 "15"]) == 2
    assert "16 cells, more than --max-cells 15" in capsys.readouterr().err


def test_sweep_refuses_cells_that_would_collide(capsys):
    dry = ["sweep", "--dataset", "dtd", "--beta", "0:0:1", "--dry-run"]
    assert main([*dry, "--alpha=1:1.0000000000000001:1e-17"]) == 2  # 1 + 1e-17 == 1 in floats
    assert "below a float's resolution near 1.0" in capsys.readouterr().err
    assert main([*dry, "--alpha=1e20:1.0000000000000000000000000001e20:1e-10"]) == 2  # beyond 28 decimal digits
    assert "below a float's resolution near 1e+20" in capsys.readouterr().err
    assert main([*dry, "--alpha=0.1:0.1000005:0.0000001"]) == 2  # a0.1000001 is a0.1 in a folder name
    assert "two cells would share the folder" in capsys.readouterr().err


def test_sweep_cells_store_their_output_dir_absolute(tmp_path, monkeypatch):
    """A cell's config.yaml names its folder as clipkd train's does: absolute, whatever the working directory."""
    from clipkd.runs.sweep import build_grid

    monkeypatch.chdir(tmp_path)
    grid = build_grid("abkd_promptkd", "dtd", "0.5:0.5:0.1", "0.3:0.3:0.1", [1], "out")
    cfg = grid.config(grid.cells[0], str(tmp_path / "data"))
    assert cfg.OUTPUT_DIR == str(tmp_path / grid.cells[0].out)
