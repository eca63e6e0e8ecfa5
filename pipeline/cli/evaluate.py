"""`mfpipe evaluate MODEL DATA`: RMSE and MAE of a trained model on any ratings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli._cluster_args import add_cluster_arguments, check_workers
from pipeline.cli._data import check_exists, open_ratings
from pipeline.cluster import connect


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a model on a dataset or ratings file",
        description="RMSE and MAE of MODEL on DATA; unseen users and movies fall back to the "
        "biases and global mean and are counted.",
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="model folder written by train")
    p.add_argument(
        "data", type=Path, metavar="DATA", help="ingested dataset, or ratings file/folder"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_workers(args.workers)
    check_exists(args.model, "MODEL")
    check_exists(args.data)

    from pipeline.evaluate import evaluate
    from pipeline.model import Model

    model = Model.load(args.model)
    with connect(args.scheduler, args.workers) as client, open_ratings(args.data, client) as data:
        result = evaluate(model, data, client)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"RMSE {result['rmse']:.4f}  MAE {result['mae']:.4f}  on {result['ratings']:,} ratings "
            f"({result['unseen_users']} unseen users, {result['unseen_movies']} unseen movies)"
        )
    return 0
