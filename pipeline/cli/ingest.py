"""`mfpipe ingest`: MovieLens files -> a validated, hive-partitioned Parquet dataset."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli._cluster_args import add_cluster_arguments, check_workers
from pipeline.errors import PipelineError
from pipeline.publish import check_destination

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="validate MovieLens ratings and write them as partitioned Parquet",
        description="Read a MovieLens folder, ratings file (e.g. u1.base), .zip or .gz, "
        "validate every line and publish ratings, movies, rejects, vocabulary and a "
        "manifest under --out.",
    )
    parser.add_argument("source", type=Path, metavar="SOURCE", help="folder, file, .zip or .gz")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="dataset folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    parser.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="fail when more than this fraction of a file's lines is rejected (default 0.01)",
    )
    parser.add_argument(
        "--user-buckets",
        type=int,
        default=16,
        metavar="N",
        help="ratings partitions, user_bucket = user_id %% N (default 16)",
    )
    add_cluster_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `mfpipe --help` stays quick.
    from pipeline.cluster import connect
    from pipeline.ingest import ingest

    check_workers(args.workers)
    # Refuse before starting a cluster; ingest() checks again.
    check_destination(args.out, args.overwrite)
    if not args.source.exists():
        raise PipelineError(f"{args.source}: no such file or folder")
    with connect(args.scheduler, args.workers) as client:
        dataset = ingest(
            args.source,
            args.out,
            client,
            overwrite=args.overwrite,
            max_reject_fraction=args.max_reject_fraction,
            n_buckets=args.user_buckets,
        )
    counts = dataset.manifest["counts"]["ratings_files"][0]
    print(
        f"{dataset.path}: {dataset.manifest['ratings']:,} ratings, "
        f"{dataset.manifest['users']:,} users, {dataset.manifest['movies']:,} movies, "
        f"{counts['rejected']:,} rejected, {counts['duplicates_dropped']:,} duplicates dropped"
    )
    return 0
