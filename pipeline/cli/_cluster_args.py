"""Cluster options shared by the subcommands that run on Dask."""

from __future__ import annotations

import argparse

from pipeline.errors import PipelineError


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--workers`` and ``--scheduler``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes of the local cluster started when no scheduler is given "
        "(default: the CPU count)",
    )
    group.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="Dask scheduler address, e.g. tcp://host:8786 or tls://host:8786 "
        "(default: $DASK_SCHEDULER_ADDRESS, else a local cluster)",
    )


def check_workers(workers: int | None) -> None:
    """Reject a non-positive --workers before any cluster starts."""
    if workers is not None and workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {workers}")
