"""`mfpipe recommend MODEL DATA --out DIR --top-k K`: top-K movies per user of a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli._cluster_args import add_cluster_arguments, check_workers


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recommend",
        help="write each user's top-K unrated movies as Parquet",
        description="Score every user of MODEL against all movies on the Dask workers and write "
        "the K best movies the user has not rated in DATA (user_id, rank, movie_id, score) "
        "to DIR, published atomically.",
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="model folder (model.json, ...)")
    parser.add_argument(
        "data", type=Path, metavar="DATA", help="ingested dataset whose ratings are excluded"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--top-k", type=int, default=10, metavar="K", help="movies per user (default: 10)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    add_cluster_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import connect
    from pipeline.dataset import open_dataset
    from pipeline.errors import PipelineError
    from pipeline.model import Model
    from pipeline.publish import check_destination, publishing
    from pipeline.recommend import MAX_TOP_K, recommend

    check_workers(args.workers)
    if not 1 <= args.top_k <= MAX_TOP_K:
        raise PipelineError(f"--top-k must be between 1 and {MAX_TOP_K}, got {args.top_k}")
    check_destination(args.out, args.overwrite)
    model = Model.load(args.model)
    dataset = open_dataset(args.data)
    with (
        connect(args.scheduler, args.workers) as client,
        publishing(args.out, overwrite=args.overwrite) as staging,
    ):
        stats = recommend(model, client, staging, top_k=args.top_k, exclude=dataset)
    print(f"{stats['rows']:,} recommendations for {stats['users']:,} users in {args.out}")
    return 0
