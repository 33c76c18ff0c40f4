"""A run's logs: ``log.txt`` for people, ``metrics.jsonl`` for programs, TensorBoard when asked.

All of clipkd speaks through stdlib ``logging`` under the ``clipkd`` logger; the CLI configures the console
once (:func:`setup_console_logging`) and each run adds its ``log.txt`` as a handler for its duration, so the
file also holds what else clipkd reported meanwhile (warnings, and progress where the console shows it). The
run's own lines always reach its file; they reach the console only when the run echoes (not the demo's or
tests' runs), and only through handlers the application configured (clipkd never sets a level on its own
outside the CLI).

A write that fails (a full disk) is an :class:`~clipkd.fileio.OutputError` naming the file, raised where the
line was written, not the logging module's "--- Logging error ---" report; a ``metrics.jsonl`` line is written
whole or not at all, so the lines before it stay readable.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from clipkd.errors import ConfigError
from clipkd.fileio import OutputError, os_error_message, write_failure

LOGGER = "clipkd"
_RUN_LINE = "clipkd_run_line"  # a RunLog line: already in the run's file, so its file handler skips it
log = logging.getLogger(LOGGER)


class _NotRunLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _RUN_LINE, False)


class _Console(logging.StreamHandler):
    """The CLI's console handler: writes to whatever ``sys.stderr`` is at the time (pytest swaps it per
    test); a class of its own, so it is installed once."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


class _RunFile(logging.FileHandler):
    """``log.txt``: a failed write raises an OutputError naming the file (logging would print a traceback and
    go on); closing after such a failure does not raise a second time."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        failure = write_failure(sys.exc_info()[1])
        if failure is None:
            super().handleError(record)
            return
        raise OutputError(os_error_message(self.baseFilename, failure)) from failure

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the buffered rest of a line the full disk refused: already reported
            pass


class _MetricsFile:
    """``metrics.jsonl``, appended line by line, unbuffered: a line the disk refuses is cut off again, so the
    file ends with the last complete line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "ab", buffering=0)

    def append(self, line: str) -> None:
        data = memoryview(line.encode("utf-8"))
        start = self._f.seek(0, 2)
        try:
            while data:
                data = data[self._f.write(data):]
        except OSError as exc:
            try:
                self._f.truncate(start)
            except OSError:
                pass
            raise OutputError(os_error_message(self.path, exc)) from exc

    def close(self) -> None:
        self._f.close()


def setup_console_logging(level: int = logging.INFO) -> None:
    """Console output for the ``clipkd`` command: messages on stderr, and the ``py.warnings`` logger's (where
    the command sends warnings while it runs) on the same handler.
    Idempotent; library users who never call it get no console output from clipkd below WARNING."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    logger.propagate = False  # the CLI owns the console: no second copy through a root handler
    if not any(isinstance(h, _Console) for h in logger.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        warnings_logger = logging.getLogger("py.warnings")
        warnings_logger.addHandler(handler)
        warnings_logger.propagate = False


def require_tensorboard() -> None:
    """Fail before a run writes anything when TensorBoard logging was asked for but is not installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'clipkd[tensorboard]'")


class RunLog:
    """Writes one run's log lines and metrics; a ``RunLog(None)`` (ranks other than 0) writes nothing."""

    def __init__(self, folder: str | Path | None, *, echo: bool = True, tensorboard: bool = False) -> None:
        self.echo = echo
        self._file: logging.Handler | None = None
        self._jsonl = None
        self._tb = None
        if folder is None:
            return
        folder = Path(folder)
        try:
            self._file = _RunFile(folder / "log.txt", mode="a", encoding="utf-8")
            self._jsonl = _MetricsFile(folder / "metrics.jsonl")
        except OSError as exc:
            self.close()
            raise OutputError(os_error_message(exc.filename or folder, exc, "open")) from exc
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self._file.addFilter(_NotRunLines())
        log.addHandler(self._file)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # require_tensorboard() checked it at set-up

            self._tb = SummaryWriter(str(folder / "tensorboard"))

    def info(self, *lines: str) -> None:
        """Lines of this run (e.g. a result block, together): always into ``log.txt``; to the console too when
        the run echoes."""
        if self._file is None:
            return
        for message in lines:
            self._file.emit(logging.LogRecord(LOGGER, logging.INFO, __file__, 0, message, None, None))
            if self.echo:
                log.info(message, extra={_RUN_LINE: True})

    def metrics(self, kind: str, **values: Any) -> None:
        if self._jsonl is None:
            return
        self._jsonl.append(json.dumps({"kind": kind, "time": round(time.time(), 3), **values}) + "\n")
        if self._tb is not None:
            step = values.get("global_step", values.get("epoch", 0))
            for name, value in _scalars(values):
                if name not in ("epoch", "step", "global_step"):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            log.removeHandler(self._file)
            self._file.close()
            self._file = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _scalars(values: dict, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", float(value)))
    return out
