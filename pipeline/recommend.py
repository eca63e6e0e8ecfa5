"""Top-K movie recommendations per user, scored on the Dask workers in blocks of users.

Each task takes one block of users (with an exclusion dataset: the users of one of its
buckets, so that the task reads exactly the ratings it must exclude), scores them against all
movies a few hundred users at a time, and writes one Parquet file::

    part-00003.parquet    user_id int32, rank int16 (1..K), movie_id int32, score float32

`score` is the model's *unclipped* prediction, global_mean + user_bias + movie_bias +
<user_embedding, movie_embedding>: clipping to the rating scale would turn the best movies of
a user into ties at the maximum rating and lose their order. Clip it to the rating scale to
show it as a rating. Movies the user rated in the exclusion dataset are left out, ties are
broken by the smaller movie_id, and a user with fewer than K unrated movies gets fewer rows.
Rows are sorted by user_id, then rank. No process ever holds a dense users x movies matrix.

The output folder must be on a file system the workers share with the client.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from distributed import Client

    from pipeline.dataset import Dataset
    from pipeline.model import Model

logger = logging.getLogger(__name__)

RECOMMENDATION_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int32(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("movie_id", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)

MAX_TOP_K = 32767  # rank is int16
USERS_PER_BLOCK = 4096  # without an exclusion dataset
SCORE_CELLS = 1 << 22  # users x movies scores held at once by a task (16 MiB of float32)


def recommend(
    model: Model,
    client: Client,
    out: Path,
    *,
    top_k: int,
    exclude: Dataset | None = None,
    score_cells: int = SCORE_CELLS,
) -> dict[str, Any]:
    """Write the top `top_k` movies of every user of `model` as Parquet files into `out`.

    `exclude` is the dataset whose ratings are left out (the training data); its user
    buckets are the task blocks. `score_cells` bounds the (users, movies) float32 score
    block one task holds at once. Returns counts: users, rows, files, top_k, seconds.
    """
    if not 1 <= top_k <= MAX_TOP_K:
        raise PipelineError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    movie_order = np.argsort(model.movie_ids, kind="stable")
    movies = {
        "movie_id": np.ascontiguousarray(model.movie_ids[movie_order], dtype=np.int32),
        "bias": np.ascontiguousarray(model.movie_bias[movie_order], dtype=np.float32),
        "embedding": np.ascontiguousarray(model.movie_embedding[movie_order], dtype=np.float32),
        "global_mean": np.float32(model.global_mean),
    }
    [movies_future] = client.scatter([movies], broadcast=True)

    user_ids = np.asarray(model.user_ids, dtype=np.int32)
    if exclude is not None:
        n_blocks = exclude.n_buckets
        block_of_user = user_ids % n_blocks
    else:
        n_blocks = max(1, math.ceil(len(user_ids) / USERS_PER_BLOCK))
        block_of_user = np.arange(len(user_ids)) * n_blocks // max(1, len(user_ids))

    futures = []
    for block in range(n_blocks):
        rows = np.flatnonzero(block_of_user == block)
        users = {
            "user_id": user_ids[rows],
            "bias": np.asarray(model.user_bias[rows], dtype=np.float32),
            "embedding": np.asarray(model.user_embedding[rows], dtype=np.float32),
        }
        files = [str(f) for f in exclude.bucket_files(block)] if exclude is not None else []
        futures.append(
            client.submit(
                recommend_block,
                users,
                movies_future,
                files,
                top_k,
                str(out / f"part-{block:05d}.parquet"),
                score_cells,
                pure=False,
            )
        )
    rows_written = sum(client.gather(futures))
    seconds = time.perf_counter() - start
    logger.info(
        "wrote %s recommendations for %s users in %.1f s",
        f"{rows_written:,}",
        f"{len(user_ids):,}",
        seconds,
    )
    return {
        "users": len(user_ids),
        "rows": int(rows_written),
        "files": n_blocks,
        "top_k": top_k,
        "seconds": round(seconds, 3),
    }


def recommend_block(
    users: dict[str, np.ndarray],
    movies: dict[str, Any],
    exclusion_files: list[str],
    top_k: int,
    path: str,
    score_cells: int = SCORE_CELLS,
) -> int:
    """Score one block of users against all movies and write its top-K rows to `path`.

    `users`: user_id (n,) int32, bias (n,) float32, embedding (n, rank) float32.
    `movies`: movie_id (m,) int32 sorted, bias (m,) float32, embedding (m, rank) float32,
    global_mean. `exclusion_files`: Parquet files with user_id/movie_id of rated pairs to
    leave out (rows of other users are ignored). Returns the number of rows written.
    """
    order = np.argsort(users["user_id"], kind="stable")
    user_ids = users["user_id"][order]
    user_bias = users["bias"][order]
    user_embedding = users["embedding"][order]
    movie_ids = movies["movie_id"]
    n_movies = len(movie_ids)
    k = min(top_k, n_movies)

    excluded_rows, excluded_cols = _exclusions(exclusion_files, user_ids, movie_ids)
    step = max(1, score_cells // max(1, n_movies))
    pieces = []
    for lo in range(0, len(user_ids), step):
        hi = min(lo + step, len(user_ids))
        scores = user_embedding[lo:hi] @ movies["embedding"].T
        scores += user_bias[lo:hi, None]
        scores += movies["bias"][None, :]
        scores += movies["global_mean"]
        a, b = np.searchsorted(excluded_rows, [lo, hi])
        scores[excluded_rows[a:b] - lo, excluded_cols[a:b]] = -np.inf
        cols, values = top_k_columns(scores, k)
        keep = np.isfinite(values)
        ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int16), values.shape)
        pieces.append(
            (
                np.repeat(user_ids[lo:hi], k).reshape(-1, k)[keep],
                ranks[keep],
                movie_ids[cols[keep]],
                values[keep].astype(np.float32),
            )
        )
    columns = [np.concatenate([p[i] for p in pieces]) if pieces else [] for i in range(4)]
    table = pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, RECOMMENDATION_SCHEMA, strict=True)],
        schema=RECOMMENDATION_SCHEMA,
    )
    pq.write_table(table, path)
    return table.num_rows


def top_k_columns(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of the `k` largest scores of each row, best first.

    `scores`: (n, m) float32 with k <= m. Equal scores are ordered by the smaller column.
    Returns (n, k) int64 columns and (n, k) values.
    """
    n, m = scores.shape
    if k == m:
        part = np.broadcast_to(np.arange(m), (n, m))
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -values), axis=-1)
    cols = np.take_along_axis(part, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    # argpartition picks arbitrarily among scores equal to the k-th largest; redo those rows
    # with a stable sort, which keeps equal scores in column order.
    tied = np.flatnonzero((scores >= values[:, -1:]).sum(axis=1) > k)
    for row in tied:
        best = np.argsort(-scores[row], kind="stable")[:k]
        cols[row] = best
        values[row] = scores[row, best]
    return cols, values


def _exclusions(
    files: list[str], user_ids: np.ndarray, movie_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the rated pairs of this block's users, sorted by row; int64 arrays."""
    if not files:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    table = pa.concat_tables([pq.read_table(f, columns=["user_id", "movie_id"]) for f in files])
    users = table.column("user_id").to_numpy()
    movies = table.column("movie_id").to_numpy()
    rows = np.searchsorted(user_ids, users)
    cols = np.searchsorted(movie_ids, movies)
    known = (rows < len(user_ids)) & (cols < len(movie_ids))
    known[known] &= (user_ids[rows[known]] == users[known]) & (
        movie_ids[cols[known]] == movies[known]
    )
    rows, cols = rows[known].astype(np.int64), cols[known].astype(np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order], cols[order]
