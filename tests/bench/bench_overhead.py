"""Dask's overhead per epoch: the distributed trainer against the same work in one process.

Both sides run the same kernel, schedule and optimiser over the same synthetic ratings
(default 5M, rank 64, whole-set batches). The single process loads one shard holding every
rating and loops; the distributed run uses a 2-worker LocalCluster with one shard per worker.
Prints the median epoch time of each and their ratio.

    python tests/bench/bench_overhead.py [--ratings 5000000] [--epochs 8] [--batch-size N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cluster import connect
from pipeline.config import TrainConfig
from pipeline.dataset import write_dataset
from pipeline.optimizer import apply_rows, new_moments
from pipeline.parameters import initial_parameters
from pipeline.schedule import n_steps
from pipeline.shards import (
    MovieState,
    StepSpec,
    UserState,
    load_shard,
    shard_step,
    shard_users,
)
from pipeline.trainer import train


def synthetic(n_ratings: int, n_users: int, n_movies: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    flat = np.unique(rng.integers(0, n_users * n_movies, int(n_ratings * 1.01)))
    flat = rng.permutation(flat)[:n_ratings]
    return pa.table(
        {
            "user_id": pa.array(flat // n_movies + 1, pa.int32()),
            "movie_id": pa.array(flat % n_movies + 1, pa.int32()),
            "rating": pa.array(rng.integers(1, 11, len(flat)) / 2, pa.float32()),
            "timestamp": pa.array(np.zeros(len(flat), np.int64)),
        }
    )


def single_process(data, config: TrainConfig, epochs: int) -> list[float]:
    """The trainer's step protocol with one shard in this process, no Dask."""
    files = [str(f) for b in range(data.n_buckets) for f in data.bucket_files(b)]
    user_ids, movie_ids = data.user_ids(), data.movie_ids()
    shard = load_shard(files, 0, 1, user_ids, movie_ids, config.seed, 0.0)
    params = initial_parameters(
        len(user_ids),
        len(movie_ids),
        config.rank,
        float(shard.rating.mean()),
        config.seed,
        config.init_scale,
    )
    users = UserState(
        shard_users(user_ids, 0, 1),
        params.user_bias,
        params.user_embedding,
        new_moments(config, len(user_ids), config.rank),
    )
    movies = MovieState(params.global_mean, params.movie_bias, params.movie_embedding)
    movie_moments = new_moments(config, len(movie_ids), config.rank)
    steps = n_steps(shard.n_ratings, config.batch_size)
    times, t = [], 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for step in range(steps):
            spec = StepSpec(
                config, epoch, step, steps, t + 1, (data.rating_min, data.rating_max), False
            )
            result = shard_step(shard, users, movies, spec)
            t += 1
            apply_rows(
                config, t, result.partial.movies, movies.embedding, movies.bias, movie_moments
            )
            users = result.users
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=120_000)
    parser.add_argument("--movies", type=int, default=30_000)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = TrainConfig(
        rank=args.rank, epochs=args.epochs, batch_size=args.batch_size, validation_fraction=0.0
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(
            synthetic(args.ratings, args.users, args.movies),
            Path(tmp) / "d",
            n_buckets=16,
            rating_scale=(0.5, 5.0, 0.5),
        )
        local = single_process(data, config, args.epochs)
        with connect(None, 2) as client:
            history = train(data, config, client, progress=False).history
    distributed = [r["seconds"] for r in history]

    # The first epoch of each side includes compilation and warm-up.
    t_local = statistics.median(local[1:])
    t_dist = statistics.median(distributed[1:])
    print(
        f"{args.ratings:,} ratings, rank {args.rank}, "
        f"{n_steps(args.ratings, args.batch_size)} step(s) per epoch, {args.epochs} epochs"
    )
    print(
        f"one process (1 core):        {t_local:.3f} s per epoch "
        f"({args.ratings / t_local / 1e6:.2f} M ratings/s)"
    )
    print(
        f"Dask, 2 workers, 2 shards:   {t_dist:.3f} s per epoch "
        f"({args.ratings / t_dist / 1e6:.2f} M ratings/s)"
    )
    print(f"ratio distributed / single process: {t_dist / t_local:.2f}  (target <= 1.25)")


if __name__ == "__main__":
    main()
