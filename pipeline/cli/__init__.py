"""The `mfpipe` command line.

Each public module of this package is one subcommand and defines
``register(subparsers) -> None``, which adds its parser and sets ``handler`` (a function of
the parsed arguments returning an exit code or None).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from pipeline import __version__
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand found in this package."""
    parser = argparse.ArgumentParser(
        prog="mfpipe", description="Learn user and movie embeddings from ratings on Dask."
    )
    parser.add_argument("--version", action="version", version=f"mfpipe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}").register(subparsers)
    return parser


def configure_logging(debug: bool, quiet: bool) -> None:
    """Plain timestamped log lines on stderr; INFO by default."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not debug:
        for noisy in ("distributed", "numba", "asyncio", "tornado", "bokeh", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a user-facing error is one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug, args.quiet)
    try:
        return int(args.handler(args) or 0)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"mfpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mfpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"mfpipe {args.command}: unexpected {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
