"""A launch root's record and lock: ``ROOT/launch.jsonl`` (append-only, one JSON object a line: a cell, its job,
the job's state and log) and ``ROOT/launch.lock`` (held by the process that submits into ROOT, and by a local launch
while its jobs run), and the status of each cell read from both, the files and the engine.

Status per cell: ``done`` (every file it writes exists), ``running`` (its job is queued or running: sacct says so
for SLURM; for a local or inline launch, the launch that runs it still holds the lock), ``failed`` (its last job
ended without its files, or it cannot run: the record says why and names the job's log), ``pending`` (never
submitted, or stopped before it ended). A rerun submits the failed and pending cells only.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkd.errors import ClipkdError
from clipkd.fileio import OutputError, os_error_message
from clipkd.locks import HolderLock

RECORD_FILE = "launch.jsonl"
LOCK_FILE = "launch.lock"
ENGINE_DIR = ".launch"  # submitit's own files (pickles, job stdout/stderr) under ROOT
STATES = ("done", "running", "failed", "pending")
# sacct states of a job that has not ended (it may still write the cell)
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "READY"}


class LaunchLock(HolderLock):
    """``ROOT/launch.lock``: held while jobs are submitted into ROOT, and by a local launch until its jobs end. The
    file stays when released (unlinking it would race with the next holder); the flock goes."""

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(Path(root) / LOCK_FILE)

    def acquire(self) -> None:  # type: ignore[override]
        super().acquire(lambda holder: ClipkdError(
            f"{self.path.parent} is in use by another launch ({self.path}, held by {holder}); wait for it to end, "
            "or launch into another root"))

    def __enter__(self) -> "LaunchLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def append(root: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append records to ``ROOT/launch.jsonl``, each one whole line (written with one ``write``, O_APPEND)."""
    path = Path(root) / RECORD_FILE
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    text = "".join(json.dumps({"time": stamp, **r}, sort_keys=True) + "\n" for r in records)
    if not text:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(os_error_message(path, exc, "write")) from exc


def read(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``ROOT/launch.jsonl`` (a line cut by a crash is skipped)."""
    path = Path(root) / RECORD_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "cell" in row:
            out.append(row)
    return out


@dataclass
class CellStatus:
    cell: str
    state: str  # one of STATES
    detail: str = ""
    log: str = ""


def slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """sacct's state of each job (``123`` or array task ``123_4``), through submitit's sacct reader; jobs sacct
    does not know are left out. No sacct on PATH: nothing known."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher()
    for job_id in ids:
        watcher.register_job(job_id)
    command = watcher._make_command()
    try:
        output = subprocess.run(command, capture_output=True, check=True, timeout=120).stdout if command else b""
    except (OSError, subprocess.SubprocessError):
        return {}
    info = watcher.read_info(output)
    return {j: info[j].get("State", "").split()[0] for j in ids if info.get(j, {}).get("State")}


def status(root: str | os.PathLike, outputs: dict[str, tuple[str, ...]] | None = None,
           local_live: bool | None = None) -> list[CellStatus]:
    """Each cell's state, in the order cells were first planned; ``outputs`` (cell -> its files) adds or
    overrides what the records say a cell writes (a launch about to submit knows its own cells). ``local_live``:
    whether a local or inline launch still runs its jobs (default: whether someone holds the root's lock)."""
    records = read(root)
    files: dict[str, tuple[str, ...]] = {}
    last_job: dict[str, dict[str, Any]] = {}
    for row in records:
        if "outputs" in row:
            files[row["cell"]] = tuple(row["outputs"])
        if row.get("state") != "planned":
            last_job[row["cell"]] = row
    files.update(outputs or {})
    slurm = slurm_states(r["job"] for r in last_job.values()
                         if r.get("launcher") == "slurm" and r.get("job") and r.get("state") == "submitted")
    if local_live is None:
        local_live = LaunchLock(root).holder() is not None
    out = []
    for cell, paths in files.items():
        row = last_job.get(cell, {})
        log = row.get("log", "")
        job = f"{row.get('launcher')} job {row['job']}" if row.get("job") else ""
        if paths and all(Path(p).is_file() for p in paths):
            out.append(CellStatus(cell, "done", job))
        elif row.get("state") == "error":
            out.append(CellStatus(cell, "failed", row.get("reason", ""), log))
        elif row.get("state") == "failed":
            out.append(CellStatus(cell, "failed", f"{job}: {row.get('reason', 'ended without its results')}", log))
        elif row.get("launcher") == "slurm" and row.get("state") == "submitted":
            state = slurm.get(row["job"])
            if state in SLURM_ACTIVE:
                out.append(CellStatus(cell, "running", f"{job}, {state}", log))
            elif state:
                out.append(CellStatus(cell, "failed", f"{job} ended {state} without its results", log))
            else:
                out.append(CellStatus(cell, "pending", f"{job} unknown to sacct", log))
        elif row.get("state") in ("submitted", "running") and local_live:
            out.append(CellStatus(cell, "running", job, log))
        elif row.get("state") in ("submitted", "running", "finished"):
            out.append(CellStatus(cell, "pending", f"{job} stopped before its results", log))
        else:
            out.append(CellStatus(cell, "pending"))
    return out


def status_lines(root: str | os.PathLike, cells: list[CellStatus]) -> list[str]:
    counts = {s: sum(c.state == s for c in cells) for s in STATES}
    lines = [f"{root}: {len(cells)} cells: " + ", ".join(f"{counts[s]} {s}" for s in STATES)]
    for c in cells:
        detail = f"  ({c.detail})" if c.detail else ""
        log = f"  log: {c.log}" if c.state == "failed" and c.log else ""
        lines.append(f"  {c.state:<8} {c.cell}{detail}{log}")
    return lines
