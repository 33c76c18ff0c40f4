"""``--launcher slurm`` without a cluster: fake sbatch / srun / sacct / scontrol / scancel on PATH record what they
receive. Checked: the #SBATCH lines, the command each job runs (read back from submitit's pickles), a requeue
through submitit's own signal handler, status on a half-finished root, a rerun that submits only the unfinished
cells, and bad input (one line, nothing submitted, nothing in the root changed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from clipkd.cli.main import main  # noqa: E402
from clipkd.launch.cells import paper_jobs  # noqa: E402
from clipkd.launch.jobs import CellJob  # noqa: E402
from clipkd.launch.state import LaunchLock, read  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SBATCH = """#!/usr/bin/env bash
n=$(cat "$REC/next" 2>/dev/null || echo 1000)
echo $((n + 1)) > "$REC/next"
cp "$1" "$REC/sbatch-$n.sh"
echo "sbatch $*" >> "$REC/calls"
echo "Submitted batch job $n"
"""
SACCT = """#!/usr/bin/env bash
echo "sacct $*" >> "$REC/calls"
echo "JobID|State|NodeList"
cat "$REC/sacct.txt" 2>/dev/null
"""
RECORD = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$REC/calls"
"""
SLOW_CLIPKD = """#!/usr/bin/env bash
# a clipkd that records its arguments and trains "forever" until stopped with Ctrl-C (SIGINT)
printf '%s\\x1f' "$@" >> "$REC/clipkd"; echo >> "$REC/clipkd"
trap 'echo stopped >> "$REC/clipkd.stop"; exit 130' INT
for i in $(seq 600); do sleep 0.1; done
"""


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    for name, text in (("sbatch", SBATCH), ("sacct", SACCT), ("srun", RECORD), ("scontrol", RECORD),
                       ("scancel", RECORD), ("clipkd", SLOW_CLIPKD)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("REC", str(rec))
    monkeypatch.delenv("CLIPKD", raising=False)
    return bin_dir, rec


ARGS = ["launch", "base2new", "--method", "kd_promptkd", "--datasets", "dtd", "eurosat", "--seeds", "1", "2",
        "--launcher", "slurm", "--partition", "gpu", "--gpus-per-job", "1", "--time", "2:00:00", "--jobs", "2",
        "--cpus-per-job", "4", "--mem", "16", "--account", "lab", "--qos", "normal", "--constraint", "a100",
        "--slurm", "mail-type=END"]


def sbatch_files(rec: Path) -> list[str]:
    return [p.read_text() for p in sorted(rec.glob("sbatch-*.sh"))]


def test_slurm_array_lines_commands_status_and_rerun(cluster, tmp_path, capsys):
    _, rec = cluster
    out, data = tmp_path / "out", tmp_path / "data"
    args = [*ARGS, "--root", str(data), "--output", str(out), "OPTIM.MAX_EPOCH", "1"]
    assert main(args) == 0
    [text] = sbatch_files(rec)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=120",
                 "#SBATCH --array=0-3%2", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB", "#SBATCH --account=lab",
                 "#SBATCH --qos=normal", "#SBATCH --constraint=a100", "#SBATCH --mail-type=END",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@90"):
        assert line in text.splitlines(), line
    assert f"--output={out}/.launch/slurm/%A_%a_0_log.out" in text

    # launch.jsonl: each cell, its array task, its log next to its folder
    rows = [r for r in read(out) if r["state"] == "submitted"]
    cells = ["base2new/kd_promptkd/dtd/seed1", "base2new/kd_promptkd/dtd/seed2", "base2new/kd_promptkd/eurosat/seed1",
             "base2new/kd_promptkd/eurosat/seed2"]
    assert [r["cell"] for r in rows] == cells and [r["job"] for r in rows] == [f"1000_{i}" for i in range(4)]
    assert rows[0]["log"] == f"{out}/base2new/kd_promptkd/dtd/seed1.log"
    # each job runs its cell's command: the one the script runs, with this Python's clipkd
    jobs = paper_jobs("base2new", method="kd_promptkd", datasets=["dtd", "eurosat"], seeds=[1, 2], output=str(out),
                      data=str(data), opts=["OPTIM.MAX_EPOCH", "1"])
    for row, job in zip(rows, jobs):
        pickled = submitit.SlurmJob(out / ".launch" / "slurm", row["job"]).paths.submitted_pickle
        fn = submitit.helpers.DelayedSubmission.load(pickled).function
        assert isinstance(fn, CellJob) and fn.job == job
        assert fn.commands() == [[sys.executable, "-m", "clipkd", *job.steps[0].args]]

    # half-finished: one cell done, one running, one queued, one failed
    (out / cells[0]).mkdir(parents=True)
    (out / cells[0] / "results.json").write_text("{}")
    (rec / "sacct.txt").write_text("1000_0|COMPLETED|n1\n1000_1|RUNNING|n2\n1000_2|FAILED|n3\n1000_[3]|PENDING|\n")
    capsys.readouterr()
    assert main(["launch", "status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{out}: 4 cells: 1 done, 2 running, 1 failed, 0 pending"
    assert lines[1].split() == ["done", cells[0], "(slurm", "job", "1000_0)"]
    assert "RUNNING" in lines[2] and "PENDING" in lines[4]
    assert lines[3].startswith(f"  failed   {cells[2]}  (slurm job 1000_2 ended FAILED") and \
        lines[3].endswith(f"log: {out}/{cells[2]}.log")
    # clipkd sweep --status reads the same file the same way (here: a sweep root nobody launched into)
    assert main(["sweep", "--status", "--alpha", "1:1:1", "--beta", "0:0:1", "--dataset", "dtd", "--output",
                 str(tmp_path / "sweep")]) == 0
    assert "1 cells: 0 done, 0 running, 0 failed, 1 pending" in capsys.readouterr().out

    # a rerun submits the failed cell only (one job, no array)
    assert main(args) == 0
    assert "4 cells: 1 finished, 2 running, 0 cannot run, 1 to run in 1 jobs (slurm)" in capsys.readouterr().out
    second = sbatch_files(rec)[1]
    assert "#SBATCH --array" not in second
    assert [r["cell"] for r in read(out) if r["state"] == "submitted"][-1] == cells[2]
    assert [r["job"] for r in read(out) if r["state"] == "submitted"][-1] == "1001"


def test_a_timed_out_job_stops_its_command_requeues_itself_and_resumes(cluster, tmp_path, capsys, monkeypatch):
    """submitit's USR2 path, run for real: the job's checkpoint() stops clipkd with Ctrl-C, the job pickle is
    replaced by the resubmission, ``scontrol requeue`` is called; the requeued job runs ``clipkd train --resume``."""
    bin_dir, rec = cluster
    out, data = tmp_path / "out", tmp_path / "data"
    monkeypatch.setenv("CLIPKD", str(bin_dir / "clipkd"))
    assert main(["launch", "teacher", "--datasets", "dtd", "--seeds", "1", "--launcher", "slurm", "--root", str(data),
                 "--output", str(out), "--time", "30"]) == 0
    assert "#SBATCH --array" not in sbatch_files(rec)[0]
    folder = out / ".launch" / "slurm"
    env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1000", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "node1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (rec / "clipkd").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (rec / "clipkd").is_file(), worker.communicate()[0].decode()
    worker.send_signal(signal.SIGUSR2)  # what SLURM sends --signal=USR2@90 before the time limit
    log = worker.communicate(timeout=60)[0].decode()
    assert (rec / "clipkd.stop").read_text() == "stopped\n", log  # clipkd was stopped as by Ctrl-C, not killed
    assert "scontrol requeue 1000" in (rec / "calls").read_text(), log
    resubmitted = submitit.helpers.DelayedSubmission.load(folder / "1000_submitted.pkl").function
    assert isinstance(resubmitted, CellJob) and resubmitted.job.name == "teachers/dtd/seed1"
    # the requeued job: the run had started (config.yaml), so it resumes
    cell = out / "teachers" / "dtd" / "seed1"
    cell.mkdir(parents=True)
    (cell / "config.yaml").write_text("SEED: 1\n")
    (rec / "clipkd").unlink()
    [args] = [c for c in resubmitted.commands()]
    assert args[:5] == [str(bin_dir / "clipkd"), "train", "--output-dir", str(cell), "--resume"]
    assert f"$ {bin_dir / 'clipkd'} train --output-dir {cell} --root" in (out / "teachers/dtd/seed1.log").read_text()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"dir" for p in root.rglob("*")}


@pytest.mark.parametrize("bad, message", [
    (["--launcher", "pbs"], "unknown --launcher 'pbs'; choose one of inline, local, slurm"),
    (["--launcher", "slurm", "--jobs", "0"], "--jobs 0: must be > 0"),
    (["--launcher", "slurm", "--cpus-per-job", "-2"], "--cpus-per-job -2: must be > 0"),
    (["--launcher", "slurm", "--mem", "0"], "--mem 0.0: must be > 0"),
    (["--launcher", "slurm", "--gpus-per-job", "-1"], "--gpus-per-job -1: must be >= 0"),
    (["--launcher", "slurm", "--time", "0"], "--time 0: a job needs at least one minute"),
    (["--launcher", "slurm", "--time", "soon"], "--time soon: give minutes"),
    (["--launcher", "slurm", "--partition", "gpu large"], "--partition 'gpu large': one name without spaces"),
    (["--launcher", "slurm", "--slurm", "mail-type"], "--slurm 'mail-type': give KEY=VALUE"),
    (["--launcher", "local", "--partition", "gpu"], "--partition is for --launcher slurm"),
    (["--launcher", "local", "--mem", "8"], "--mem is for --launcher slurm"),
    (["--launcher", "inline", "--jobs", "2"], "--jobs is for --launcher local or slurm"),
])
def test_bad_input_is_one_line_and_changes_nothing(cluster, tmp_path, capsys, bad, message):
    _, rec = cluster
    out = tmp_path / "out"
    out.mkdir()
    (out / "launch.jsonl").write_text('{"cell": "x", "state": "planned", "outputs": []}\n')
    before = snapshot(out)
    rc = main(["launch", "base2new", "--datasets", "dtd", "--seeds", "1", "--root", str(tmp_path), "--output",
               str(out), *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert snapshot(out) == before and not (rec / "calls").exists()


def test_no_sbatch_no_submitit_and_a_busy_root_are_one_line(cluster, tmp_path, capsys, monkeypatch):
    bin_dir, rec = cluster
    out = tmp_path / "out"
    args = ["launch", "base2new", "--datasets", "dtd", "--seeds", "1", "--root", str(tmp_path), "--output", str(out),
            "--launcher", "slurm"]
    (bin_dir / "sbatch").unlink()
    monkeypatch.setenv("PATH", str(bin_dir))  # no sbatch anywhere on PATH
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == ("clipkd: error: --launcher slurm: sbatch not found on PATH; run this "
                                               "on a SLURM login node, or use --launcher local")
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert main([*args[:-1], "local"]) == 2
    assert capsys.readouterr().err.strip() == ("clipkd: error: --launcher local needs submitit: "
                                               "pip install 'clipkd[cluster]'")
    monkeypatch.delitem(sys.modules, "submitit")
    out.mkdir()
    lock = LaunchLock(out)
    lock.acquire()  # another launch holds the root
    try:
        before = snapshot(out)
        assert main([*args[:-1], "inline"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{out} is in use by another launch ({out}/launch.lock, held by process " \
            f"{os.getpid()}" in err[0]
        assert snapshot(out) == before
    finally:
        lock.release()


def test_a_fused_sweep_group_is_one_job_and_its_command_runs_the_group(cluster, tmp_path, capsys):
    _, rec = cluster
    from test_launch_local import TINY

    out = tmp_path / "sweep"
    data = str(tmp_path / "data")
    sweep = ["sweep", "--alpha", "0.5:1:0.5", "--beta", "0:0:1", "--dataset", "dtd", "--root", data,
             "--config", str(ROOT / "configs/methods/abkd_promptkd.yaml"), "--output", str(out), "--launcher", "slurm"]
    opts = [*TINY[:-4], "OPTIM.MAX_EPOCH", "1", "DATASET.NUM_SHOTS", "2"]
    assert main([*sweep, "--fused", *opts]) == 0
    [text] = sbatch_files(rec)
    assert "#SBATCH --array" not in text  # the two cells share a data stream: one job
    [row, row2] = [r for r in read(out) if r["state"] == "submitted"]
    assert row["job"] == row2["job"] == "1000"
    assert row["log"] == row2["log"] == f"{out}/abkd_promptkd/dtd/a0.5_b0/seed1.fused.log"
    fn = submitit.helpers.DelayedSubmission.load(out / ".launch/slurm/1000_submitted.pkl").function
    [command] = fn.commands()
    assert command[3:5] == ["launch", "group"] and len(fn.job.cells) == 2
    capsys.readouterr()
    assert main([*sweep, "--status", *opts]) == 0
    assert "2 cells: 0 done, 0 running, 0 failed, 2 pending" in capsys.readouterr().out  # sacct knows no job 1000
    # what the job runs, on cells finished meanwhile (training a fused group is tested in test_fused.py): the group's
    # cells are read back from the command and skipped, each checked against its folder's config
    from clipkd.launch.cells import sweep_jobs
    from clipkd.runs.sweep import build_grid

    grid = build_grid(str(ROOT / "configs/methods/abkd_promptkd.yaml"), "dtd", "0.5:1:0.5", "0:0:1", [1], out, opts)
    for cell in grid.cells:
        cell.out.mkdir(parents=True)
        (cell.out / "config.yaml").write_text(grid.config(cell, data).dump())
        (cell.out / "results.json").write_text("{}")
    assert [j.cells for j in sweep_jobs(grid, data, str(out), fused=True)] == [fn.job.cells]
    assert main(command[3:]) == 0
    assert "sweep: 0 done, 2 skipped (finished before), 0 failed" in capsys.readouterr().out
    assert main([*sweep, "--status", *opts]) == 0
    assert "2 cells: 2 done, 0 running, 0 failed, 0 pending" in capsys.readouterr().out
    assert main([*sweep, *opts]) == 0  # unfused now: both cells are finished, nothing is submitted
    assert "2 cells: 2 finished, 0 running, 0 cannot run, 0 to run in 0 jobs (slurm)" in capsys.readouterr().out
    assert len(sbatch_files(rec)) == 1


def test_a_cell_started_with_other_settings_is_named_not_submitted(cluster, tmp_path, capsys):
    _, rec = cluster
    out = tmp_path / "out"
    [job] = paper_jobs("base2new", method="kd_promptkd", datasets=["dtd"], seeds=[1], output=str(out),
                       data=str(tmp_path), opts=["OPTIM.MAX_EPOCH", "5"])
    [step] = job.steps
    step.run_dir.mkdir(parents=True)
    (step.run_dir / "config.yaml").write_text(step.config().dump())  # started with 5 epochs
    args = ["launch", "base2new", "--method", "kd_promptkd", "--datasets", "dtd", "--seeds", "1", "--root",
            str(tmp_path), "--output", str(out), "--launcher", "slurm", "OPTIM.MAX_EPOCH", "3"]
    assert main(args) == 1
    said = capsys.readouterr().out
    assert "0 to run in 0 jobs" in said and "cannot run base2new/kd_promptkd/dtd/seed1: --resume: the config " \
        "differs" in said and "OPTIM.MAX_EPOCH (5 there, 3 now)" in said
    assert not (rec / "calls").exists()  # nothing submitted
    assert main(["launch", "status", str(out)]) == 0
    assert "failed   base2new/kd_promptkd/dtd/seed1  (--resume: the config differs" in capsys.readouterr().out
    args[-1] = "5"  # with the settings it was started with, it is submitted (and will resume)
    assert main(args) == 0 and len(sbatch_files(rec)) == 1
