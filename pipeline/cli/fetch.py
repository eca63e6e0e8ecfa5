"""`mfpipe fetch`: download and verify a GroupLens MovieLens archive."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import fetch


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `fetch` subcommand."""
    parser = subparsers.add_parser(
        "fetch",
        help="download a MovieLens archive, check its MD5 and extract it",
        description="Download NAME.zip and NAME.zip.md5, compare the checksums, refuse unsafe "
        "members, and extract the archive's files into DIR atomically. Known names: "
        + ", ".join(fetch.DATASETS)
        + ".",
    )
    parser.add_argument("name", metavar="NAME", help="dataset name, e.g. ml-25m")
    parser.add_argument(
        "--to", type=Path, required=True, metavar="DIR", help="folder to create with the files"
    )
    parser.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help=f"mirror holding NAME.zip and NAME.zip.md5 (default: ${fetch.BASE_URL_ENV}, "
        f"else {fetch.DEFAULT_BASE_URL})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Fetch and print the destination on stdout."""
    dest = fetch.fetch(args.name, args.to, base_url=args.base_url, overwrite=args.overwrite)
    print(dest)
    return 0
