"""`mfpipe train DATA --out MODEL`: fit the model on the cluster and publish it."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from pipeline.cli._cluster_args import add_cluster_arguments, check_workers
from pipeline.cli._data import check_exists, open_ratings
from pipeline.cluster import connect
from pipeline.config import OPTIMIZERS, TrainConfig
from pipeline.publish import check_destination, publishing

_DEFAULTS = TrainConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train embeddings on an ingested dataset or raw MovieLens ratings",
        description="Fit global mean, biases and embeddings by averaged-gradient steps on Dask; "
        "write MODEL/users.parquet, movies.parquet, model.json and metrics.jsonl.",
    )
    p.add_argument(
        "data", type=Path, metavar="DATA", help="ingested dataset, or ratings file/folder"
    )
    p.add_argument("--out", type=Path, required=True, metavar="MODEL", help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL folder")
    add_config_arguments(p)
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="write per-epoch checkpoints here and resume from them",
    )
    add_cluster_arguments(p)
    p.set_defaults(handler=run)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The TrainConfig options, with the tuned defaults shown."""
    d = _DEFAULTS
    p.add_argument("--rank", type=int, default=d.rank, help=f"embedding size (default {d.rank})")
    p.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help=f"most epochs; early stopping usually ends sooner (default {d.epochs})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="ratings per step (default: all training ratings in one step)",
    )
    p.add_argument(
        "--learning-rate", type=float, default=d.learning_rate, help=f"(default {d.learning_rate})"
    )
    p.add_argument(
        "--bias-learning-rate",
        type=float,
        default=d.bias_learning_rate,
        help="(default: the learning rate)",
    )
    p.add_argument(
        "--learning-rate-decay",
        type=float,
        default=d.learning_rate_decay,
        help=f"factor on the step sizes after each epoch (default {d.learning_rate_decay})",
    )
    p.add_argument(
        "--regularization",
        type=float,
        default=d.regularization,
        help=f"L2 weight on embeddings (default {d.regularization})",
    )
    p.add_argument(
        "--bias-regularization",
        type=float,
        default=d.bias_regularization,
        help=f"L2 weight on biases (default {d.bias_regularization})",
    )
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=d.optimizer, help=f"(default {d.optimizer})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=d.validation_fraction,
        help=f"held out for early stopping (default {d.validation_fraction})",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help=f"epochs without improvement before stopping (default {d.patience})",
    )
    p.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="keep the best early-stopping epoch instead of retraining on all ratings",
    )
    p.add_argument("--shards", type=int, default=None, help="(default: one per worker)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build and validate the TrainConfig; errors name the command-line option."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig.from_mapping(values, where="--")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_workers(args.workers)
    check_exists(args.data)
    check_destination(args.out, args.overwrite)

    from pipeline.trainer import train

    with (
        connect(args.scheduler, args.workers) as client,
        open_ratings(args.data, client) as data,
        publishing(args.out, overwrite=args.overwrite) as staging,
    ):
        result = train(
            data,
            config,
            client,
            checkpoint_dir=args.checkpoint_dir,
            metrics_path=staging / "metrics.jsonl",
        )
        result.model.write(staging)
    meta = result.model.metadata
    validation = meta["metrics"]["best_validation_rmse"]
    summary = "" if validation is None else f", validation RMSE {validation:.4f}"
    print(f"model written to {args.out}: best epoch {meta['best_epoch']}{summary}")
    return 0
