"""`mfpipe run JOB`: run a job file end to end, or resume or skip an earlier attempt."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli._cluster_args import add_cluster_arguments, check_workers


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a job file: source, ingest, split, train, evaluate, export, report, publish",
        description="Run the job file JOB and publish OUTPUT/run_id=ID/. Finished stages of an "
        "interrupted run with the same run id are reused; a run id already published with the "
        "same inputs is left as it is.",
    )
    parser.add_argument("job", type=Path, metavar="JOB", help="job file (TOML)")
    parser.add_argument(
        "--run-id",
        default=None,
        metavar="ID",
        help="name of this run (default: today's UTC date, YYYY-MM-DD)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="DIR",
        help="output root, overriding output.root of the job file",
    )
    add_cluster_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run id already published from other inputs",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.jobs import load_job
    from pipeline.runner import check_run_id, run_job

    check_workers(args.workers)
    if args.run_id is not None:
        check_run_id(args.run_id)
    job = load_job(args.job)
    outcome = run_job(
        job,
        run_id=args.run_id,
        output=args.output,
        scheduler=args.scheduler,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(outcome.path)
    return 0
