"""A run's files under trouble: a full disk (torch's writer, the logs), damaged run files on resume, a damaged or
malicious checkpoint, the log after kill + resume, and two Ctrl-C in a row."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clipkd.engine.trainer as train_mod
from clipkd.engine.checkpoint import load_checkpoint, save_checkpoint
from clipkd.engine.runlog import RunLog
from clipkd.errors import ModelError
from clipkd.fileio import OutputError, atomic_write, stale_temp_files

from test_train import ROOT, config, fit, train_cli

# What torch.save raises when the disk fills under it: its stream writer notices the short write.
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
TORCH_WRITE_FAILED = "PytorchStreamWriter failed writing file data/0: file write failed"
FULL_DISK_LINE = "No space left on device; free some space or pick another --output-dir"


class _FillsUp:
    """A file that takes ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = data if isinstance(data, str) else bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):  # flush, seek, truncate, ...: the real file's
        return getattr(self.f, name)


# ------------------------------------------------------------------------------------------------ full disk
@pytest.mark.parametrize("message", [TORCH_FULL_DISK, TORCH_WRITE_FAILED])
def test_atomic_write_turns_torch_full_disk_error_into_one_line(tmp_path, message):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")

    def writer(f):
        f.write(b"half a checkpoint")
        raise RuntimeError(message)

    with pytest.raises(OutputError, match=f"^cannot write {re.escape(str(target))}: {FULL_DISK_LINE}$"):
        atomic_write(target, writer)
    assert target.read_bytes() == b"the previous checkpoint"
    assert stale_temp_files(tmp_path) == []


def test_atomic_write_full_disk_under_real_torch_save(tmp_path):
    """torch.save itself, writing into a file that fills up: torch's own RuntimeError, translated."""
    target = tmp_path / "model.pt"
    save_checkpoint(target, {"w": torch.ones(3)})
    with pytest.raises(OutputError, match=f"cannot write {re.escape(str(target))}: {FULL_DISK_LINE}"):
        atomic_write(target, lambda f: torch.save({"w": torch.zeros(10_000)}, _FillsUp(f, 2000)))
    assert torch.equal(load_checkpoint(target)["state_dict"]["w"], torch.ones(3))
    assert stale_temp_files(tmp_path) == []


def test_atomic_write_passes_other_runtime_errors(tmp_path):
    def writer(f):
        raise RuntimeError("a bug, not a full disk")

    with pytest.raises(RuntimeError, match="a bug"):
        atomic_write(tmp_path / "x.pt", writer)
    assert stale_temp_files(tmp_path) == []


def test_metrics_append_on_full_disk_keeps_earlier_lines(tmp_path):
    run_log = RunLog(tmp_path, echo=False)
    run_log.metrics("step", epoch=1, loss=0.5)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    run_log._jsonl._f = _FillsUp(run_log._jsonl._f, 7)  # the next line is cut after 7 bytes by a full disk
    with pytest.raises(OutputError, match=f"^cannot write {re.escape(str(tmp_path / 'metrics.jsonl'))}: "
                                          f"{FULL_DISK_LINE}$"):
        run_log.metrics("step", epoch=1, loss=0.25)
    run_log.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # no half line after the good ones


def test_a_block_of_log_lines_is_one_call_each_line_its_own(tmp_path):
    """RunLog.info takes a block (e.g. a half's Dassl result lines): each line lands as a line of its own."""
    run_log = RunLog(tmp_path, echo=False)
    run_log.info("=> result", "* accuracy: 50.0%")
    run_log.info("Finish training")
    run_log.close()
    assert (tmp_path / "log.txt").read_text() == "=> result\n* accuracy: 50.0%\nFinish training\n"


def test_log_line_on_full_disk_is_an_error_not_a_logging_traceback(tmp_path, capsys):
    run_log = RunLog(tmp_path, echo=False)
    run_log.info("epoch [1/2] loss 1.0")
    run_log._file.stream = _FillsUp(run_log._file.stream, 3)
    with pytest.raises(OutputError, match=f"^cannot write {re.escape(str(tmp_path / 'log.txt'))}: "
                                          f"{FULL_DISK_LINE}$"):
        run_log.info("epoch [2/2] loss 0.5")
    run_log.close()
    assert "Logging error" not in capsys.readouterr().err
    assert (tmp_path / "log.txt").read_text().startswith("epoch [1/2] loss 1.0\n")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_log_on_a_really_full_device_via_cli(synth_root, tmp_path, monkeypatch, capsys):
    """The kernel's own ENOSPC (/dev/full) for log.txt on --resume: one line, rc 2."""
    out = tmp_path / "run"
    monkeypatch.setattr(train_mod, "save_checkpoint", _stop_at(train_mod.save_checkpoint, epoch=1))
    assert train_cli(synth_root, out, "OPTIM.MAX_EPOCH", "2") == 130  # "clipkd: interrupted"
    monkeypatch.undo()
    (out / "log.txt").unlink()
    (out / "log.txt").symlink_to("/dev/full")
    capsys.readouterr()
    assert train_cli(synth_root, out, "OPTIM.MAX_EPOCH", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"clipkd: error: cannot write {out / 'log.txt'}: {FULL_DISK_LINE}"
    assert "Traceback" not in err and "Logging error" not in err


def test_full_disk_while_training_keeps_last_checkpoint(synth_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:  # epoch 2's last.pt
            f.write(b"\0" * 598)
            raise RuntimeError(TORCH_FULL_DISK)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert train_cli(synth_root, out, "OPTIM.MAX_EPOCH", "3") == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"clipkd: error: cannot write {out / 'checkpoints' / 'last.pt'}: {FULL_DISK_LINE}"
    assert "Traceback" not in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert stale_temp_files(out / "checkpoints") == [] and stale_temp_files(out) == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in rows) == 2
    monkeypatch.undo()
    assert train_cli(synth_root, out, "OPTIM.MAX_EPOCH", "3", "--resume") == 0  # space freed: it carries on


# ------------------------------------------------------------------------------------------------ resume hygiene
def _stop_at(real_save, epoch: int):
    """``save_checkpoint`` that stops the run (as a kill would) just before writing ``last.pt`` for ``epoch``:
    the epoch's log line and metrics are written, its checkpoint is not."""

    def save(path, state_dict, **extra):
        if str(path).endswith("last.pt") and extra.get("epoch") == epoch:
            raise KeyboardInterrupt
        real_save(path, state_dict, **extra)

    return save


def _log_lines(folder: Path) -> list[str]:
    text = (folder / "log.txt").read_text()
    return [re.sub(r"\(\d+\.\d+s\)", "(TIME)", line) for line in text.splitlines()
            if not line.startswith("resumed from ")]


def test_log_after_kill_and_resume_matches_an_uninterrupted_run(synth_root, tmp_path, monkeypatch, capsys):
    cfg = config(synth_root, "abkd_promptkd", "OPTIM.MAX_EPOCH", "3")
    fit(cfg, tmp_path / "full")
    monkeypatch.setattr(train_mod, "save_checkpoint", _stop_at(train_mod.save_checkpoint, epoch=2))
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "cut")
    monkeypatch.undo()
    assert any(line.startswith("epoch [2/3]") for line in _log_lines(tmp_path / "cut"))  # written, not checkpointed

    # a metrics.jsonl damaged by something else (not UTF-8): one line naming it, and nothing touched
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "cut", damaged)
    with open(damaged / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "step", "epoch": 1, "loss": \xff\xfe}\n')
    files = {p.name: p.read_bytes() for p in damaged.iterdir() if p.is_file()}
    capsys.readouterr()
    rc = train_cli(synth_root, damaged, "OPTIM.MAX_EPOCH", "3", "--resume")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert re.match(rf"clipkd: error: {re.escape(str(damaged / 'metrics.jsonl'))} is damaged .*not UTF-8.*; "
                    r".*(delete|remove)", err)
    assert {p.name: p.read_bytes() for p in damaged.iterdir() if p.is_file()} == files

    fit(cfg, tmp_path / "cut", resume=True)
    cut = (tmp_path / "cut" / "log.txt").read_text()
    assert "resumed from" in cut and "after epoch 1" in cut
    assert _log_lines(tmp_path / "cut") == _log_lines(tmp_path / "full")


# ------------------------------------------------------------------------------------------------ damaged files
def _malicious(path: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo clipkd-test-should-never-run",))

    torch.save({"format": "clipkd-checkpoint", "state_dict": Evil()}, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "random", "malicious", "empty"])
def test_damaged_or_malicious_checkpoint_never_suggests_unsafe_loading(tmp_path, damage, capfd):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    save_checkpoint(path, {"w": torch.zeros(100)}, epoch=1)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(bytes(range(256)) * 3)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        _malicious(path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message and "succeed" not in message
    assert "safe_globals" not in message and "trust" not in message
    assert message.startswith(f"checkpoint {path} ") and "damaged or not a checkpoint clipkd wrote" in message
    assert "delete it" in message  # last.pt: the fix is to train the run again from its start (or a good copy)
    assert "clipkd-test-should-never-run" not in capfd.readouterr().out


def test_state_reader_on_malicious_file_never_suggests_unsafe_loading(tmp_path):
    from clipkd.models.state import read_state_dict

    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(ModelError) as info:
        read_state_dict(path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ Ctrl-C twice
SCRIPT = """
import sys, threading, time
import clipkd.cli.config_cmd as config_cmd
from clipkd.cli.main import main

def busy(args):
    print("ready", flush=True)
    time.sleep(30)

config_cmd.cmd_show = busy
threading.Thread(target=time.sleep, args=(1.5,)).start()  # a thread the interpreter waits for at exit
sys.argv = ["clipkd", "config", "show"]
sys.exit(main())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_second_ctrl_c_during_shutdown_is_quiet(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the first is handled; the interpreter now waits for the thread
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err == "clipkd: interrupted\n"


def test_damaged_toy_weights_never_suggest_unsafe_loading(tmp_path):
    from clipkd.toy.pretrain import expand_compact

    path = _malicious(tmp_path / "tiny.compact.pt")
    with pytest.raises(ModelError) as info:
        expand_compact(path, tmp_path / "full.pt")
    assert "weights_only" not in str(info.value) and "damaged" in str(info.value)
    assert not (tmp_path / "full.pt").exists()


def test_trim_log_edge_cases(tmp_path):
    from clipkd.rundir import trim_log

    log = tmp_path / "log.txt"
    body = b"clipkd run: ...\nepoch [1/3] loss 1 (0.1s)\nepoch [2/3] loss \xff (0.1s)\nwarning\n"
    log.write_bytes(body)
    assert trim_log(log, 2) == 1 and log.read_bytes() == body[: body.index(b"warning")]  # not UTF-8: no matter
    log.write_bytes(b"a script's own log\n")
    assert trim_log(log, 1) == 0 and log.read_bytes() == b"a script's own log\n"  # not a clipkd log: kept
    log.write_bytes(body)
    assert trim_log(log, 0) == 4 and log.read_bytes() == b""  # killed in its first epoch: starts afresh
    assert trim_log(tmp_path / "missing.txt", 1) == 0


@pytest.mark.parametrize("line", [b"3", b'{"kind": "step", "epoch": "one"}', b'["step", 1]'])
def test_metrics_line_that_is_no_record_is_refused_before_anything_changes(tmp_path, line):
    from clipkd.rundir import RunDir
    from clipkd.errors import TrainingError

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"kind": "step", "epoch": 1}\n' + line + b'\n{"kind": "step", "epoch": 2}\n')
    tmp = tmp_path / ".config.yaml.x.tmp"
    tmp.write_text("")
    with pytest.raises(TrainingError, match=rf"^{re.escape(str(metrics))} is damaged \(line 2 is not a clipkd "
                                            r"metrics record\); delete that line"):
        RunDir(tmp_path).clean_for_resume(1)
    assert tmp.exists() and metrics.read_bytes().endswith(b'"epoch": 2}\n')
