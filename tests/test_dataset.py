"""The dataset read/write API: write_dataset round trips and open_dataset's refusals."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import MOVIES_SCHEMA, is_dataset, open_dataset, write_dataset
from pipeline.errors import PipelineError

SCALE = (0.5, 5.0, 0.5)


def random_ratings(rng: np.random.Generator, n: int = 500) -> pa.Table:
    pairs = rng.choice(200 * 80, size=n, replace=False)
    return pa.table(
        {
            "user_id": (pairs // 80 + 1).astype(np.int64),  # cast on write
            "movie_id": (pairs % 80 + 1).astype(np.int32),
            "rating": rng.integers(1, 11, size=n) / 2,
            "timestamp": rng.integers(0, 2**40, size=n),
        }
    )


def test_write_dataset_round_trip(tmp_path, rng):
    table = random_ratings(rng)
    base = {"format": "ml-csv", "sources": [{"path": "x"}], "split": {"seed": 3}, "ratings": -1}
    dataset = write_dataset(
        table, tmp_path / "train", n_buckets=5, rating_scale=SCALE, base_manifest=base
    )
    assert dataset.n_buckets == 5
    assert (dataset.rating_min, dataset.rating_max, dataset.rating_step) == SCALE
    assert (
        dataset.checksum
        == hashlib.sha256((tmp_path / "train" / "manifest.json").read_bytes()).hexdigest()
    )
    manifest = dataset.manifest
    assert manifest["split"] == {"seed": 3} and manifest["format"] == "ml-csv"
    assert manifest["ratings"] == 500 and "counts" not in manifest
    assert sum(manifest["rows_per_partition"].values()) == 500

    got = dataset.read_ratings()
    assert got.schema.names == ["user_id", "movie_id", "rating", "timestamp"]
    assert (
        got.schema.field("user_id").type == pa.int32()
        and got.schema.field("rating").type == pa.float32()
    )
    expected = sorted(zip(*(table.column(c).to_pylist() for c in got.schema.names), strict=True))
    assert (
        sorted(zip(*(got.column(c).to_pylist() for c in got.schema.names), strict=True)) == expected
    )

    for bucket in range(5):
        (file,) = dataset.bucket_files(bucket)
        assert file == tmp_path / "train" / "ratings" / f"user_bucket={bucket}" / "part-0.parquet"
        part = dataset.read_ratings([bucket])
        users = part.column("user_id").to_numpy()
        assert np.all(users % 5 == bucket)
        key = users.astype(np.int64) * 1000 + part.column("movie_id").to_numpy()
        assert np.all(np.diff(key) > 0)
    assert (
        dataset.read_ratings([1, 3]).num_rows
        == manifest["rows_per_partition"]["1"] + manifest["rows_per_partition"]["3"]
    )

    users = dataset.user_ids()
    assert users.dtype == np.int32 and users.tolist() == sorted(
        set(table.column("user_id").to_pylist())
    )
    assert dataset.movie_ids().tolist() == sorted(set(table.column("movie_id").to_pylist()))
    assert manifest["users"] == len(users)
    assert pq.read_table(tmp_path / "train" / "rejects" / "part-0.parquet").num_rows == 0
    assert dataset.read_movies() is None
    assert is_dataset(tmp_path / "train")


def test_write_dataset_with_movies_and_overwrite(tmp_path, rng):
    movies = pa.table(
        {"movie_id": [1, 2], "title": ["A", "B"], "year": [1999, None], "genres": [["Drama"], []]}
    )
    out = tmp_path / "d"
    write_dataset(random_ratings(rng, 50), out, n_buckets=2, rating_scale=SCALE, movies=movies)
    with pytest.raises(PipelineError, match="already exists"):
        write_dataset(random_ratings(rng, 60), out, n_buckets=2, rating_scale=SCALE)
    dataset = write_dataset(
        random_ratings(rng, 60), out, n_buckets=3, rating_scale=SCALE, overwrite=True
    )
    assert dataset.manifest["ratings"] == 60 and dataset.n_buckets == 3
    assert dataset.read_movies() is None
    first = write_dataset(
        random_ratings(rng, 5), tmp_path / "m", n_buckets=1, rating_scale=SCALE, movies=movies
    )
    assert first.read_movies().schema == MOVIES_SCHEMA
    assert first.read_movies().column("year").to_pylist() == [1999, None]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["timestamp"]), "lacks column"),
        (lambda t: t.set_column(2, "rating", pa.array([9.0] * t.num_rows)), "outside 0.5..5.0"),
        (lambda t: t.set_column(0, "user_id", pa.array([0] * t.num_rows)), "non-positive"),
        (lambda t: pa.concat_tables([t, t.slice(0, 1)]), "duplicate"),
    ],
    ids=["missing-column", "out-of-scale", "bad-id", "duplicate"],
)
def test_write_dataset_refuses_unclean_ratings(tmp_path, rng, change, message):
    with pytest.raises(PipelineError, match=message):
        write_dataset(
            change(random_ratings(rng, 20)), tmp_path / "d", n_buckets=2, rating_scale=SCALE
        )
    assert not (tmp_path / "d").exists()
    assert list(tmp_path.iterdir()) == []


def test_open_dataset_refusals(tmp_path, rng):
    with pytest.raises(PipelineError, match="no such dataset folder"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"not an ingested dataset \(no manifest.json\)"):
        open_dataset(tmp_path / "empty")
    assert not is_dataset(tmp_path / "empty")

    dataset = write_dataset(
        random_ratings(rng, 20), tmp_path / "d", n_buckets=2, rating_scale=SCALE
    )
    manifest_path = dataset.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text('{\n  "schema_version": 1,\n  oops\n}')
    with pytest.raises(PipelineError, match=r"manifest.json line 3: not valid JSON"):
        open_dataset(dataset.path)
    manifest_path.write_text(json.dumps({**manifest, "schema_version": 2}))
    with pytest.raises(PipelineError, match="schema_version 2 is not supported"):
        open_dataset(dataset.path)
    del manifest["n_buckets"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="missing key 'n_buckets'") as info:
        open_dataset(dataset.path)
    assert "\n" not in str(info.value)
    assert not is_dataset(dataset.path)


def test_bucket_out_of_range(tmp_path, rng):
    dataset = write_dataset(
        random_ratings(rng, 20), tmp_path / "d", n_buckets=2, rating_scale=SCALE
    )
    with pytest.raises(PipelineError, match=r"bucket 2 out of range 0\.\.1"):
        dataset.read_ratings([2])
