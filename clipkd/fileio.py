"""The one way clipkd writes a file: atomically, with a unique temp name, and errors that name the path.

A reader (another run, a resumed run, ``clipkd report``) sees the old file or the new one, never half of
one. The temp file is ``.<name>.<random>.tmp`` beside the target, so two writers never share it, and it is
removed when the write fails; a temp file left by a process killed mid-write is recognised by
:func:`stale_temp_files`. Torch-free, so the data commands can use it.

A full disk reaches the writer as an ``OSError`` (ENOSPC), except under ``torch.save``: torch's stream writer
swallows the failed write and raises ``RuntimeError("... unexpected pos N vs M")`` (or "PytorchStreamWriter
failed writing ..."). :func:`atomic_write` turns those, and only those, into the same :class:`OutputError`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from clipkd.errors import ClipkdError

TEMP_SUFFIX = ".tmp"


class OutputError(ClipkdError):
    """A file or folder that cannot be written (disk full, read-only, not a folder)."""


def os_error_message(path: str | os.PathLike, exc: OSError, doing: str = "write") -> str:
    """``cannot write PATH: No space left on device`` and what to do about it."""
    reason = exc.strerror or type(exc).__name__
    hint = {
        28: "free some space or pick another --output-dir",  # ENOSPC
        13: "check the folder's permissions or pick another --output-dir",  # EACCES
        30: "the file system is read-only; pick another --output-dir",  # EROFS
        20: "a parent of this path is a file, not a folder",  # ENOTDIR
    }.get(exc.errno or 0, "")
    return f"cannot {doing} {path}: {reason}" + (f"; {hint}" if hint else "")


# torch.save's messages when a write of its stream writer failed (a full disk or quota): matched narrowly, so
# that any other RuntimeError from a writer still surfaces as what it is.
_TORCH_WRITE_FAILED = ("unexpected pos ", "PytorchStreamWriter failed writing")


def write_failure(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``exc`` itself, or the one behind torch.save's RuntimeError
    (its Python file's own error when torch kept it, else ENOSPC, what a short write means); None otherwise."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_FAILED):
        cause = exc.__context__
        return cause if isinstance(cause, OSError) else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def atomic_write(path: str | os.PathLike, writer: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``writer(file)`` into a unique temp file, then rename it into place."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.fchmod(fd, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        raise OutputError(os_error_message(path, failure)) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Temp files an interrupted :func:`atomic_write` left in ``folder`` (only safe to delete when no other
    process writes there, e.g. under a run's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))
