"""Time to quality on synthetic ratings with a known noise floor.

Generates N ratings (default 5M) from a planted model (`mfpipe synth`), ingests them, and
trains with the default settings on a 2-worker LocalCluster, then, as the baseline in the
same run, on a 1-worker LocalCluster. For each it prints the wall time (shard loading
included) until the validation RMSE is within 1% of the planted floor (`rmse_floor`: the
planted model's own RMSE on the data), and the whole training time.

    python tests/bench/bench_time_to_quality.py [--ratings 5000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cluster import connect
from pipeline.config import TrainConfig
from pipeline.ingest import ingest
from pipeline.synth import generate
from pipeline.trainer import train


def time_to_quality(data, config: TrainConfig, workers: int, target: float) -> dict:
    with connect(None, workers) as client:
        t0 = time.perf_counter()
        history = train(data, config, client, progress=False).history
        total = time.perf_counter() - t0
    search = [r for r in history if r["phase"] == "search"]
    epoch_seconds = sum(r["seconds"] for r in history)
    setup = total - epoch_seconds  # shard loading, both phases
    reached, elapsed = None, setup / 2
    for r in search:
        elapsed += r["seconds"]
        if r["validation_rmse"] is not None and r["validation_rmse"] <= target:
            reached = r["epoch"]
            break
    return {
        "reached_epoch": reached,
        "seconds_to_target": elapsed if reached else None,
        "best_validation": min(r["validation_rmse"] for r in search),
        "total_seconds": total,
        "epochs": (len(search), len(history) - len(search)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=5_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    n_users = max(100, int(args.ratings / 154))  # ml-25m's ratings per user and per movie
    n_movies = max(50, int(args.ratings / 423))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        summary = generate(
            Path(tmp) / "synth", n_users=n_users, n_movies=n_movies, n_ratings=args.ratings, seed=1
        )
        t1 = time.perf_counter()
        with connect(None, 2) as client:
            data = ingest(Path(tmp) / "synth", Path(tmp) / "data", client)
        t2 = time.perf_counter()
        floor = float(np.load(Path(tmp) / "synth" / "planted.npz")["rmse_floor"])
        target = 1.01 * floor
        print(
            f"{args.ratings:,} ratings, {n_users:,} users, {n_movies:,} movies; "
            f"synth {t1 - t0:.1f} s, ingest {t2 - t1:.1f} s"
        )
        print(
            f"planted floor RMSE {floor:.4f}, bias-only {summary['rmse_bias_only']:.4f}, "
            f"target {target:.4f}"
        )
        config = TrainConfig()
        for workers in (2, 1):
            r = time_to_quality(data, config, workers, target)
            reached = (
                f"{r['seconds_to_target']:.1f} s (epoch {r['reached_epoch']})"
                if r["reached_epoch"]
                else "not reached"
            )
            print(
                f"{workers} worker(s): target {reached}; best validation "
                f"{r['best_validation']:.4f}; whole training {r['total_seconds']:.1f} s "
                f"({r['epochs'][0]} search + {r['epochs'][1]} refit epochs)",
                flush=True,
            )


if __name__ == "__main__":
    main()
