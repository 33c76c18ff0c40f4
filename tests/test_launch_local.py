"""``--launcher local`` on CPU with the tiny CLIPs: two cells run as parallel submitit jobs end exactly as the same
cells run inline (in this process, from the cells' own configs); a job whose clipkd is killed mid-run fails, is
named by status with its log, and a rerun submits it alone and resumes it from its last epoch to the same bits."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip("submitit")
torch = pytest.importorskip("torch")

from clipkd.cli.main import main  # noqa: E402
from clipkd.launch.cells import paper_jobs  # noqa: E402
from clipkd.runs.run import Run  # noqa: E402
from clipkd.launch.state import read  # noqa: E402

TINY = ["MODEL.TEACHER.NAME", "clipkd-tiny-teacher", "MODEL.TEACHER.PRETRAINED", "",
        "MODEL.TEACHER.CHECKPOINT", "zero-shot",
        "MODEL.STUDENT.NAME", "clipkd-tiny-student", "MODEL.STUDENT.PRETRAINED", "",
        "MODEL.PROMPT.DEPTH_VISION", "2", "MODEL.PROMPT.DEPTH_TEXT", "2", "INPUT.SIZE", "(32, 32)",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.MAX_EPOCH", "2",
        "DATASET.NUM_SHOTS", "2"]
KILLER = f"""#!{sys.executable}
# clipkd, killed (SIGKILL: no clean-up at all) right after it saved epoch 1's last.pt of a seed1 run
import os, signal, sys
import clipkd.engine.trainer as trainer
real = trainer.save_checkpoint
def save(path, state_dict, **extra):
    real(path, state_dict, **extra)
    if "seed1" in str(path) and str(path).endswith("last.pt") and extra.get("epoch") == 1:
        os.kill(os.getpid(), signal.{signal.SIGKILL.name})
trainer.save_checkpoint = save
from clipkd.cli.main import main
sys.exit(main())
"""
CELLS = ["base2new/kd_promptkd/dtd/seed1", "base2new/kd_promptkd/dtd/seed2"]


def same_run(a: Path, b: Path) -> None:
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())
    x = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    y = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_local_jobs_equal_inline_and_a_killed_job_resumes_bit_identical(synth_root, tmp_path, monkeypatch, capsys):
    grid = ["launch", "base2new", "--method", "kd_promptkd", "--datasets", "dtd", "--seeds", "1", "2", "--root",
            str(synth_root)]
    inline, local = tmp_path / "inline", tmp_path / "local"
    for job in paper_jobs("base2new", method="kd_promptkd", datasets=["dtd"], seeds=[1, 2], output=str(inline),
                          data=str(synth_root), opts=TINY):  # the same cells, run in this process
        [step] = job.steps
        Run(step.config(), step.run_dir, echo=False).fit()

    killer = tmp_path / "killer"
    killer.write_text(KILLER)
    killer.chmod(0o755)
    monkeypatch.setenv("CLIPKD", str(killer))
    assert main([*grid, "--output", str(local), "--launcher", "local", "--jobs", "2", *TINY]) == 1
    out = capsys.readouterr().out
    assert "local: 2 jobs at a time on CPU" in out
    rows = [r["state"] for r in read(local) if r["state"] != "planned"]
    assert rows[:2] == ["running", "running"]  # both jobs were started before either ended
    # seed2 ran alongside, untouched: the same bits as inline
    same_run(local / CELLS[1], inline / CELLS[1])
    # seed1 was killed after epoch 1: status says failed and where its log is
    assert (local / CELLS[0] / "checkpoints/last.pt").is_file() and not (local / CELLS[0] / "results.json").exists()
    assert main(["launch", "status", str(local)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{local}: 2 cells: 1 done, 0 running, 1 failed, 0 pending"
    assert lines[1].startswith(f"  failed   {CELLS[0]}") and "clipkd train exited with -9" in lines[1]
    assert lines[1].endswith(f"log: {local / CELLS[0]}.log")

    # the rerun submits the killed cell alone; its job resumes it (clipkd train --resume) to the inline bits
    monkeypatch.delenv("CLIPKD")
    assert main([*grid, "--output", str(local), "--launcher", "local", "--jobs", "2", *TINY]) == 0
    assert "2 cells: 1 finished, 0 running, 0 cannot run, 1 to run in 1 jobs (local)" in capsys.readouterr().out
    log = (local / f"{CELLS[0]}.log").read_text()
    assert log.count("$ ") == 2 and f"train --output-dir {local / CELLS[0]} --resume --root" in log
    same_run(local / CELLS[0], inline / CELLS[0])
    # and once all is done, a rerun has nothing to do
    assert main([*grid, "--output", str(local), "--launcher", "local", *TINY]) == 0
    assert "2 cells: 2 finished" in capsys.readouterr().out


FAKE_GPU_RUN = """#!/usr/bin/env bash
# a clipkd train that notes the GPUs it was given and "finishes": train --output-dir OUT ...
mkdir -p "$3" && echo "$CUDA_VISIBLE_DEVICES" > "$3/gpus" && sleep 0.3 && echo '{}' > "$3/results.json"
"""


@pytest.mark.parametrize("per_job, expected", [("1", {"0", "1"}), ("2", {"0,1"})])
def test_local_jobs_are_pinned_to_their_own_gpus(tmp_path, monkeypatch, capsys, per_job, expected):
    """No GPU here: a fake clipkd records CUDA_VISIBLE_DEVICES; at most one job per GPU slot runs at a time."""
    fake = tmp_path / "clipkd"
    fake.write_text(FAKE_GPU_RUN)
    fake.chmod(0o755)
    monkeypatch.setenv("CLIPKD", str(fake))
    out = tmp_path / "out"
    assert main(["launch", "teacher", "--datasets", "dtd", "--seeds", "1", "2", "3", "--root", str(tmp_path),
                 "--output", str(out), "--launcher", "local", "--gpus", "0,1", "--gpus-per-job", per_job]) == 0
    slots = 2 // int(per_job)
    assert f"local: {slots} jobs at a time, {per_job} GPU each of [0, 1]" in capsys.readouterr().out
    seen = {(out / f"teachers/dtd/seed{s}/gpus").read_text().strip() for s in (1, 2, 3)}
    assert seen == expected
    running, most = 0, 0
    for row in read(out):
        running += {"running": 1, "finished": -1}.get(row["state"], 0)
        most = max(most, running)
    assert most == slots


FAKE_RECORD = """#!/usr/bin/env bash
echo "$@" >> "$(dirname "$0")/calls.txt"
"""


def test_a_job_waits_for_a_run_another_job_trains_then_resumes_it(tmp_path, monkeypatch):
    """xd and dg of one seed share the ImageNet run: the second job waits while the first holds the run's lock,
    then runs its own command (with --resume, as the folder holds a started run), instead of failing on the lock."""
    import threading

    from clipkd.launch import jobs
    from clipkd.launch.cells import Cell, Job, Step
    from clipkd.rundir import RunDir

    fake = tmp_path / "clipkd"
    fake.write_text(FAKE_RECORD)
    fake.chmod(0o755)
    out = tmp_path / "transfer" / "m" / "imagenet" / "seed1"
    step = Step("train", ("train", "--output-dir", str(out), "--seed", "1"), str(out / "results.json"))
    job = Job("m/imagenet/seed1", (Cell("m/imagenet/seed1", (str(out / "results.json"),)),), (step,),
              str(tmp_path / "seed1.log"))
    other = RunDir(out)  # the first job's training run
    other.acquire()
    (out / "config.yaml").write_text("SEED: 1\n")
    monkeypatch.setattr(jobs, "LOCK_POLL_S", 0.05)
    worker = threading.Thread(target=jobs.CellJob(job, [str(fake)]))
    worker.start()
    worker.join(0.5)
    assert worker.is_alive() and not (tmp_path / "calls.txt").exists()  # waiting, nothing run
    other.release()
    worker.join(30)
    assert not worker.is_alive()
    assert (tmp_path / "calls.txt").read_text().split() == ["train", "--output-dir", str(out), "--resume",
                                                            "--seed", "1"]
    assert "is in use by process" in (tmp_path / "seed1.log").read_text()
