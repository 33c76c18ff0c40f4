"""A lock file that names its holder, for folders that one process at a time may write into: a run folder
(``.lock``, :class:`clipkd.rundir.RunDir`) and a launch root (``launch.lock``, :mod:`clipkd.launch.state`).

It is an flock, so the kernel releases it when its holder dies: a killed process never leaves a folder locked, and
the next process takes the lock over. The file holds the holder's pid, host and start time, which a refused
process names in its error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from clipkd.fileio import OutputError, os_error_message


class HolderLock:
    """``path`` as an exclusive flock. ``remove_on_release``: unlink the file when released (a run folder keeps
    no trace); a holder that finds the file it locked unlinked meanwhile takes the new one instead."""

    def __init__(self, path: str | os.PathLike, remove_on_release: bool = False) -> None:
        self.path = Path(path)
        self.remove_on_release = remove_on_release
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Held by this object (this process)."""
        return self._fd is not None

    def holder(self) -> str | None:
        """Who holds the lock now ("process PID on HOST (since TIME)"), or None when nobody does; creates nothing."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the close below
        except OSError:
            return _read_holder(fd)
        finally:
            os.close(fd)
        return None

    def acquire(self, busy: Callable[[str], Exception]) -> None:
        """Hold the lock (its folder is created), or raise ``busy(holder)``: the caller's one-line error."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(os_error_message(self.path.parent, exc, "create")) from exc
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(os_error_message(self.path, exc, "create")) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(os_error_message(self.path, exc, "lock")) from exc
                raise busy(holder) from None
            try:  # the file we locked may have been unlinked by its previous holder meanwhile: retry then
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        if self.remove_on_release:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"
