"""The experiment workflow on synthetic data with the tiny CLIPs: run scripts, few-shot runs, the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipkd.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
CLIPKD = str(Path(sys.executable).parent / "clipkd")
TINY = ["MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
        "MODEL.TEACHER.CHECKPOINT", "zero-shot",
        "MODEL.STUDENT.NAME", "clipkd-tiny-student", "MODEL.STUDENT.PRETRAINED", "",
        "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "1",
        "DATASET.NUM_SHOTS", "2"]


def script(name, *args, data, output):
    env = {**os.environ, "DATA": str(data), "OUTPUT": str(output), "CLIPKD": CLIPKD}
    return subprocess.run(["bash", str(ROOT / "scripts" / name), *args], env=env, capture_output=True, text=True)


def test_base2new_script_runs_skips_and_uses_per_dataset_settings(synth_root, tmp_path):
    out = tmp_path / "output"
    for dataset in ("dtd", "eurosat"):
        for seed in ("1", "2"):
            proc = script("base2new.sh", dataset, seed, "kd_promptkd", *TINY, data=synth_root, output=out)
            assert proc.returncode == 0, proc.stderr
            run = out / "base2new" / "kd_promptkd" / dataset / f"seed{seed}"
            results = json.loads((run / "results.json").read_text())
            assert {"base", "new", "hm"} <= set(results)
    # PromptKD's per-dataset KD weight comes from configs/per_dataset, not from the script
    assert "WEIGHT: 200.0" in (out / "base2new/kd_promptkd/dtd/seed1/config.yaml").read_text()
    assert "WEIGHT: 1000.0" in (out / "base2new/kd_promptkd/eurosat/seed1/config.yaml").read_text()
    again = script("base2new.sh", "dtd", "1", "kd_promptkd", *TINY, data=synth_root, output=out)
    assert again.returncode == 0 and "skip" in again.stdout

    # the report recomputes the table from the results.json files
    proc = subprocess.run([CLIPKD, "report", str(out / "base2new"), "--format", "json"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    import statistics

    means = {}
    for dataset, name in (("dtd", "DescribableTextures"), ("eurosat", "EuroSAT")):
        runs = [json.loads((out / f"base2new/kd_promptkd/{dataset}/seed{s}/results.json").read_text())
                for s in (1, 2)]
        row = report["datasets"][name]
        for half in ("base", "new"):
            values = [r[half]["accuracy"] for r in runs]
            assert row[half]["mean"] == pytest.approx(statistics.fmean(values))
            assert row[half]["std"] == pytest.approx(statistics.stdev(values))  # sample std (ddof 1), issue #19
            assert row[half]["n"] == 2
        b, n = row["base"]["mean"], row["new"]["mean"]
        assert row["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
        means[name] = (b, n)
    mb = statistics.fmean(b for b, _ in means.values())
    mn = statistics.fmean(n for _, n in means.values())
    assert report["average"]["base"] == pytest.approx(mb) and report["average"]["new"] == pytest.approx(mn)
    assert report["average"]["hm"] == pytest.approx(2 * mb * mn / (mb + mn) if mb + mn else 0.0)


def test_scripts_refuse_missing_data_and_unknown_method(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATA"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "base2new.sh"), "dtd", "1"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "set DATA" in proc.stderr
    proc = script("base2new.sh", "dtd", "1", "no_such_method", data=tmp_path, output=tmp_path)
    assert proc.returncode == 2 and "unknown method 'no_such_method'" in proc.stderr


def test_fewshot_script(synth_root, tmp_path):
    proc = script("fewshot.sh", "oxford_pets", "1", "2", "abkd_promptkd", *TINY, data=synth_root,
                  output=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "fewshot/abkd_promptkd/oxford_pets/shots2/seed1/results.json").read_text())
    assert results["all"]["n"] == 7 * 8


def test_sweep_dry_run_prints_the_exact_grid(capsys):
    assert main(["sweep", "--alpha", "0:1:0.25", "--beta=-0.5:1:0.5", "--dataset", "dtd", "--seeds", "1", "2",
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 * 4 * 2  # both ends included, as seq does
    cells = {(line.split("DISTILL.ALPHA ")[1].split()[0], line.split("DISTILL.BETA ")[1].split()[0]) for line in lines}
    assert {float(a) for a, _ in cells} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert {float(b) for _, b in cells} == {-0.5, 0.0, 0.5, 1.0}
    assert all(line.startswith("clipkd train --root") and "--output-dir output/sweep/abkd_promptkd/dtd/a" in line
               for line in lines)
    assert main(["sweep", "--alpha", "0:0.3:0.1", "--beta", "0:0:1", "--dataset", "dtd", "--dry-run"]) == 0
    alphas = [line.split("DISTILL.ALPHA ")[1].split()[0] for line in capsys.readouterr().out.splitlines()]
    assert alphas == ["0.0", "0.1", "0.2", "0.3"]  # exact decimal steps, no 0.30000000000000004


def test_small_real_sweep_covers_the_limit_cells(synth_root, tmp_path):
    rc = main(["sweep", "--alpha", "0:1:1", "--beta=-1:0:1", "--dataset", "dtd", "--root", str(synth_root),
               "--config", str(ROOT / "configs/methods/abkd_promptkd.yaml"), "--output", str(tmp_path), *TINY])
    assert rc == 0
    for cell in ("a0_b-1", "a0_b0", "a1_b-1", "a1_b0"):  # alpha=0, beta=0, alpha+beta=0 and the origin
        results = json.loads((tmp_path / "abkd_promptkd/dtd" / cell / "seed1/results.json").read_text())
        assert results["hm"] >= 0
    pytest.importorskip("matplotlib")
    png = tmp_path / "hm.png"
    proc = subprocess.run([CLIPKD, "report", str(tmp_path), "--sweep", "--plot", str(png)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Best cell" in proc.stdout and png.stat().st_size > 1000


def test_sweep_resumes_a_killed_cell_skips_finished_ones_and_fails_loudly(synth_root, tmp_path, monkeypatch,
                                                                          capsys):
    import torch
    from test_train import interrupt_after_checkpoint

    from clipkd.runs.run import Run
    from clipkd.runs.sweep import build_grid

    method = str(ROOT / "configs/methods/abkd_promptkd.yaml")
    opts = [*TINY, "OPTIM.MAX_EPOCH", "2"]
    args = ["sweep", "--alpha", "0.5:1:0.5", "--beta", "0:0:1", "--dataset", "dtd", "--root", str(synth_root),
            "--config", method, "--output", str(tmp_path / "sweep"), *opts]
    cells = {c.out.parent.name: c.out for c in build_grid(method, "dtd", "0.5:1:0.5", "0:0:1", [1],
                                                           tmp_path / "sweep", opts).cells}
    undo = interrupt_after_checkpoint(monkeypatch, epoch=1, inside=str(cells["a1_b0"]))
    assert main(args) == 130
    assert (cells["a0.5_b0"] / "results.json").is_file() and not (cells["a1_b0"] / "results.json").exists()
    undo()
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 skipped (finished before), 0 failed" in out
    # the resumed cell ends exactly where an uninterrupted run of the same cell ends
    grid = build_grid(method, "dtd", "1:1:1", "0:0:1", [1], tmp_path / "alone", opts)
    alone = Run(grid.config(grid.cells[0], str(synth_root)), grid.cells[0].out, echo=False).fit()
    resumed = json.loads((cells["a1_b0"] / "results.json").read_text())
    assert resumed == alone
    a = torch.load(cells["a1_b0"] / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(grid.cells[0].out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a cell that cannot run: the others still run, the summary names it, the exit code says so
    blocked = tmp_path / "sweep2" / "abkd_promptkd" / "dtd" / "a0_b0" / "seed1"
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("not a run")
    assert main(["sweep", "--alpha", "0:0.5:0.5", "--beta", "0:0:1", "--dataset", "dtd", "--root",
                 str(synth_root), "--config", method, "--output", str(tmp_path / "sweep2"), *opts]) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 skipped (finished before), 1 failed" in err
    assert f"failed {blocked}: output dir {blocked} is not empty" in err
    assert (blocked / "notes.txt").read_text() == "not a run"


def test_sweep_rejects_bad_ranges_and_overrides_before_running(synth_root, tmp_path, capsys):
    base = ["sweep", "--dataset", "dtd", "--root", str(synth_root), "--output", str(tmp_path)]
    assert main([*base, "--alpha=--", "--beta", "0:1:1"]) == 2
    assert "--alpha takes START:STOP:STEP" in capsys.readouterr().err
    assert main([*base, "--alpha", "0:1:nan", "--beta", "0:1:1"]) == 2
    assert main([*base, "--alpha", "0:1:1", "--beta", "0:1:1", "OPTIM.LR"]) == 2
    assert "'OPTIM.LR' has no value" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_sweep_diagonal_grid_as_abkd_scripts(capsys):
    """ABKD's grid: alpha + beta in 1.0..1.3 and alpha in 0.5..1.2, step 0.1, beta derived in exact decimals."""
    assert main(["sweep", "--alpha-plus-beta", "1.0:1.3:0.1", "--alpha", "0.5:1.2:0.1", "--dataset", "dtd",
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 * 8
    pairs = [(line.split("DISTILL.ALPHA ")[1].split()[0], line.split("DISTILL.BETA ")[1].split()[0]) for line in lines]
    assert ("0.5", "0.8") in pairs and ("1.2", "-0.2") in pairs and ("1.0", "0.0") in pairs
    assert all(len(b) <= 4 for _, b in pairs)  # 0.8, not 0.8000000000000002
    sums = {round(float(a) + float(b), 10) for a, b in pairs}
    assert sums == {1.0, 1.1, 1.2, 1.3}
    assert main(["sweep", "--alpha", "0:1:1", "--dataset", "dtd", "--dry-run"]) == 2  # --beta or --alpha-plus-beta
