"""Benchmark `pipeline.synth.generate` at ml-25m size (or smaller) and print the figures.

Usage: python tests/bench/bench_synth.py [--users U --movies M --ratings N] [--out DIR]

The baseline measured in the same run is the cost of only writing N rows of the same shape
with pyarrow's CSV writer (random ids and ratings, no sampling and no model), so the figures
show how much the generator adds over bare I/O. Peak RSS is read from getrusage, in a fresh
child process per measurement so one does not inflate the other.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _generate(out: str, users: int, movies: int, ratings: int, queue: mp.Queue) -> None:
    from pipeline.synth import generate

    summary = generate(Path(out), n_users=users, n_movies=movies, n_ratings=ratings, seed=1)
    summary["peak_rss_mib"] = _peak_rss_mib()
    queue.put(summary)


def _baseline(out: str, users: int, movies: int, ratings: int, queue: mp.Queue) -> None:
    began = time.perf_counter()
    rng = np.random.default_rng(1)
    chunk = 1 << 20
    text = pa.array([f"{h / 2:.1f}" for h in range(11)])
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    Path(out).mkdir(parents=True)
    with open(Path(out) / "ratings.csv", "wb") as handle:
        handle.write(b"userId,movieId,rating,timestamp\n")
        for start in range(0, ratings, chunk):
            n = min(chunk, ratings - start)
            table = pa.table(
                {
                    "userId": np.sort(rng.integers(1, users + 1, n, dtype=np.int32)),
                    "movieId": rng.integers(1, movies + 1, n, dtype=np.int32),
                    "rating": text.take(rng.integers(1, 11, n)),
                    "timestamp": rng.integers(789_652_009, 1_574_327_703, n),
                }
            )
            pacsv.write_csv(table, handle, options)
    queue.put({"seconds": time.perf_counter() - began, "peak_rss_mib": _peak_rss_mib()})


def _measure(target, out: Path, args: argparse.Namespace) -> dict:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(
        target=target, args=(str(out), args.users, args.movies, args.ratings, queue)
    )
    process.start()
    result = queue.get()
    process.join()
    result["bytes"] = sum(f.stat().st_size for f in out.iterdir())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=162_541)
    parser.add_argument("--movies", type=int, default=59_047)
    parser.add_argument("--ratings", type=int, default=25_000_095)
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(dir=args.out))
    try:
        base = _measure(_baseline, scratch / "baseline", args)
        synth = _measure(_generate, scratch / "synth", args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    n = args.ratings
    print(f"ratings: {n:,}  users: {args.users:,}  movies: {args.movies:,}")
    for name, result in (("baseline (write only)", base), ("synth.generate", synth)):
        print(
            f"{name:22s} {result['seconds']:8.1f} s  {n / result['seconds']:12,.0f} ratings/s  "
            f"peak RSS {result['peak_rss_mib']:7.0f} MiB  output {result['bytes'] / 2**20:7.0f} MiB"
        )
    print(f"generator / baseline time: {synth['seconds'] / base['seconds']:.2f}x")
    keys = ("rating_mean", "rating_std", "rmse_floor", "rmse_bias_only", "n_movies_rated")
    print(json.dumps({k: synth[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
