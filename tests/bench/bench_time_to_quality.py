"""Time to quality on synthetic ratings with a known noise floor.

Generates N ratings (default 5M, 2,000 users x 2,500 movies) from a planted rank-8 model
(`mfpipe synth`), ingests them, and trains on a 2-worker LocalCluster, then, as the baseline
in the same run, on a 1-worker LocalCluster. For each it prints the wall time (shard loading
included) until the validation RMSE comes within 5%, 2% and 1% of the planted floor
(the planted model's own RMSE on the same validation ratings; `rmse_floor` is the same over
all the data), and the whole training time.

The data are dense (2,500 ratings per user) so that the floor is within statistical reach:
at ml-25m's 154 ratings per user the estimation error of each user's rank+1 parameters alone
keeps any fitted model a few percent above the planted model.

    python tests/bench/bench_time_to_quality.py [--ratings 5000000] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cluster import connect
from pipeline.config import TrainConfig
from pipeline.ingest import ingest
from pipeline.schedule import validation_mask
from pipeline.synth import generate
from pipeline.trainer import train

MARGINS = (0.05, 0.02, 0.01)
SETTINGS = {"rank": 8, "regularization": 0.002, "learning_rate_decay": 0.985, "epochs": 400}
"""Settings for this planted data: its rank, light L2, a slowly decaying step size."""


def time_to_quality(data, config: TrainConfig, workers: int, floor: float) -> dict:
    with connect(None, workers) as client:
        t0 = time.perf_counter()
        history = train(data, config, client, progress=False).history
        total = time.perf_counter() - t0
    search = [r for r in history if r["phase"] == "search"]
    setup = (total - sum(r["seconds"] for r in history)) / 2  # shard loading, per phase
    reached: dict[float, tuple[int, float]] = {}
    elapsed = setup
    for r in search:
        elapsed += r["seconds"]
        for margin in MARGINS:
            if margin not in reached and r["validation_rmse"] <= (1 + margin) * floor:
                reached[margin] = (r["epoch"], elapsed)
    return {
        "reached": reached,
        "best_validation": min(r["validation_rmse"] for r in search),
        "total_seconds": total,
        "epochs": (len(search), len(history) - len(search)),
    }


def planted_validation_rmse(data, planted: dict, config: TrainConfig) -> float:
    """RMSE of the clipped planted prediction on the ratings training holds out."""
    table = data.read_ratings()
    user_id = table.column("user_id").to_numpy()
    movie_id = table.column("movie_id").to_numpy()
    held = validation_mask(user_id, movie_id, config.seed, config.validation_fraction)
    u = np.searchsorted(planted["user_id"], user_id[held])
    m = np.searchsorted(planted["movie_id"], movie_id[held])
    pred = (
        planted["global_mean"]
        + planted["user_bias"][u]
        + planted["movie_bias"][m]
        + np.einsum("ij,ij->i", planted["user_embedding"][u], planted["movie_embedding"][m])
    )
    err = np.clip(pred, 0.5, 5.0) - table.column("rating").to_numpy()[held]
    return float(np.sqrt(np.mean(err.astype(np.float64) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--movies", type=int, default=2_500)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = dict(SETTINGS)
    settings.update({k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    config = TrainConfig.from_mapping(settings, where="--set")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        summary = generate(
            Path(tmp) / "synth",
            n_users=args.users,
            n_movies=args.movies,
            n_ratings=args.ratings,
            seed=1,
        )
        t1 = time.perf_counter()
        with connect(None, 2) as client:
            data = ingest(Path(tmp) / "synth", Path(tmp) / "data", client)
        t2 = time.perf_counter()
        planted = dict(np.load(Path(tmp) / "synth" / "planted.npz"))
        floor = planted_validation_rmse(data, planted, config)
        print(
            f"{args.ratings:,} ratings, {args.users:,} users, {args.movies:,} movies; "
            f"synth {t1 - t0:.1f} s, ingest {t2 - t1:.1f} s"
        )
        print(
            f"planted RMSE on the validation ratings {floor:.4f} (on all ratings "
            f"{float(planted['rmse_floor']):.4f}), bias-only {summary['rmse_bias_only']:.4f}; "
            f"settings {settings}"
        )
        for workers in (2, 1):
            r = time_to_quality(data, config, workers, floor)
            parts = []
            for margin in MARGINS:
                hit = r["reached"].get(margin)
                parts.append(
                    f"{margin:.0%}: "
                    + (f"{hit[1]:.1f} s (epoch {hit[0]})" if hit else "not reached")
                )
            print(
                f"{workers} worker(s): within {'; '.join(parts)}; best validation "
                f"{r['best_validation']:.4f} ({r['best_validation'] / floor - 1:+.2%}); "
                f"whole training {r['total_seconds']:.1f} s "
                f"({r['epochs'][0]} search + {r['epochs'][1]} refit epochs)",
                flush=True,
            )


if __name__ == "__main__":
    main()
