"""The ``einplan`` command line: argument parsing only. Each subcommand lives in
:mod:`einplan.commands` and calls the API (:mod:`einplan.api`) to do the work."""

from __future__ import annotations

import argparse
import importlib
import sys

from einplan._version import __version__
from einplan.commands import COMMANDS
from einplan.errors import EinplanError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    p = argparse.ArgumentParser(
        prog="einplan",
        description="Compile Llama-family models into einsum plans and run them on NumPy.",
    )
    p.add_argument("--version", action="version", version=f"einplan {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"einplan.commands.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``einplan`` console script: returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
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
