"""Random, temporal and predefined train/test splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.dataset import open_dataset, write_dataset
from pipeline.errors import PipelineError
from pipeline.split import (
    random_test_mask,
    rating_hash,
    split_predefined,
    split_random,
    split_temporal,
    temporal_test_mask,
)

MASK64 = (1 << 64) - 1


def mix64_reference(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hash_reference(seed: int, user_id: int, movie_id: int) -> float:
    x = mix64_reference((seed + user_id * 0x9E3779B97F4A7C15) & MASK64)
    return (mix64_reference(x ^ movie_id) >> 11) / 2.0**53


def ratings_table(rng, n_users=200, n_movies=120, per_user=(3, 30)) -> pa.Table:
    rows = []
    for user in range(1, n_users + 1):
        movies = rng.choice(np.arange(1, n_movies + 1), rng.integers(*per_user), replace=False)
        # few distinct timestamps, so equal timestamps are common
        for movie in movies:
            rows.append(
                (user * 7, int(movie), float(rng.integers(1, 11)) / 2, int(rng.integers(5)))
            )
    frame = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])
    return pa.Table.from_pandas(frame, preserve_index=False)


def as_frame(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    return frame.sort_values(["user_id", "movie_id"]).reset_index(drop=True)


def test_rating_hash_matches_reference_and_is_uniform(rng):
    users = rng.integers(1, 300_000, 2000)
    movies = rng.integers(1, 200_000, 2000)
    got = rating_hash(11, users, movies)
    want = [hash_reference(11, int(u), int(m)) for u, m in zip(users, movies, strict=True)]
    assert got.tolist() == want
    big = rating_hash(3, rng.integers(1, 10**6, 100_000), rng.integers(1, 10**5, 100_000))
    assert np.all((big >= 0) & (big < 1))
    assert abs(big.mean() - 0.5) < 0.01
    assert abs((big < 0.1).mean() - 0.1) < 0.005


def test_random_mask_ignores_order_and_depends_on_seed(rng):
    users = rng.integers(1, 1000, 5000)
    movies = rng.integers(1, 1000, 5000)
    mask = random_test_mask(users, movies, test_fraction=0.2, seed=5)
    order = rng.permutation(5000)
    assert np.array_equal(
        random_test_mask(users[order], movies[order], test_fraction=0.2, seed=5), mask[order]
    )
    other = random_test_mask(users, movies, test_fraction=0.2, seed=6)
    assert not np.array_equal(mask, other)
    assert abs(mask.mean() - 0.2) < 0.03


def test_temporal_mask_against_reference(rng):
    table = ratings_table(rng, n_users=60, per_user=(1, 12))
    frame = table.to_pandas().sample(frac=1, random_state=1).reset_index(drop=True)
    n = 3
    mask = temporal_test_mask(
        frame.user_id.to_numpy(),
        frame.movie_id.to_numpy(),
        frame.timestamp.to_numpy(),
        test_ratings_per_user=n,
    )
    for _, ratings in frame.groupby("user_id"):
        ordered = sorted(zip(ratings.timestamp, ratings.movie_id, ratings.index, strict=True))
        n_test = min(n, len(ordered) - 1)
        want = {index for _, _, index in ordered[len(ordered) - n_test :]}
        assert set(ratings.index[mask[ratings.index]]) == want


def test_split_random_on_workers(tmp_path, rng, dask_client):
    table = ratings_table(rng)
    dataset = write_dataset(table, tmp_path / "all", n_buckets=5, rating_scale=(0.5, 5.0, 0.5))
    split = split_random(dataset, tmp_path / "split", dask_client, test_fraction=0.25, seed=3)

    train, test = as_frame(split.train.read_ratings()), as_frame(split.test.read_ratings())
    everything = as_frame(table)
    expected_test = random_test_mask(
        everything.user_id.to_numpy(), everything.movie_id.to_numpy(), test_fraction=0.25, seed=3
    )
    pd.testing.assert_frame_equal(
        test, everything[expected_test].reset_index(drop=True), check_dtype=False
    )
    pd.testing.assert_frame_equal(
        train, everything[~expected_test].reset_index(drop=True), check_dtype=False
    )
    assert split.train.n_buckets == 5 and split.test.n_buckets == 5
    assert split.description["train_ratings"] == len(train)
    assert split.description["test_ratings"] == len(test)
    assert split.description["method"] == "random" and split.description["seed"] == 3
    assert open_dataset(tmp_path / "split" / "test").checksum == split.test.checksum

    # the same ratings bucketed differently give the same split
    other = write_dataset(table, tmp_path / "all3", n_buckets=3, rating_scale=(0.5, 5.0, 0.5))
    again = split_random(other, tmp_path / "split3", dask_client, test_fraction=0.25, seed=3)
    pd.testing.assert_frame_equal(as_frame(again.test.read_ratings()), test)


def test_split_temporal_on_workers(tmp_path, rng, dask_client):
    table = ratings_table(rng, per_user=(1, 15))
    dataset = write_dataset(table, tmp_path / "all", n_buckets=4, rating_scale=(0.5, 5.0, 0.5))
    split = split_temporal(dataset, tmp_path / "split", dask_client, test_ratings_per_user=2)
    train, test = as_frame(split.train.read_ratings()), as_frame(split.test.read_ratings())
    assert len(train) + len(test) == table.num_rows
    for user, ratings in as_frame(table).groupby("user_id"):
        last = ratings.sort_values(["timestamp", "movie_id"]).tail(min(2, len(ratings) - 1))
        assert sorted(test[test.user_id == user].movie_id) == sorted(last.movie_id)
    # every test user keeps at least one training rating
    assert set(test.user_id) <= set(train.user_id)
    assert split.description["test_ratings_per_user"] == 2


def test_split_predefined_ingests_each_file(tmp_path, dask_client):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "u1.base").write_text(
        "1\t10\t4\t881250949\n1\t20\t3\t881250950\n2\t10\t5\t881250951\n"
    )
    (folder / "u1.test").write_text("1\t30\t2\t881250952\n2\t20\t1\t881250953\n")
    split = split_predefined(
        folder / "u1.base", folder / "u1.test", tmp_path / "split", dask_client, n_buckets=2
    )
    assert split.description["train_ratings"] == 3
    assert split.description["test_ratings"] == 2
    test = as_frame(split.test.read_ratings())
    assert test[["user_id", "movie_id", "rating"]].values.tolist() == [[1, 30, 2.0], [2, 20, 1.0]]


def test_bad_settings(tmp_path, rng, dask_client):
    dataset = write_dataset(
        ratings_table(rng, n_users=3), tmp_path / "all", n_buckets=1, rating_scale=(0.5, 5.0, 0.5)
    )
    with pytest.raises(PipelineError, match=r"test_fraction must be between 0 and 1, got 1\.5"):
        split_random(dataset, tmp_path / "x", dask_client, test_fraction=1.5)
    with pytest.raises(PipelineError, match="test_ratings_per_user must be at least 1, got 0"):
        split_temporal(dataset, tmp_path / "x", dask_client, test_ratings_per_user=0)
