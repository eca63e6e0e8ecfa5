"""Benchmark top-K recommendation: recommend() on a local cluster against in-process baselines.

Prints users per second for
  1. baseline: one process, the same blocks, a full stable argsort of every score row;
  2. recommend_block in one process (argpartition, then a sort of the K best);
  3. recommend() on a LocalCluster of --workers processes (one task per user bucket);
and checks that all three return the same recommendations.

    python tests/bench/bench_recommend.py --users 20000 --movies 10000 --rank 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster import connect
from pipeline.dataset import write_dataset
from pipeline.model import Model
from pipeline.parameters import Parameters
from pipeline.recommend import SCORE_CELLS, _exclusions, recommend, recommend_block


def build(args: argparse.Namespace, folder: Path) -> tuple[Model, object]:
    rng = np.random.default_rng(0)
    user_ids = np.arange(1, args.users + 1, dtype=np.int32)
    movie_ids = np.arange(1, args.movies + 1, dtype=np.int32)
    scale = 1 / np.sqrt(args.rank)
    params = Parameters(
        np.float32(3.5),
        rng.normal(0, 0.3, args.users).astype(np.float32),
        rng.normal(0, 0.3, args.movies).astype(np.float32),
        (rng.normal(size=(args.users, args.rank)) * scale).astype(np.float32),
        (rng.normal(size=(args.movies, args.rank)) * scale).astype(np.float32),
    )
    model = Model(user_ids, movie_ids, params, 0.5, 5.0)
    users = np.repeat(user_ids, args.ratings_per_user)
    movies = rng.integers(1, args.movies + 1, len(users)).astype(np.int32)
    key = np.unique(users.astype(np.int64) << 32 | movies)
    ratings = pa.table(
        {
            "user_id": pa.array((key >> 32).astype(np.int32)),
            "movie_id": pa.array((key & 0xFFFFFFFF).astype(np.int32)),
            "rating": pa.array(np.full(len(key), 4.0, np.float32)),
            "timestamp": pa.array(np.zeros(len(key), np.int64)),
        }
    )
    dataset = write_dataset(
        ratings, folder / "train", n_buckets=args.buckets, rating_scale=(0.5, 5.0, 0.5)
    )
    return model, dataset


def baseline(model: Model, dataset, k: int, out: Path) -> None:
    """The obvious implementation: dense block scores, exclusions, full sort of every row."""
    rows = []
    for bucket in range(dataset.n_buckets):
        user_ids = model.user_ids[model.user_ids % dataset.n_buckets == bucket]
        index = np.searchsorted(model.user_ids, user_ids)
        files = [str(f) for f in dataset.bucket_files(bucket)]
        ex_rows, ex_cols = _exclusions(files, user_ids, model.movie_ids)
        step = max(1, SCORE_CELLS // len(model.movie_ids))
        for lo in range(0, len(user_ids), step):
            block = index[lo : lo + step]
            scores = model.user_embedding[block] @ model.movie_embedding.T
            # the same float32 operations in the same order as recommend_block, so that
            # near-equal scores round identically and the outputs can be compared exactly
            scores += model.user_bias[block, None]
            scores += model.movie_bias[None, :]
            scores += np.float32(model.global_mean)
            a, b = np.searchsorted(ex_rows, [lo, lo + len(block)])
            scores[ex_rows[a:b] - lo, ex_cols[a:b]] = -np.inf
            best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            for i, user in enumerate(user_ids[lo : lo + step]):
                for rank, col in enumerate(best[i], start=1):
                    rows.append((user, rank, model.movie_ids[col]))
    table = pa.table(
        {
            "user_id": pa.array([r[0] for r in rows], pa.int32()),
            "rank": pa.array([r[1] for r in rows], pa.int16()),
            "movie_id": pa.array([r[2] for r in rows], pa.int32()),
        }
    )
    pq.write_table(table, out)


def in_process(model: Model, dataset, k: int, out: Path) -> None:
    out.mkdir()
    movies = {
        "movie_id": model.movie_ids,
        "bias": model.movie_bias,
        "embedding": model.movie_embedding,
        "global_mean": np.float32(model.global_mean),
    }
    for bucket in range(dataset.n_buckets):
        rows = np.flatnonzero(model.user_ids % dataset.n_buckets == bucket)
        users = {
            "user_id": model.user_ids[rows],
            "bias": model.user_bias[rows],
            "embedding": model.user_embedding[rows],
        }
        files = [str(f) for f in dataset.bucket_files(bucket)]
        recommend_block(users, movies, files, k, str(out / f"part-{bucket:05d}.parquet"))


def read(path: Path) -> list[tuple[int, int, int]]:
    table = pq.read_table(path, columns=["user_id", "rank", "movie_id"])
    frame = table.to_pandas().sort_values(["user_id", "rank"])
    return list(frame.itertuples(index=False, name=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--movies", type=int, default=10_000)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--ratings-per-user", type=int, default=25)
    parser.add_argument("--buckets", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, dataset = build(args, folder)
        print(
            f"{args.users:,} users x {args.movies:,} movies, rank {args.rank}, top {args.top_k}, "
            f"{args.buckets} buckets"
        )
        timings = {}
        start = time.perf_counter()
        baseline(model, dataset, args.top_k, folder / "baseline.parquet")
        timings["baseline: 1 process, full argsort"] = time.perf_counter() - start

        start = time.perf_counter()
        in_process(model, dataset, args.top_k, folder / "block")
        timings["recommend_block: 1 process, argpartition"] = time.perf_counter() - start

        with connect(None, args.workers) as client:
            client.run(lambda: None)  # workers up before timing
            start = time.perf_counter()
            recommend(model, client, folder / "cluster", top_k=args.top_k, exclude=dataset)
            timings[f"recommend(): {args.workers} workers"] = time.perf_counter() - start

        want = read(folder / "baseline.parquet")
        assert read(folder / "block") == want, "recommend_block differs from the baseline"
        assert read(folder / "cluster") == want, "recommend() differs from the baseline"
        base = next(iter(timings.values()))
        for name, seconds in timings.items():
            print(
                f"{name:45s} {seconds:7.2f} s  {args.users / seconds:10,.0f} users/s  "
                f"x{base / seconds:.1f}"
            )
        print("all three agree on every user's top-K")


if __name__ == "__main__":
    main()
