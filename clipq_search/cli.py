"""The command line: ``run_search.py`` / ``clipq-search``.

A thin shell over the package: it parses flags, calls one function per
command, and turns a ``ClipQError`` into one line on stderr and exit code 2
(a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from clipq_search.errors import ClipQError, shown

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a positive integer (must be >= 1)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line naming the problem, plus where to look for the fix.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cmd_inspect(args: argparse.Namespace) -> None:
    from clipq_search.analysis.text import format_size_table
    from clipq_search.core.encoding import read_compressed

    _, sizes = read_compressed(args.file)
    print(format_size_table(sizes, title=str(args.file)))


def _add_space_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="search-space YAML file, or a preset name (clipq-search spaces)")
    from clipq_search.commands import add_overrides

    add_overrides(p, "override a space value, e.g. --set trial.train.epochs=2 (repeatable)")
    p.add_argument("--results", default="results", help="results root (default: results/)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="clipq-search",
        description="CLIP-Q compression with a Bayesian per-layer search on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="print the per-layer table of a .clipq file")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)

    from clipq_search import commands

    commands.register(sub, _add_space_args, _positive_int)
    for command in sub.choices.values():  # --debug before or after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    if args.debug:  # Ray Tune then prints each failed trial's traceback too
        os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "1"
    try:
        return int(func(args) or 0)
    except ClipQError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the command could not read or write (permissions, a folder, a full disk)
        if args.debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the path, its permissions and free space", file=sys.stderr)
        return 2
    except Exception as exc:
        # Last resort for Ray: whatever of it reaches here (a worker killed, a node lost) is one line, not a traceback.
        from clipq_search.search.cluster import first_line
        from clipq_search.search.worker_kills import is_ray_error, kill_reason

        if not is_ray_error(exc):
            raise
        if args.debug:
            traceback.print_exc()
        why = kill_reason(exc) or first_line(exc)
        print(f"error: Ray failed ({why}); finished work is saved: rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        try:
            print("interrupted: finished work is saved; run the same command again to continue", file=sys.stderr)
        except KeyboardInterrupt:  # a second Ctrl-C while saying so
            pass
        return 130


if __name__ == "__main__":
    sys.exit(main())
