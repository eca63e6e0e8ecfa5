"""Scoring a model on a ratings dataset: RMSE and MAE, computed per bucket on the workers.

Users or movies the model has not seen fall back to the biases it has and the global mean;
the ratings and distinct ids concerned are counted.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from distributed import Client

from pipeline.model import Model

logger = logging.getLogger(__name__)


def score_bucket(model: Model, files: list[str]) -> dict[str, Any]:
    """Error sums and unseen-id tallies for the ratings in `files` (a task)."""
    if not files:
        return {
            "sse": 0.0,
            "sae": 0.0,
            "ratings": 0,
            "unseen_user_ids": [],
            "unseen_movie_ids": [],
            "unseen_user_ratings": 0,
            "unseen_movie_ratings": 0,
        }
    table = pq.ParquetDataset(files).read(columns=["user_id", "movie_id", "rating"])
    user_id = table.column("user_id").to_numpy()
    movie_id = table.column("movie_id").to_numpy()
    rating = table.column("rating").to_numpy().astype(np.float32)
    err = model.predict(user_id, movie_id) - rating
    unseen_user = model.user_index(user_id) < 0
    unseen_movie = model.movie_index(movie_id) < 0
    return {
        "sse": float(np.dot(err, err)),
        "sae": float(np.abs(err).sum(dtype=np.float64)),
        "ratings": len(rating),
        "unseen_user_ids": np.unique(user_id[unseen_user]).tolist(),
        "unseen_movie_ids": np.unique(movie_id[unseen_movie]).tolist(),
        "unseen_user_ratings": int(unseen_user.sum()),
        "unseen_movie_ratings": int(unseen_movie.sum()),
    }


def evaluate(model: Model, dataset: Any, client: Client) -> dict[str, Any]:
    """RMSE and MAE of `model` on every rating of `dataset`, with unseen-id counts."""
    t0 = time.perf_counter()
    [model_future] = client.scatter([model], hash=False)
    parts = client.gather(
        [
            client.submit(
                score_bucket, model_future, [str(f) for f in dataset.bucket_files(b)], pure=False
            )
            for b in range(dataset.n_buckets)
        ]
    )
    n = sum(p["ratings"] for p in parts)
    result = {
        "rmse": math.sqrt(sum(p["sse"] for p in parts) / n) if n else None,
        "mae": sum(p["sae"] for p in parts) / n if n else None,
        "ratings": n,
        "unseen_users": len({u for p in parts for u in p["unseen_user_ids"]}),
        "unseen_movies": len({m for p in parts for m in p["unseen_movie_ids"]}),
        "unseen_user_ratings": sum(p["unseen_user_ratings"] for p in parts),
        "unseen_movie_ratings": sum(p["unseen_movie_ratings"] for p in parts),
    }
    logger.info(
        "evaluated %s ratings in %.1f s: RMSE %s",
        f"{n:,}",
        time.perf_counter() - t0,
        "-" if result["rmse"] is None else f"{result['rmse']:.4f}",
    )
    return result
