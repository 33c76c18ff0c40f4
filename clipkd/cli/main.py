"""The ``clipkd`` command line.

Only argparse is imported up front: each subcommand imports what it needs when it runs, so ``--help`` and
the data commands answer in about a second (torch and open_clip take several).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import Sequence

from clipkd import __version__
from clipkd.errors import ClipkdError


# Each command and the module (clipkd.cli.<module>) whose add_parsers adds it, in the order --help lists them.
COMMANDS = {"data": "data_cmd", "train": "train_cmd", "eval": "train_cmd", "demo": "toy_cmd", "toy": "toy_cmd",
            "report": "report_cmd", "analyze": "analyze_cmd", "sweep": "sweep_cmd", "launch": "launch_cmd",
            "config": "config_cmd"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``command`` alone when it is one of :data:`COMMANDS` (a command needs no other's parser,
    and some read data specs or registries to build theirs); every command's otherwise (--help, no or an
    unknown command, whose messages list them all)."""
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    parser = argparse.ArgumentParser(
        prog="clipkd",
        description="CLIP prompt tuning with knowledge distillation (alpha-beta divergence) "
        "for base-to-new generalisation.",
    )
    parser.add_argument("--version", action="version", version=f"clipkd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in modules:
        importlib.import_module(f"clipkd.cli.{module}").add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``clipkd`` command; ``argv`` None reads the process's own command line (and then owns its Ctrl-C)."""
    if argv is None:
        _second_interrupt_exits()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the subcommand
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    args.debug = debug
    _setup_logging(debug)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning  # for this command only: the caller's own is back afterwards
    try:
        return int(args.func(args) or 0)
    except ClipkdError as exc:
        if args.debug:
            raise
        print(f"clipkd: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `clipkd data split --json | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # e.g. a read-only or full disk met outside clipkd's own writes
        if args.debug or exc.filename is None:
            raise
        from clipkd.fileio import os_error_message

        print(f"clipkd: error: {os_error_message(exc.filename, exc, 'access')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _say_interrupted()
        return 130
    finally:
        warnings.showwarning = shown


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """A warning as one console line: ``clipkd: warning: ...``."""
    logging.getLogger("py.warnings").warning("clipkd: warning: %s", message)


_said_interrupted = False


def _say_interrupted() -> None:
    global _said_interrupted
    if not _said_interrupted:
        _said_interrupted = True
        print("clipkd: interrupted", file=sys.stderr, flush=True)


def _second_interrupt_exits() -> None:
    """The first Ctrl-C stops the command as always (KeyboardInterrupt: files closed, lock released, rc 130). A
    second one while it winds down (a double press, milliseconds apart) ends the process at once and quietly:
    otherwise it lands in the clean-up or in the interpreter's wait for threads at exit and prints a traceback.
    Every write is atomic and a resume drops what a killed run left, so stopping there loses nothing."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # someone (an embedding program, a debugger) handles Ctrl-C: theirs to keep

    def again(signum: int, frame: object) -> None:
        _say_interrupted()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)

    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, again)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)


def _setup_logging(debug: bool) -> None:
    """Console logging, once: progress on stderr; under torchrun only rank 0 speaks below WARNING."""
    import os

    from clipkd.engine.runlog import setup_console_logging

    quiet_rank = os.environ.get("RANK", "0") != "0"
    setup_console_logging(logging.DEBUG if debug else logging.WARNING if quiet_rank else logging.INFO)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
