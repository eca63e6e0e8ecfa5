"""One full gradient step on one core: errors, per-user and per-movie sums, counts.

Workload: 4M ratings, rank 64, 160k users, 60k movies with Zipf-like movie popularity.
Compares the compiled kernel (`pipeline.kernel.gradient_sums` plus `np.bincount` counts)
against a NumPy baseline measured in the same run: row gathers, `einsum` for the errors and
`np.add.at` for the per-index sums (the baseline runs on a slice, its rate is per rating).

    python tests/bench/bench_kernel.py [--ratings 4000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pipeline.kernel import gradient_sums
from pipeline.parameters import initial_parameters


def workload(n_ratings: int, n_users: int, n_movies: int, rank: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_movies + 1) ** 0.9
    movies = rng.choice(n_movies, n_ratings, p=popularity / popularity.sum()).astype(np.int32)
    users = np.sort(rng.integers(0, n_users, n_ratings)).astype(np.int32)
    ratings = (rng.integers(1, 11, n_ratings) / 2).astype(np.float32)
    params = initial_parameters(n_users, n_movies, rank, 3.5, seed, 0.1)
    return users, movies, ratings, params


def ours(users, movies, ratings, params):
    sums = gradient_sums(users, movies, ratings, params)
    counts = (
        np.bincount(users, minlength=len(params.user_bias)),
        np.bincount(movies, minlength=len(params.movie_bias)),
    )
    return sums, counts


def baseline(users, movies, ratings, params):
    pu, qm = params.user_embedding[users], params.movie_embedding[movies]
    err = (
        params.global_mean
        + params.user_bias[users]
        + params.movie_bias[movies]
        + np.einsum("ij,ij->i", pu, qm)
        - ratings
    )
    user_sums = np.zeros_like(params.user_embedding)
    movie_sums = np.zeros_like(params.movie_embedding)
    np.add.at(user_sums, users, err[:, None] * qm)
    np.add.at(movie_sums, movies, err[:, None] * pu)
    counts = (
        np.bincount(users, minlength=len(user_sums)),
        np.bincount(movies, minlength=len(movie_sums)),
    )
    return user_sums, movie_sums, float(err @ err), counts


def best_of(fn, repeats, *args):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=4_000_000)
    parser.add_argument("--users", type=int, default=160_000)
    parser.add_argument("--movies", type=int, default=60_000)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-ratings", type=int, default=500_000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    users, movies, ratings, params = workload(args.ratings, args.users, args.movies, args.rank)
    ours(users[:1000], movies[:1000], ratings[:1000], params)  # compile outside the timing
    t_ours, _ = best_of(ours, args.repeats, users, movies, ratings, params)

    n = args.baseline_ratings
    t_base, (us, ms, _, _) = best_of(baseline, 1, users[:n], movies[:n], ratings[:n], params)
    check, _ = ours(users[:n], movies[:n], ratings[:n], params)
    assert np.allclose(check.user_sums, us, rtol=1e-3, atol=1e-4)
    assert np.allclose(check.movie_sums, ms, rtol=1e-3, atol=1e-3)

    rate_ours = args.ratings / t_ours
    rate_base = n / t_base
    print(
        f"workload: {args.ratings:,} ratings, rank {args.rank}, {args.users:,} users, "
        f"{args.movies:,} movies (Zipf popularity)"
    )
    print(
        f"kernel (numba, fused):        {t_ours:.3f} s per step = {rate_ours / 1e6:.2f} M ratings/s"
    )
    print(
        f"baseline (einsum + add.at):   {n / rate_base:.3f} s per {n:,} = "
        f"{rate_base / 1e6:.2f} M ratings/s"
    )
    print(f"speed-up: {rate_ours / rate_base:.1f}x   (target >= 5 M ratings/s per core)")


if __name__ == "__main__":
    main()
