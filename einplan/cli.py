"""The ``einplan`` command line: argument parsing only. Each subcommand lives in
:mod:`einplan.commands` and calls the API (:mod:`einplan.api`) to do the work."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator

from einplan._version import __version__
from einplan.commands import COMMANDS
from einplan.errors import EinplanError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default, left out where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose help shows defaults; subcommand parsers are of this class
    too, and take ``-q/--quiet`` after the subcommand as well as before it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if "prog" in kwargs and kwargs["prog"] != "einplan":
            self.add_argument(
                "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP
            )


QUIET_HELP = "print only results (generated text, reports) and errors: no progress or summaries"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    p = Parser(
        prog="einplan",
        description="Compile Llama-family models into einsum plans and run them on NumPy.",
    )
    p.add_argument("-V", "--version", action="version", version=f"einplan {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"einplan.commands.{name}").register(sub)
    return p


@contextlib.contextmanager
def quiet_output(quiet: bool) -> Iterator[None]:
    """Send what a command prints (progress bars, summaries, ``wrote`` lines) nowhere when
    ``quiet``; results go to ``args.stdout``, errors are printed after it ends."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        with contextlib.redirect_stderr(null):
            yield


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``einplan`` console script: returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse has printed
        return e.code if isinstance(e.code, int) else 2
    args.stdout = sys.stdout
    try:
        with quiet_output(args.quiet):
            args.func(args)
    except EinplanError as e:
        print(f"einplan: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the helpers did not name: read-only folder, disk full, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"einplan: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("einplan: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
