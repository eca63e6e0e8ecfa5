"""`mfpipe synth`: write synthetic MovieLens-style ratings with a planted truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import synth


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `synth` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="generate synthetic ratings in the ml-25m layout",
        description="Write ratings.csv, movies.csv (ml-25m layout) and planted.npz (the "
        "planted biases and embeddings) to DIR, drawn from a planted biased matrix "
        "factorisation. The folder is published atomically.",
    )
    parser.add_argument("--users", type=int, required=True, metavar="U", help="number of users")
    parser.add_argument("--movies", type=int, required=True, metavar="M", help="number of movies")
    parser.add_argument(
        "--ratings",
        type=int,
        required=True,
        metavar="N",
        help="number of ratings (at least 20 per user, at most U x M); 25_000_000 is accepted",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--rank", type=int, default=8, help="planted embedding rank (default: 8)")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.5,
        metavar="SIGMA",
        help="standard deviation of the rating noise (default: 0.5)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate and print a one-line summary on stdout."""
    summary = synth.generate(
        args.out,
        n_users=args.users,
        n_movies=args.movies,
        n_ratings=args.ratings,
        seed=args.seed,
        rank=args.rank,
        noise=args.noise,
        overwrite=args.overwrite,
    )
    print(
        f"{args.out}: {summary['n_ratings']:,} ratings, {summary['n_users']:,} users, "
        f"{summary['n_movies']:,} movies; rating mean {summary['rating_mean']:.3f} "
        f"std {summary['rating_std']:.3f}; rmse_floor {summary['rmse_floor']:.4f}, "
        f"bias-only {summary['rmse_bias_only']:.4f}"
    )
    return 0
