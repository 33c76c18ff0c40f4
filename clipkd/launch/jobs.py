"""The callable an engine job runs (pickled by submitit, called on the worker): a :class:`~clipkd.launch.cells.Job`'s
``clipkd`` commands, one after another, each in a child process whose output goes to the job's log.

Resumable by construction: a training step runs ``clipkd train --resume`` once its folder holds a started run, so a
job that is run again (a rerun, a requeue after a time-out or a preemption) continues from ``last.pt``.
:meth:`CellJob.checkpoint` is submitit's requeue hook (:class:`submitit.helpers.Checkpointable`): on the time-out
signal it stops the running command cleanly (Ctrl-C: clipkd closes its files and releases the run's lock) and
returns the same job for resubmission.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from clipkd.errors import ClipkdError
from clipkd.launch.cells import Job
from clipkd.rundir import RunDir

STOP_WAIT_S = 120.0  # how long a stopped command may take to wind down before it is killed
LOCK_POLL_S = 10.0  # how often a job that waits for another job's run folder looks again


class JobFailed(ClipkdError):
    """A step of a job exited non-zero (its log says why)."""


def clipkd_executable() -> list[str]:
    """How jobs call clipkd: ``$CLIPKD`` as the scripts (one executable path), else this Python's ``-m clipkd``
    (the same installation on every node that shares this environment)."""
    exe = os.environ.get("CLIPKD")
    return [exe] if exe else [sys.executable, "-m", "clipkd"]


def _checkpointable() -> type:
    try:
        from submitit.helpers import Checkpointable
    except ImportError:  # inline launches need no submitit
        return object
    return Checkpointable


class CellJob(_checkpointable()):  # type: ignore[misc]
    """Run ``job``'s steps with ``exe`` (:func:`clipkd_executable`), appending their output to ``job.log``."""

    def __init__(self, job: Job, exe: list[str]) -> None:
        self.job = job
        self.exe = list(exe)
        self._proc: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a resubmission starts its own process
        return state

    def commands(self) -> list[list[str]]:
        """The command lines the job would run now (what a dry run prints and tests read)."""
        return [[*self.exe, *args] for step in self.job.steps if (args := step.args_now()) is not None]

    def __call__(self) -> str:
        os.makedirs(os.path.dirname(self.job.log) or ".", exist_ok=True)
        with open(self.job.log, "ab") as log:
            where = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())
            log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.job.name}: job {where} on "
                      f"{socket.gethostname()}\n".encode())
            for step in self.job.steps:
                if step.kind == "train":
                    wait_for_run_dir(step.run_dir, log)
                args = step.args_now()
                if args is None:
                    log.write(f"-- skip {step.output} (exists)\n".encode())
                    continue
                command = [*self.exe, *args]
                log.write(f"$ {shlex.join(command)}\n".encode())
                log.flush()
                rc = self._run(command, log)
                if rc != 0:
                    raise JobFailed(f"{self.job.name}: clipkd {args[0]} exited with {rc}; see {self.job.log}")
        return "done"

    def _run(self, command: list[str], log: Any) -> int:
        """Run one command; a stop of this process (Ctrl-C, an engine's cancel) stops it too."""
        self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      preexec_fn=_ignore_requeue_signal)
        try:
            while (rc := self._proc.poll()) is None:  # poll, never a blocking wait: checkpoint() may run meanwhile
                time.sleep(0.2)
            return rc
        finally:
            self.stop()
            self._proc = None

    def stop(self) -> None:
        """Stop the running command as Ctrl-C would (files closed, the run's lock released), killing it only when
        it has not ended after :data:`STOP_WAIT_S`."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        end = time.monotonic() + STOP_WAIT_S
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on time-out or preemption: stop the command, resubmit this job (which resumes)."""
        from submitit.helpers import DelayedSubmission

        self.stop()
        return DelayedSubmission(CellJob(self.job, self.exe))


def wait_for_run_dir(folder: str | os.PathLike, log: Any) -> None:
    """Wait while another process trains in ``folder`` (its ``.lock`` is held): xd and dg of one seed share the
    ImageNet run, so the second job waits for the first and then resumes or skips it as usual (``clipkd train
    --resume``), where it would fail on the lock."""
    run = RunDir(folder)
    holder = run.holder()
    if holder is None:
        return
    log.write(f"-- {folder} is in use by {holder}: waiting for it to end\n".encode())
    log.flush()
    while run.holder() is not None:
        time.sleep(LOCK_POLL_S)


def _ignore_requeue_signal() -> None:
    """In the child: the engine's time-out signal (USR2) is the job's to handle (:meth:`CellJob.checkpoint`),
    not a reason for clipkd to die mid-write."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
