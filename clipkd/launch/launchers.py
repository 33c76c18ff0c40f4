"""The engines that run a launch's jobs: ``inline`` (one after another in this process), ``local`` (this machine,
through submitit's LocalExecutor: at most one job per GPU, pinned with CUDA_VISIBLE_DEVICES, or ``--jobs K`` on
CPU) and ``slurm`` (submitit's SlurmExecutor: one job array, a parallelism cap, requeue on time-out).

Every launch first checks its options (one line per problem, before anything is written), then, holding
``ROOT/launch.lock``, leaves out the finished cells and those whose job still runs, records the rest in
``ROOT/launch.jsonl`` and submits them. A cell whose folder holds a run started with other settings is reported,
never submitted (:func:`clipkd.launch.cells.check_started`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkd.errors import ClipkdError
from clipkd.launch import state
from clipkd.launch.cells import Job, check_started
from clipkd.launch.jobs import CellJob, clipkd_executable

LAUNCHERS = ("inline", "local", "slurm")
INSTALL = "pip install 'clipkd[cluster]'"
NO_LIMIT_MIN = 365 * 24 * 60  # a local job's time limit when --time is not given
SLURM_TIME_MIN = 24 * 60  # a SLURM job's --time when not given
MAX_ARRAY = 1000  # jobs per sbatch array (SLURM's default MaxArraySize is 1001)
_NAME = re.compile(r"^[A-Za-z0-9_.:+@,&|!()-]+$")  # partition, account, qos, constraint: one token, no spaces
_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?$")


@dataclass
class Resources:
    """What each job asks for, and how many run at once (``jobs``: local, concurrent jobs; slurm, the array's
    parallelism cap)."""

    launcher: str = "inline"
    jobs: int | None = None
    gpus: list[int] | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    slurm: list[str] = field(default_factory=list)
    requeues: int = 3

    @property
    def minutes(self) -> int | None:
        return None if self.time is None else parse_time(self.time)


def parse_time(text: str) -> int:
    """``--time``: minutes, or SLURM's ``[D-]HH:MM[:SS]``; whole minutes, at least 1."""
    text = str(text).strip()
    if text.isdigit():
        minutes = int(text)
    else:
        m = _TIME.match(text)
        if not m:
            raise ClipkdError(f"--time {text}: give minutes (e.g. 240) or [D-]HH:MM[:SS] (e.g. 4:00:00, 1-12:00)")
        days, hours, mins, secs = (int(g or 0) for g in m.groups())
        minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
    if minutes <= 0:
        raise ClipkdError(f"--time {text}: a job needs at least one minute")
    return minutes


def check(res: Resources, engine: bool = True) -> None:
    """Every option problem as one line, before anything is written or submitted; ``engine``: also that the
    launcher's tools are there (submitit; sbatch and srun for slurm), which a dry run does not need."""
    if res.launcher not in LAUNCHERS:
        raise ClipkdError(f"unknown --launcher '{res.launcher}'; choose one of {', '.join(LAUNCHERS)}")
    for name, value in (("--jobs", res.jobs), ("--cpus-per-job", res.cpus_per_job), ("--mem", res.mem_gb)):
        if value is not None and not value > 0:
            raise ClipkdError(f"{name} {value}: must be > 0")
    if res.gpus_per_job is not None and res.gpus_per_job < 0:
        raise ClipkdError(f"--gpus-per-job {res.gpus_per_job}: must be >= 0 (0: a CPU job)")
    if res.requeues < 0:
        raise ClipkdError(f"--requeues {res.requeues}: must be >= 0")
    if res.gpus is not None and (any(g < 0 for g in res.gpus) or len(set(res.gpus)) != len(res.gpus)):
        raise ClipkdError(f"--gpus {','.join(map(str, res.gpus))}: distinct GPU indices >= 0")
    res.minutes  # noqa: B018 - parses --time
    for name, value in (("--partition", res.partition), ("--account", res.account), ("--qos", res.qos),
                        ("--constraint", res.constraint)):
        if value is not None and not _NAME.match(value):
            raise ClipkdError(f"{name} {value!r}: one name without spaces (e.g. --partition gpu)")
    slurm_only = [n for n, v in (("--partition", res.partition), ("--account", res.account), ("--qos", res.qos),
                                 ("--constraint", res.constraint), ("--slurm", res.slurm)) if v]
    if slurm_only and res.launcher != "slurm":
        raise ClipkdError(f"{slurm_only[0]} is for --launcher slurm (this launch is {res.launcher})")
    if res.gpus is not None and res.launcher != "local":
        raise ClipkdError("--gpus picks this machine's GPUs, for --launcher local (SLURM: --gpus-per-job)")
    for name, value in (("--mem", res.mem_gb), ("--cpus-per-job", res.cpus_per_job)):
        if value is not None and res.launcher == "local":
            raise ClipkdError(f"{name} is for --launcher slurm (local jobs share this machine's memory and cores)")
    slurm_options(res)  # --slurm KEY=VALUE
    if res.launcher == "inline":
        for name, value in (("--jobs", res.jobs), ("--cpus-per-job", res.cpus_per_job), ("--mem", res.mem_gb),
                            ("--time", res.time), ("--gpus-per-job", res.gpus_per_job)):
            if value is not None:
                raise ClipkdError(f"{name} is for --launcher local or slurm (inline runs one cell after another "
                                  "in this process)")
        return
    if not engine:
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ClipkdError(f"--launcher {res.launcher} needs submitit: {INSTALL}") from None
    if res.launcher == "slurm":
        for tool in ("sbatch", "srun"):
            if shutil.which(tool) is None:
                raise ClipkdError(f"--launcher slurm: {tool} not found on PATH; run this on a SLURM login node, or "
                                  "use --launcher local")


def slurm_options(res: Resources) -> dict[str, str]:
    """``--slurm KEY=VALUE`` as sbatch options (``--KEY=VALUE``)."""
    out = {}
    for item in res.slurm:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not _KEY.match(key) or not value or "\n" in value:
            raise ClipkdError(f"--slurm {item!r}: give KEY=VALUE, an sbatch option without its dashes (e.g. "
                              "--slurm mail-type=END)")
        out[key] = value
    return out


def local_gpus(res: Resources) -> list[int]:
    """The GPUs a local launch spreads its jobs over: --gpus, else those CUDA_VISIBLE_DEVICES lists, else all torch
    sees (none: CPU jobs)."""
    if res.gpus is not None:
        return list(res.gpus)
    if res.gpus_per_job == 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # each job's CUDA_VISIBLE_DEVICES is a subset of these
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if not all(v.isdigit() for v in entries):
            raise ClipkdError(f"CUDA_VISIBLE_DEVICES={visible} names GPUs by UUID; pass --gpus 0,1,... (indices)")
        return [int(v) for v in entries]
    try:
        import torch
    except ImportError:
        return []
    return list(range(torch.cuda.device_count()))


# ----------------------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    submit: list[Job]
    done: int = 0
    running: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def plan(jobs: Sequence[Job], root: Path, live: bool | None = None) -> Plan:
    """Which jobs to submit: those with a cell neither finished nor running, whose started runs (if any) are
    this launch's config; ``errors``: the cells that cannot run, with why."""
    outputs = {c.name: c.outputs for j in jobs for c in j.cells}
    now = {s.cell: s.state for s in state.status(root, outputs, local_live=live)}
    out = Plan([])
    for job in jobs:
        states = [now.get(c.name, "pending") for c in job.cells]
        if all(s == "done" for s in states):
            out.done += len(states)
            continue
        if "running" in states:
            out.running += len(states)
            continue
        problems = []
        for step in job.steps:
            if step.kind == "train":
                try:
                    check_started(step)
                except ClipkdError as exc:
                    problems.append(str(exc))
        if problems:
            out.errors += [(c.name, problems[0]) for c in job.cells]
        else:
            out.submit.append(job)
    return out


def launch(jobs: Sequence[Job], root: str | os.PathLike, res: Resources, *,
           say: Callable[[str], None] = print, poll_s: float = 0.5) -> int:
    """Run or submit ``jobs`` under ``root``; 0 when nothing failed (for SLURM: when all were submitted)."""
    check(res)
    root = Path(root)
    exe = clipkd_executable()
    with state.LaunchLock(root):
        p = plan(jobs, root, live=False)
        known = {r["cell"]: r["outputs"] for r in state.read(root) if "outputs" in r}
        planned = [{"cell": c.name, "state": "planned", "outputs": list(c.outputs), "launcher": res.launcher}
                   for j in jobs for c in j.cells if known.get(c.name) != list(c.outputs)]  # new cells only
        errors = [{"cell": cell, "state": "error", "reason": why, "launcher": res.launcher} for cell, why in p.errors]
        state.append(root, [*planned, *errors])
        say(f"launch: {sum(len(j.cells) for j in jobs)} cells: {p.done} finished, {p.running} running, "
            f"{len(p.errors)} cannot run, {sum(len(j.cells) for j in p.submit)} to run in {len(p.submit)} jobs "
            f"({res.launcher})")
        for cell, why in p.errors:
            say(f"  cannot run {cell}: {why}")
        if p.submit:
            run = {"inline": _inline, "local": _local, "slurm": _slurm}[res.launcher]
            failed = run(p.submit, root, res, exe, say, poll_s)
        else:
            failed = 0
    say(f"status: clipkd launch status {shlex.quote(str(root))}")
    return 1 if failed or p.errors else 0


def _record(root: Path, job: Job, st: str, res: Resources, job_id: str = "", **extra: Any) -> None:
    state.append(root, [{"cell": c.name, "state": st, "launcher": res.launcher, "job": job_id, "log": job.log,
                         **extra} for c in job.cells])


def _reason(exc: BaseException | None) -> str:
    """One line from a job's error (our JobFailed line when the trace holds it)."""
    text = str(exc or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "JobFailed:" in line:
            return line.split("JobFailed:", 1)[1].strip()
    return (lines[-1] if lines else "the job ended without its results")[:300]


def _inline(jobs: list[Job], root: Path, res: Resources, exe: list[str], say: Callable[[str], None],
            poll_s: float) -> int:
    failed = 0
    for i, job in enumerate(jobs, 1):
        say(f"[{i}/{len(jobs)}] run {job.name}  (log {job.log})")
        _record(root, job, "running", res, str(os.getpid()))
        try:
            CellJob(job, exe)()
        except ClipkdError as exc:
            failed += 1
            _record(root, job, "failed", res, str(os.getpid()), reason=str(exc))
            say(f"[{i}/{len(jobs)}] failed {job.name}: {exc}")
            continue
        _record(root, job, "finished", res, str(os.getpid()))
    return failed


def _local(jobs: list[Job], root: Path, res: Resources, exe: list[str], say: Callable[[str], None],
           poll_s: float) -> int:
    """At most one job per GPU slot (or ``--jobs`` on CPU) at a time: submitit's LocalExecutor starts each job at
    once, so this loop submits the next job when one ends."""
    import submitit

    gpus = local_gpus(res)
    per = (res.gpus_per_job if res.gpus_per_job is not None else 1) if gpus else 0
    if per > len(gpus):
        raise ClipkdError(f"--gpus-per-job {per}: this machine has {len(gpus)} GPUs for the launch")
    slots = len(gpus) // per if per else (res.jobs or 1)
    slots = min(slots, res.jobs or slots)
    executor = submitit.LocalExecutor(folder=root / state.ENGINE_DIR / "local", max_num_timeout=res.requeues)
    queue, running, free, failed, started = list(jobs), {}, list(gpus), 0, 0
    say(f"local: {slots} jobs at a time" + (f", {per} GPU each of {gpus}" if per else " on CPU"))
    try:
        while queue or running:
            while queue and len(running) < slots:
                job = queue.pop(0)
                use, free = free[:per], free[per:]
                executor.update_parameters(timeout_min=res.minutes or NO_LIMIT_MIN, gpus_per_node=len(use),
                                           visible_gpus=tuple(use))
                sub = executor.submit(CellJob(job, exe))
                running[sub] = (job, use)
                _record(root, job, "running", res, str(sub.job_id), gpus=use)
                on = f"GPU {','.join(map(str, use))}" if use else "CPU"
                started += 1
                say(f"[{started}/{len(jobs)}] start {job.name} (local job {sub.job_id}, {on})")
            time.sleep(poll_s)
            for sub in [s for s in running if s.done()]:
                job, use = running.pop(sub)
                free = sorted([*free, *use])
                exc = sub.exception()
                if exc is None and all(c.finished for c in job.cells):
                    _record(root, job, "finished", res, str(sub.job_id))
                    say(f"done {job.name}")
                else:
                    failed += 1
                    _record(root, job, "failed", res, str(sub.job_id), reason=_reason(exc))
                    say(f"failed {job.name}: {_reason(exc)}  (log {job.log})")
    except KeyboardInterrupt:
        for sub, (job, _) in running.items():
            sub.cancel()
            _record(root, job, "stopped", res, str(sub.job_id))
        raise
    return failed


def slurm_parameters(res: Resources, n_jobs: int, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of one launch: the sbatch lines every job of the array gets."""
    params: dict[str, Any] = {"job_name": name, "time": res.minutes or SLURM_TIME_MIN,
                              "gpus_per_node": 1 if res.gpus_per_job is None else res.gpus_per_job,
                              "array_parallelism": min(res.jobs or n_jobs, n_jobs) or 1,
                              "additional_parameters": {"requeue": True, **slurm_options(res)}}
    for key, value in (("partition", res.partition), ("cpus_per_task", res.cpus_per_job), ("account", res.account),
                       ("qos", res.qos), ("constraint", res.constraint)):
        if value is not None:
            params[key] = value
    if res.mem_gb is not None:
        params["mem"] = f"{int(res.mem_gb)}GB" if res.mem_gb == int(res.mem_gb) else f"{int(res.mem_gb * 1024)}MB"
    if params["gpus_per_node"] == 0:
        del params["gpus_per_node"]
    return params


def _slurm(jobs: list[Job], root: Path, res: Resources, exe: list[str], say: Callable[[str], None],
           poll_s: float) -> int:
    """One sbatch array per (up to) :data:`MAX_ARRAY` jobs; each job requeues itself on time-out
    (:meth:`CellJob.checkpoint`) at most ``--requeues`` times, and SLURM requeues preempted jobs (``--requeue``)."""
    import submitit

    executor = submitit.SlurmExecutor(folder=root / state.ENGINE_DIR / "slurm", max_num_timeout=res.requeues)
    for start in range(0, len(jobs), MAX_ARRAY):
        chunk = jobs[start:start + MAX_ARRAY]
        executor.update_parameters(**slurm_parameters(res, len(chunk), f"clipkd-{root.name}"))
        try:
            with executor.batch():
                subs = [executor.submit(CellJob(job, exe)) for job in chunk]
        except Exception as exc:  # noqa: BLE001 - sbatch's own message, on one line
            raise ClipkdError(f"sbatch refused the jobs: {_reason(exc)} ({start} of {len(jobs)} jobs were "
                              "submitted before)") from None
        for job, sub in zip(chunk, subs):
            _record(root, job, "submitted", res, str(sub.job_id), engine_log=str(sub.paths.stdout))
        array = str(subs[0].job_id).split("_")[0]
        cap = executor.parameters.get("array_parallelism")
        say(f"slurm: submitted {len(chunk)} jobs" + (f" as array {array} (at most {cap} at once)"
                                                     if len(chunk) > 1 else f" (job {array})"))
    return 0


def print_commands(jobs: Sequence[Job], say: Callable[[str], None] = print) -> None:
    """``--dry-run``: each job's commands, one a line (a job of several steps: joined with &&)."""
    exe = clipkd_executable()
    for job in jobs:
        say(" && ".join(shlex.join(c) for c in CellJob(job, exe).commands()) or f"# {job.name}: nothing to do")

