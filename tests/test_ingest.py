"""End-to-end ingest on the shared LocalCluster: layouts, accounting, duplicates, publish."""

from __future__ import annotations

import json
from pathlib import Path

import dask.dataframe as dd
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_fixtures import (
    csv_lines,
    gzip_file,
    ml100k_lines,
    sample_ratings,
    write_csv,
    write_dat,
    write_lines,
    write_ml100k,
    zip_folder,
)

from pipeline.dataset import open_dataset
from pipeline.errors import PipelineError
from pipeline.ingest import ingest

CSV_HEADER = "userId,movieId,rating,timestamp"


def expected_rows(ratings) -> list[tuple]:
    return sorted((u, m, r, t) for u, m, r, t in ratings)


def rows(dataset) -> list[tuple]:
    table = dataset.read_ratings()
    return sorted(
        zip(
            *(table.column(c).to_pylist() for c in ("user_id", "movie_id", "rating", "timestamp")),
            strict=True,
        )
    )


def check_accounting(dataset) -> dict:
    manifest = dataset.manifest
    (counts,) = manifest["counts"]["ratings_files"]
    assert counts["lines_read"] == counts["header_lines"] + counts["accepted"] + counts["rejected"]
    assert (
        counts["ratings"]
        == counts["accepted"] - counts["duplicates_dropped"]
        == manifest["ratings"]
    )
    assert sum(manifest["rows_per_partition"].values()) == manifest["ratings"]
    assert len(pq.read_table(dataset.path / "rejects" / "part-0.parquet")) == counts[
        "rejected"
    ] + sum(m["rejected"] for m in manifest["counts"]["movies_files"])
    return counts


def test_ml100k_folder_ingests_u_data_only(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 300)
    names = ["Other", *[f"G{k}" for k in range(1, 19)]]
    source = write_ml100k(tmp_path / "ml-100k", ratings, genre_names=names)
    # The fold files would add nothing new; u.data alone is read.
    write_lines(source / "ua.base", ml100k_lines([(999, 1, 5.0, 1)]))
    dataset = ingest(source, tmp_path / "out", dask_client)
    assert dataset.manifest["format"] == "ml-100k"
    assert rows(dataset) == expected_rows(ratings)
    counts = check_accounting(dataset)
    assert counts == {
        "source_file": str(source / "u.data"),
        "lines_read": 300,
        "header_lines": 0,
        "accepted": 300,
        "rejected": 0,
        "duplicates_dropped": 0,
        "ratings": 300,
    }
    movies = dataset.read_movies()
    assert movies.num_rows == 30
    first = movies.to_pylist()[6]
    assert first["movie_id"] == 7 and first["title"] == "Film 7" and first["year"] == 1997
    assert first["genres"] == ["Other", "G7", "G14"]
    assert {s["role"] for s in dataset.manifest["sources"]} == {"ratings", "movies", "genres"}
    assert dataset.rating_min == 1.0 and dataset.rating_step == 1.0


def test_single_fold_file(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 200)
    source = write_ml100k(tmp_path / "ml-100k", ratings)
    dataset = ingest(source / "u1.base", tmp_path / "out", dask_client)
    assert rows(dataset) == expected_rows(ratings[:100])
    assert dataset.read_movies() is None
    assert not (dataset.path / "movies").exists()


@pytest.mark.parametrize("ten_m", [False, True], ids=["ml-1m", "ml-10m"])
def test_dat_layouts(tmp_path, rng, dask_client, ten_m):
    ratings = sample_ratings(rng, 250, half=ten_m)
    source = write_dat(tmp_path / "src", ratings, ten_m=ten_m)
    dataset = ingest(source, tmp_path / "out", dask_client, block_size=512)
    assert dataset.manifest["format"] == ("ml-10m" if ten_m else "ml-1m")
    assert rows(dataset) == expected_rows(ratings)
    titles = dataset.read_movies().to_pylist()
    assert titles[0] == {"movie_id": 1, "title": "Café 1", "year": 1991, "genres": ["Action"]}
    assert titles[1]["genres"] == ["Comedy"] and titles[15]["genres"] == []
    assert (dataset.rating_min, dataset.rating_step) == ((0.5, 0.5) if ten_m else (1.0, 1.0))
    check_accounting(dataset)


def test_csv_layout_with_quoted_titles(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 400, half=True)
    source = write_csv(tmp_path / "ml-latest-small", ratings)
    dataset = ingest(source, tmp_path / "out", dask_client, block_size=700, n_buckets=5)
    assert rows(dataset) == expected_rows(ratings)
    counts = check_accounting(dataset)
    assert counts["header_lines"] == 1 and counts["lines_read"] == 401
    movie = dataset.read_movies().to_pylist()[2]
    assert movie == {
        "movie_id": 3,
        "title": "Story 3, The",
        "year": 1983,
        "genres": ["Action", "Comedy"],
    }
    assert [s["role"] for s in dataset.manifest["sources"]] == ["ratings", "movies"]
    (movies_counts,) = dataset.manifest["counts"]["movies_files"]
    assert movies_counts["lines_read"] == 31 and movies_counts["movies"] == 30


def test_zip_archive(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 120, half=True)
    source = write_csv(tmp_path / "ml-25m", ratings)
    (source / "README.txt").write_text("not data\n")
    archive = zip_folder(source, tmp_path / "ml-25m.zip")
    dataset = ingest(archive, tmp_path / "out", dask_client)
    assert rows(dataset) == expected_rows(ratings)
    assert dataset.read_movies().num_rows == 30
    entry = dataset.manifest["sources"][0]
    assert entry["path"] == str(archive) and entry["member"] == "ml-25m/ratings.csv"
    assert entry["compression"] == "zip"
    assert entry["bytes"] == (source / "ratings.csv").stat().st_size
    # No scratch or staging folder is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-25m", "ml-25m.zip", "out"]


def test_zip_of_ml100k_and_ml1m(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 80)
    for name, write in (
        ("ml-100k", lambda f: write_ml100k(f, ratings)),
        ("ml-1m", lambda f: write_dat(f, ratings, ten_m=False)),
    ):
        archive = zip_folder(write(tmp_path / name), tmp_path / f"{name}.zip")
        dataset = ingest(archive, tmp_path / f"out-{name}", dask_client)
        assert dataset.manifest["format"] == name
        assert rows(dataset) == expected_rows(ratings)
        assert dataset.read_movies().num_rows == 30


def test_gzip_file(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 150, half=True)
    plain = write_lines(tmp_path / "ratings.csv", [CSV_HEADER, *csv_lines(ratings)])
    (tmp_path / "data").mkdir()
    packed = gzip_file(plain, tmp_path / "data" / "ratings.csv.gz")
    dataset = ingest(packed, tmp_path / "out", dask_client, block_size=300)
    assert rows(dataset) == expected_rows(ratings)
    assert dataset.manifest["sources"][0]["compression"] == "gzip"
    assert check_accounting(dataset)["lines_read"] == 151


def test_bad_lines_across_blocks_are_numbered_in_the_file(tmp_path, rng, dask_client):
    good = csv_lines(sample_ratings(rng, 60, half=True))
    bad = {
        5: "1,2,3.0",
        17: "",
        30: "1,2,7.0,5",
        31: "nan,2,3.0,5",
        44: "1,2,3.0,-9",
        58: "2147483648,1,1.0,1",
    }
    lines: list[str | bytes] = [CSV_HEADER]
    for number in range(2, 62 + len(bad)):
        lines.append(bad[number] if number in bad else good.pop())
    lines[9] = b"3,4,\xff,5"  # line 10
    path = write_lines(tmp_path / "ratings.csv", lines)
    dataset = ingest(path, tmp_path / "out", dask_client, block_size=97, max_reject_fraction=0.2)
    rejects = pq.read_table(dataset.path / "rejects" / "part-0.parquet").to_pylist()
    assert [r["line_number"] for r in rejects] == [5, 10, 17, 30, 31, 44, 58]
    assert {r["source_file"] for r in rejects} == {str(path)}
    assert rejects[1]["raw_text"] == "3,4,\ufffd,5" and rejects[1]["reason"] == "invalid UTF-8"
    assert rejects[0]["reason"] == "expected 4 fields, found 3"
    assert rejects[2]["reason"] == "blank line"
    assert (
        rejects[3]["raw_text"] == "1,2,7.0,5"
        and rejects[3]["reason"] == "rating 7.0 outside 0.5..5.0"
    )
    assert rejects[4]["reason"] == "user_id not an integer: 'nan'"
    assert rejects[5]["reason"] == "timestamp -9 is negative"
    assert rejects[6]["reason"] == "user_id 2147483648 out of int32 range"
    counts = check_accounting(dataset)
    assert (counts["lines_read"], counts["rejected"], counts["accepted"]) == (
        len(lines),
        7,
        len(lines) - 8,
    )


def test_duplicates_keep_the_latest_then_the_later_line(tmp_path, dask_client):
    lines = [
        "1\t1\t3\t100",
        "1\t1\t4\t200",
        "2\t5\t1\t50",
        "1\t1\t5\t150",
        "2\t5\t2\t50",
        "3\t3\t3\t10",
        "2\t5\t3\t49",
    ]
    path = write_lines(tmp_path / "u.data", lines)
    dataset = ingest(path, tmp_path / "out", dask_client, block_size=11, n_buckets=2)
    assert rows(dataset) == [(1, 1, 4.0, 200), (2, 5, 2.0, 50), (3, 3, 3.0, 10)]
    counts = check_accounting(dataset)
    assert counts["duplicates_dropped"] == 4 and counts["ratings"] == 3


def test_reject_fraction_failure_publishes_nothing(tmp_path, rng, dask_client):
    lines = [*ml100k_lines(sample_ratings(rng, 50)), "1\t2\t3", "1\t2\tx\t4"]
    path = write_lines(tmp_path / "u.data", lines)
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as info:
        ingest(path, out, dask_client)
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"{path}: 2 of 52 lines rejected (3.85% > --max-reject-fraction 0.01); "
        "first bad line 51: expected 4 fields, found 3"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.data"]
    # The same file passes with a looser limit.
    dataset = ingest(path, out, dask_client, max_reject_fraction=0.05)
    assert dataset.manifest["counts"]["ratings_files"][0]["rejected"] == 2


def test_bad_movie_lines_are_accounted(tmp_path, rng, dask_client):
    source = write_csv(tmp_path / "src", sample_ratings(rng, 40, half=True), n_movies=150)
    with open(source / "movies.csv", "a") as f:
        f.write("abc,Broken (1999),Drama\n")
    dataset = ingest(source, tmp_path / "out", dask_client)
    (movie_counts,) = dataset.manifest["counts"]["movies_files"]
    assert movie_counts["rejected"] == 1 and movie_counts["lines_read"] == 152
    rejects = pq.read_table(dataset.path / "rejects" / "part-0.parquet").to_pylist()
    assert rejects == [
        {
            "source_file": str(source / "movies.csv"),
            "line_number": 152,
            "raw_text": "abc,Broken (1999),Drama",
            "reason": "movie_id not an integer: 'abc'",
        }
    ]


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.csv", "no such file or folder"),
        (lambda d: write_lines(d / "notes.txt", ["hello there"]), "unknown ratings format"),
        (lambda d: put(d / "ratings.csv", b""), "file is empty"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "unknown format; no u.data"),
        (lambda d: put(d / "x.zip", b"PK junk"), "not a readable zip"),
        (lambda d: put(d / "ratings.csv.gz", b"\x1f\x8b junk"), "cannot decompress"),
        (lambda d: write_lines(d / "ratings.csv", [CSV_HEADER]), "no rating lines"),
        (
            lambda d: write_lines(d / "ratings.csv", ["user,movie,rating,time"]),
            "expected the header",
        ),
    ],
    ids=[
        "missing",
        "unknown",
        "empty",
        "empty-folder",
        "bad-zip",
        "bad-gz",
        "header-only",
        "bad-header",
    ],
)
def test_unusable_sources_fail_with_one_line(tmp_path, dask_client, make, message):
    (tmp_path / "src").mkdir()
    source = make(tmp_path / "src")
    with pytest.raises(PipelineError, match=message) as info:
        ingest(source, tmp_path / "out", dask_client)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_overwrite_is_refused_then_replaces_atomically(tmp_path, rng, dask_client):
    first = write_lines(tmp_path / "a" / "u.data", ml100k_lines(sample_ratings(rng, 30)))
    second = write_lines(tmp_path / "b" / "u.data", ml100k_lines(sample_ratings(rng, 40)))
    out = tmp_path / "out"
    ingest(first, out, dask_client)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(PipelineError, match="already exists; pass --overwrite"):
        ingest(second, out, dask_client)
    assert (out / "manifest.json").read_bytes() == before
    # A failing run with overwrite leaves the old dataset in place.
    bad = write_lines(tmp_path / "c" / "u.data", ["1\t2\t3"])
    with pytest.raises(PipelineError):
        ingest(bad, out, dask_client, overwrite=True)
    assert (out / "manifest.json").read_bytes() == before
    dataset = ingest(second, out, dask_client, overwrite=True)
    assert dataset.manifest["ratings"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "out"]


def test_vocabulary_is_dense_and_stable(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 300, n_users=90, n_movies=70)
    path = write_lines(tmp_path / "u.data", ml100k_lines(ratings))
    one = ingest(path, tmp_path / "one", dask_client, n_buckets=3)
    two = ingest(path, tmp_path / "two", dask_client, n_buckets=16, block_size=101)
    users = sorted({r[0] for r in ratings})
    movies = sorted({r[1] for r in ratings})
    for dataset in (one, two):
        assert dataset.user_ids().tolist() == users and dataset.user_ids().dtype == np.int32
        assert dataset.movie_ids().tolist() == movies
        vocab = pq.read_table(dataset.path / "vocabulary" / "users.parquet").to_pydict()
        assert vocab["user_index"] == list(range(len(users)))
    for name in ("users", "movies"):
        a = pq.read_table(one.path / "vocabulary" / f"{name}.parquet")
        b = pq.read_table(two.path / "vocabulary" / f"{name}.parquet")
        assert a.equals(b)
    assert rows(one) == rows(two)


def test_output_is_readable_by_other_engines(tmp_path, rng, dask_client):
    ratings = sample_ratings(rng, 500, n_users=60, half=True)
    source = write_csv(tmp_path / "src", ratings)
    out = tmp_path / "out"
    dataset = ingest(source, out, dask_client, n_buckets=7)
    files = sorted((out / "ratings").glob("*/*.parquet"))
    assert [f.parent.name for f in files] == sorted(f"user_bucket={b}" for b in range(7))
    for file in files:
        table = pq.read_table(file)
        assert table.schema == pa.schema(
            [
                ("user_id", pa.int32()),
                ("movie_id", pa.int32()),
                ("rating", pa.float32()),
                ("timestamp", pa.int64()),
            ]
        )
        pairs = list(
            zip(
                table.column("user_id").to_pylist(),
                table.column("movie_id").to_pylist(),
                strict=True,
            )
        )
        assert pairs == sorted(pairs)
        bucket = int(file.parent.name.split("=")[1])
        assert all(u % 7 == bucket for u, _ in pairs)

    hive = pq.read_table(out / "ratings")
    assert hive.num_rows == 500 and set(hive.column("user_bucket").to_pylist()) == set(range(7))
    frame = pd.read_parquet(out / "ratings")
    assert len(frame) == 500 and frame["rating"].dtype == np.float32
    ddf = dd.read_parquet(str(out / "ratings"))
    assert int(ddf["user_id"].count().compute()) == 500
    assert float(ddf["rating"].sum().compute()) == pytest.approx(sum(r[2] for r in ratings))
    got = duckdb.sql(
        f"select count(*), sum(user_id % 7 = user_bucket::int), count(distinct user_bucket) "
        f"from read_parquet('{out}/ratings/*/*.parquet', hive_partitioning=true)"
    ).fetchall()[0]
    assert got == (500, 500, 7)
    titles = duckdb.sql(f"select count(*) from read_parquet('{out}/movies/*.parquet')").fetchall()[
        0
    ]
    assert titles == (30,)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["partitioning"]["rule"].startswith(
        "user_bucket"
    )
    assert open_dataset(out).checksum == dataset.checksum


# Random good, bad and duplicate lines through the whole cluster path, checked against a
# plain Python reading of the same lines.
GOOD = st.tuples(st.integers(1, 9), st.integers(1, 6), st.integers(1, 10), st.integers(0, 30))
BAD = st.sampled_from(
    ["1,2,3.0", "", "x,1,1.0,1", "1,1,9.0,1", "1,1,1.25,1", "1,-1,1.0,1", "1,1,nan,1"]
)


def reference(lines: list[str]) -> tuple[list[tuple], int, int]:
    latest: dict[tuple[int, int], tuple[int, int, float]] = {}
    rejected = accepted = 0
    for position, line in enumerate(lines):
        fields = line.split(",")
        try:
            u, m, r, t = int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])
            assert len(fields) == 4 and u > 0 and m > 0 and 0.5 <= r <= 5.0 and (r * 2).is_integer()
        except (ValueError, IndexError, AssertionError):
            rejected += 1
            continue
        accepted += 1
        if (u, m) not in latest or (t, position) >= latest[(u, m)][:2]:
            latest[(u, m)] = (t, position, r)
    rows = sorted((u, m, r, t) for (u, m), (t, _, r) in latest.items())
    return rows, accepted, rejected


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(GOOD.map(lambda g: f"{g[0]},{g[1]},{g[2] / 2:.1f},{g[3]}"), BAD),
        min_size=1,
        max_size=60,
    ),
    st.integers(8, 200),
)
def test_cluster_ingest_matches_reference(tmp_path_factory, dask_client, lines, block_size):
    folder = tmp_path_factory.mktemp("prop")
    path = write_lines(folder / "ratings.csv", [CSV_HEADER, *lines])
    expected, accepted, rejected = reference(lines)
    if not expected:
        with pytest.raises(PipelineError):
            ingest(
                path, folder / "out", dask_client, block_size=block_size, max_reject_fraction=1.0
            )
        return
    dataset = ingest(
        path, folder / "out", dask_client, block_size=block_size, max_reject_fraction=1.0
    )
    assert rows(dataset) == expected
    counts = check_accounting(dataset)
    assert (counts["accepted"], counts["rejected"]) == (accepted, rejected)
    assert counts["duplicates_dropped"] == accepted - len(expected)
