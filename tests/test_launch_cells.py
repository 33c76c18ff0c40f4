"""``clipkd launch``'s cells are the scripts' own: each script is run with a fake CLIPKD that records its arguments,
and the launch's commands for the same settings must be those calls, into the same folders. No training."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clipkd.cli.main import main
from clipkd.launch.cells import paper_jobs
from clipkd.launch.jobs import CellJob

ROOT = Path(__file__).resolve().parents[1]
FAKE = """#!/usr/bin/env bash
# clipkd config show answers for real (the transfer scripts read DISTILL.PROTOCOL from it); every other call is
# recorded, one a line, its arguments separated by \\x1f
if [ "$1" = config ]; then exec "$REAL_PYTHON" -m clipkd "$@"; fi
printf '%s\\x1f' "$@" >> "$CALLS"; echo >> "$CALLS"
"""


@pytest.fixture
def fake(tmp_path):
    exe = tmp_path / "clipkd"
    exe.write_text(FAKE)
    exe.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "DATA": "/data", "OUTPUT": str(tmp_path / "out"), "CLIPKD": str(exe), "CALLS": str(calls),
           "REAL_PYTHON": sys.executable, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key in ("TEACHERS", "XD_TEACHER", "TEACHER_SEED", "XD_TARGETS", "DG_TARGETS", "SEEDS"):
        env.pop(key, None)

    def run(script: str, *args: str, **extra: str) -> list[list[str]]:
        calls.write_text("")
        proc = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env={**env, **extra},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()
                if line.split("\x1f")[0] in ("train", "eval")]

    return run, tmp_path / "out", exe


def launched(kind: str, out: Path, **kw) -> list[list[str]]:
    jobs = paper_jobs(kind, output=str(out), data="/data", **kw)
    return [cmd for job in jobs for cmd in CellJob(job, []).commands()]


def test_base2new_fewshot_teacher_cells_are_the_scripts_calls(fake):
    run, out, _ = fake
    teachers = out.parent / "teachers"
    (teachers / "dtd" / "seed2").mkdir(parents=True)  # dtd has clipkd's own teacher (TEACHER_SEED 2), eurosat not
    started = out / "base2new" / "kd_promptkd" / "dtd" / "seed2"
    started.mkdir(parents=True)
    (started / "config.yaml").write_text("SEED: 2\n")  # a started run: both resume it
    opts = ["OPTIM.MAX_EPOCH", "1", "OPTIM.LR", "0.01"]
    scripted = [c for d in ("dtd", "eurosat") for s in ("1", "2")
                for c in run("base2new.sh", d, s, "kd_promptkd", *opts, TEACHERS=str(teachers), TEACHER_SEED="2")]
    ours = launched("base2new", out, method="kd_promptkd", datasets=["dtd", "eurosat"], seeds=[1, 2], opts=opts,
                    teachers=str(teachers), teacher_seed=2)
    assert ours == scripted and len(ours) == 4
    assert sum("--resume" in c for c in ours) == 1
    assert [c[c.index("MODEL.TEACHER.CHECKPOINT") + 1] for c in ours] == [str(teachers / "dtd/seed2")] * 2 + [
        str(teachers)] * 2

    scripted = [c for k in ("2", "4") for s in ("1", "3") for c in run("fewshot.sh", "oxford_pets", s, k)]
    ours = launched("fewshot", out, method=None, datasets=["oxford_pets"], seeds=[1, 3], shots=[2, 4])
    assert sorted(ours) == sorted(scripted) and len(ours) == 4

    scripted = run("teacher.sh", "ucf101", "1", "OPTIM.MAX_EPOCH", "2")
    assert launched("teacher", out, method=None, datasets=["ucf101"], seeds=[1], opts=["OPTIM.MAX_EPOCH", "2"]) \
        == scripted


def test_transfer_cells_are_the_scripts_calls(fake):
    run, out, _ = fake
    teachers = out.parent / "teachers"
    (teachers / "imagenet" / "seed1").mkdir(parents=True)
    # inductive: the ImageNet run, then its evaluation on each target, in one job; an evaluation that exists is
    # skipped by both
    done = out / "transfer" / "abkd_promptkd" / "imagenet" / "seed1" / "eval" / "eurosat"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    scripted = run("xd.sh", "1", "abkd_promptkd", "OPTIM.MAX_EPOCH", "1", XD_TARGETS="dtd eurosat caltech101",
                   TEACHERS=str(teachers))
    jobs = paper_jobs("xd", method="abkd_promptkd", datasets=["dtd", "eurosat", "caltech101"], seeds=[1],
                      output=str(out), data="/data", opts=["OPTIM.MAX_EPOCH", "1"], teachers=str(teachers))
    assert len(jobs) == 1 and [c for j in jobs for c in CellJob(j, []).commands()] == scripted
    assert [c[0] for c in scripted] == ["train", "eval", "eval"]
    # transductive: one run per dataset, ImageNet included, each its own job
    scripted = run("xd.sh", "2", "promptkd_xd", XD_TARGETS="dtd eurosat", XD_TEACHER="/t/xd")
    ours = launched("xd", out, method="promptkd_xd", datasets=["dtd", "eurosat"], seeds=[2], xd_teacher="/t/xd")
    assert ours == scripted and len(ours) == 3 and all(c[0] == "train" for c in ours)
    # dg: the same ImageNet run, evaluated on the variants
    scripted = run("dg.sh", "3", "kd_promptkd", DG_TARGETS="imagenet_a imagenet_r")
    assert launched("dg", out, method="kd_promptkd", datasets=["imagenet_a", "imagenet_r"], seeds=[3]) == scripted


def test_launch_dry_run_prints_the_commands_with_the_executable(fake, capsys, monkeypatch):
    _, out, exe = fake
    monkeypatch.setenv("CLIPKD", str(exe))
    assert main(["launch", "base2new", "--method", "kd_promptkd", "--datasets", "dtd", "--seeds", "1", "2",
                 "--root", "/data", "--output", str(out), "--dry-run", "OPTIM.MAX_EPOCH", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line)[0] for line in lines] == [str(exe)] * 2
    assert f"--output-dir {out}/base2new/kd_promptkd/dtd/seed2 " in lines[1]
    assert not out.exists()  # a dry run writes nothing
    monkeypatch.delenv("CLIPKD")
    assert main(["launch", "teacher", "--datasets", "all", "--seeds", "1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and shlex.split(lines[0])[:3] == [sys.executable, "-m", "clipkd"]


def test_unknown_grid_inputs_are_named(capsys):
    assert main(["launch", "base2new", "--method", "no_such", "--datasets", "dtd", "--dry-run"]) == 2
    assert "unknown method 'no_such'" in capsys.readouterr().err
    assert main(["launch", "fewshot", "--datasets", "dtd", "nowhere", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1


def test_all_datasets_and_targets_are_the_scripts_lists():
    """``--datasets all`` means what the scripts loop over: base2new_all.sh's 11 datasets, xd.sh's and dg.sh's
    default targets (read from the scripts, compared with the dataset specs the launcher uses)."""
    import re

    from clipkd.launch import cells

    def listed(script: str, pattern: str) -> tuple[str, ...]:
        text = (ROOT / "scripts" / script).read_text()
        return tuple(re.search(pattern, text).group(1).split())

    assert cells.DATASETS == listed("base2new_all.sh", r"DATASETS=\(([^)]*)\)")
    assert cells.XD_TARGETS == listed("xd.sh", r"\$\{XD_TARGETS:-([^}]*)\}")
    assert cells.DG_TARGETS == listed("dg.sh", r"\$\{DG_TARGETS:-([^}]*)\}")
