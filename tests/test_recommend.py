"""Top-K recommendations on the workers against a brute-force dense reference."""

from __future__ import annotations

from pathlib import Path

import dask.dataframe as dd
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import write_dataset
from pipeline.errors import PipelineError
from pipeline.model import Model
from pipeline.parameters import Parameters
from pipeline.recommend import RECOMMENDATION_SCHEMA, recommend, top_k_columns


def make_model(rng: np.random.Generator, user_ids, movie_ids, rank: int, integer=False) -> Model:
    n_users, n_movies = len(user_ids), len(movie_ids)
    if integer:  # small integers keep float32 arithmetic exact, so ties are real ties
        draw = lambda *shape: rng.integers(-2, 3, size=shape).astype(np.float32)  # noqa: E731
    else:
        draw = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    params = Parameters(
        np.float32(3.0 if integer else 3.5),
        draw(n_users),
        draw(n_movies),
        draw(n_users, rank),
        draw(n_movies, rank),
    )
    return Model(np.asarray(user_ids, np.int32), np.asarray(movie_ids, np.int32), params, 0.5, 5.0)


def make_ratings(rng, model: Model, density: float, full_user: int | None = None) -> pa.Table:
    users, movies = np.meshgrid(model.user_ids, model.movie_ids, indexing="ij")
    keep = rng.random(users.shape) < density
    if full_user is not None:
        keep[np.searchsorted(model.user_ids, full_user)] = True
        keep[np.searchsorted(model.user_ids, full_user), 0] = False  # one movie left
    n = int(keep.sum())
    return pa.table(
        {
            "user_id": pa.array(users[keep], pa.int32()),
            "movie_id": pa.array(movies[keep], pa.int32()),
            "rating": pa.array(rng.integers(1, 6, n).astype(np.float32)),
            "timestamp": pa.array(rng.integers(0, 10**9, n), pa.int64()),
        }
    )


def reference(model: Model, ratings: pa.Table | None, k: int) -> pd.DataFrame:
    """Dense scores, rated pairs removed, each user's movies sorted by (-score, movie_id)."""
    scores = (
        model.global_mean
        + model.user_bias[:, None].astype(np.float64)
        + model.movie_bias[None, :]
        + model.user_embedding.astype(np.float64) @ model.movie_embedding.T.astype(np.float64)
    )
    rated = set()
    if ratings is not None:
        rated = set(
            zip(ratings["user_id"].to_pylist(), ratings["movie_id"].to_pylist(), strict=True)
        )
    rows = []
    for i, user in enumerate(model.user_ids.tolist()):
        candidates = sorted(
            (-scores[i, j], movie)
            for j, movie in enumerate(model.movie_ids.tolist())
            if (user, movie) not in rated
        )
        for rank, (negative, movie) in enumerate(candidates[:k], start=1):
            rows.append((user, rank, movie, -negative))
    return pd.DataFrame(rows, columns=["user_id", "rank", "movie_id", "score"])


def read_all(folder: Path) -> pd.DataFrame:
    frame = pq.read_table(folder).to_pandas()
    return frame.sort_values(["user_id", "rank"]).reset_index(drop=True)


def test_top_k_columns_orders_ties_by_column():
    scores = np.array(
        [[1, 3, 3, 3, 0], [5, 5, 5, 5, 5], [-np.inf, -np.inf, 2, -np.inf, 1], [0, 1, 2, 3, 4]],
        dtype=np.float32,
    )
    cols, values = top_k_columns(scores, 2)
    assert cols.tolist() == [[1, 2], [0, 1], [2, 4], [4, 3]]
    assert values.tolist() == [[3, 3], [5, 5], [2, 1], [4, 3]]
    cols, values = top_k_columns(scores, 5)
    assert cols[2].tolist() == [2, 4, 0, 1, 3]
    assert values[3].tolist() == [4, 3, 2, 1, 0]


def test_matches_brute_force_with_exclusions(tmp_path, rng, dask_client):
    user_ids = np.sort(rng.choice(np.arange(1, 5000), 61, replace=False))
    movie_ids = np.sort(rng.choice(np.arange(1, 900), 37, replace=False))
    model = make_model(rng, user_ids, movie_ids, rank=5)
    ratings = make_ratings(rng, model, 0.4, full_user=int(user_ids[3]))
    train = write_dataset(ratings, tmp_path / "train", n_buckets=4, rating_scale=(0.5, 5.0, 0.5))

    # score_cells forces several score blocks per task
    stats = recommend(
        model, dask_client, tmp_path / "rec", top_k=7, exclude=train, score_cells=3 * 37
    )
    got = read_all(tmp_path / "rec")
    want = reference(model, ratings, 7)

    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [
        f"part-{b:05d}.parquet" for b in range(4)
    ]
    assert pq.read_schema(tmp_path / "rec" / "part-00000.parquet").equals(RECOMMENDATION_SCHEMA)
    assert got[["user_id", "rank", "movie_id"]].equals(
        want[["user_id", "rank", "movie_id"]].astype(got[["user_id", "rank", "movie_id"]].dtypes)
    )
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-5, atol=1e-5)
    # the user who rated all but one movie gets exactly that movie
    only = got[got.user_id == user_ids[3]]
    assert only.movie_id.tolist() == [movie_ids[0]]
    assert stats == {
        "users": 61,
        "rows": len(want),
        "files": 4,
        "top_k": 7,
        "seconds": stats["seconds"],
    }
    # no recommended pair was rated in training
    pairs = set(zip(ratings["user_id"].to_pylist(), ratings["movie_id"].to_pylist(), strict=True))
    assert not pairs & set(zip(got.user_id, got.movie_id, strict=True))


def test_ties_are_broken_by_movie_id(tmp_path, rng, dask_client):
    user_ids = np.arange(1, 41)
    movie_ids = np.arange(10, 400, 13)  # 30 movies
    model = make_model(rng, user_ids, movie_ids, rank=2, integer=True)
    want = reference(model, None, 10)
    # integer parameters give many exactly equal scores; make sure the test exercises them
    assert (want.groupby("user_id").score.nunique() < 10).all()

    recommend(model, dask_client, tmp_path / "rec", top_k=10)
    got = read_all(tmp_path / "rec")
    assert got[["user_id", "rank", "movie_id"]].values.tolist() == (
        want[["user_id", "rank", "movie_id"]].values.tolist()
    )
    assert np.array_equal(got.score.to_numpy(), want.score.to_numpy(dtype=np.float32))


def test_scores_are_unclipped_predictions(tmp_path, rng, dask_client):
    model = make_model(rng, np.arange(1, 21), np.arange(1, 51), rank=4)
    model.params.user_embedding[:] *= 3  # push scores well outside 0.5..5
    recommend(model, dask_client, tmp_path / "rec", top_k=50)
    got = read_all(tmp_path / "rec")
    assert got.score.max() > 5 and got.score.min() < 0.5
    clipped = model.predict(got.user_id.to_numpy(), got.movie_id.to_numpy())
    np.testing.assert_allclose(np.clip(got.score, 0.5, 5.0), clipped, rtol=1e-5, atol=1e-5)


def test_output_is_readable_by_other_engines(tmp_path, rng, dask_client):
    model = make_model(rng, np.arange(1, 301), np.arange(1, 81), rank=3)
    recommend(model, dask_client, tmp_path / "rec", top_k=4)
    pattern = str(tmp_path / "rec" / "*.parquet")
    query = "select count(*), count(distinct user_id), min(rank), max(rank) from read_parquet(?)"
    counts = duckdb.execute(query, [pattern]).fetchall()
    assert counts == [(1200, 300, 1, 4)]
    frame = dd.read_parquet(str(tmp_path / "rec")).compute()
    assert len(frame) == 1200
    assert frame.dtypes.to_dict() == {
        "user_id": np.int32,
        "rank": np.int16,
        "movie_id": np.int32,
        "score": np.float32,
    }


def test_bad_top_k(tmp_path, rng, dask_client):
    model = make_model(rng, np.arange(1, 3), np.arange(1, 3), rank=2)
    with pytest.raises(PipelineError, match="top_k must be between 1 and 32767, got 0"):
        recommend(model, dask_client, tmp_path / "rec", top_k=0)


def test_recommend_command(tmp_path, rng, dask_client, capsys):
    from pipeline.cli import main

    user_ids = np.arange(1, 51)
    model = make_model(rng, user_ids, np.arange(1, 31), rank=3)
    model.save(tmp_path / "model")
    ratings = make_ratings(rng, model, 0.3)
    write_dataset(ratings, tmp_path / "train", n_buckets=2, rating_scale=(0.5, 5.0, 0.5))
    args = [
        "recommend",
        str(tmp_path / "model"),
        str(tmp_path / "train"),
        "--out",
        str(tmp_path / "rec"),
        "--top-k",
        "4",
        "--scheduler",
        dask_client.scheduler.address,
    ]
    assert main(args) == 0
    assert capsys.readouterr().out == f"200 recommendations for 50 users in {tmp_path / 'rec'}\n"
    got = read_all(tmp_path / "rec")
    want = reference(Model.load(tmp_path / "model"), ratings, 4)
    assert got[["user_id", "rank", "movie_id"]].values.tolist() == (
        want[["user_id", "rank", "movie_id"]].values.tolist()
    )
    assert not list(tmp_path.glob(".rec*"))  # the staging folder is gone

    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mfpipe recommend: error: {tmp_path / 'rec'} already exists; "
        "pass --overwrite to replace it\n"
    )
    assert main([*args[:-2], "--top-k", "0"]) == 2
    assert "--top-k must be between 1 and 32767, got 0" in capsys.readouterr().err
