"""The ``clipkd`` command line.

Only argparse is imported up front: each subcommand imports what it needs when it runs, so ``--help`` and
the data commands answer in about a second (torch and open_clip take several).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from clipkd import __version__
from clipkd.errors import ClipkdError


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"clipkd: warning: {message}\n"


def build_parser() -> argparse.ArgumentParser:
    from clipkd.cli import data_cmd, toy_cmd, train_cmd
    from clipkd.cli import report_cmd
    from clipkd.cli import sweep_cmd

    parser = argparse.ArgumentParser(
        prog="clipkd",
        description="CLIP prompt tuning with knowledge distillation (alpha-beta divergence) "
        "for base-to-new generalisation.",
    )
    parser.add_argument("--version", action="version", version=f"clipkd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    data_cmd.add_parser(sub)
    train_cmd.add_parsers(sub)
    toy_cmd.add_parsers(sub)
    report_cmd.add_parsers(sub)
    sweep_cmd.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the subcommand
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    warnings.formatwarning = _format_warning
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
    except KeyboardInterrupt:
        print("clipkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
