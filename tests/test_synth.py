"""The synthetic generator: layout, invariants, planted truth, determinism, bad arguments."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pytest

from pipeline import synth
from pipeline.cli import main

USERS, MOVIES, RATINGS = 200, 600, 12_000


def _generate(out: Path, **kwargs) -> dict:
    arguments = {"n_users": USERS, "n_movies": MOVIES, "n_ratings": RATINGS, "rank": 4}
    arguments.update(kwargs)
    # Small chunks so several chunks (and their separate random streams) are exercised.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synth, "CHUNK_RATINGS", 3_000)
        return synth.generate(out, **arguments)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ml-synth"
    return out, _generate(out, seed=7)


@pytest.fixture(scope="module")
def ratings(generated: tuple[Path, dict]) -> pd.DataFrame:
    return pd.read_csv(generated[0] / "ratings.csv")


def test_layout_and_header(generated: tuple[Path, dict]) -> None:
    out, summary = generated
    assert sorted(p.name for p in out.iterdir()) == ["movies.csv", "planted.npz", "ratings.csv"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    with (out / "ratings.csv").open() as handle:
        assert handle.readline() == "userId,movieId,rating,timestamp\n"
        first = handle.readline()
    assert re.fullmatch(r"\d+,\d+,[0-5]\.[05],\d{9,10}\n", first)
    assert summary["n_ratings"] == RATINGS
    assert summary["seconds"] > 0


def test_ratings_text_is_written_like_movielens(generated: tuple[Path, dict]) -> None:
    text = (generated[0] / "ratings.csv").read_text().splitlines()[1:]
    assert len(text) == RATINGS
    pattern = re.compile(r"[1-9]\d*,[1-9]\d*,(0\.5|[1-4]\.[05]|5\.0),[1-9]\d{8,9}")
    assert all(pattern.fullmatch(line) for line in text)


def test_counts_uniqueness_and_order(ratings: pd.DataFrame) -> None:
    assert len(ratings) == RATINGS
    assert list(ratings.columns) == ["userId", "movieId", "rating", "timestamp"]
    per_user = ratings.groupby("userId").size()
    assert sorted(per_user.index) == list(range(1, USERS + 1))
    assert per_user.min() >= 20
    assert not ratings.duplicated(["userId", "movieId"]).any()
    # Grouped by user in ascending order, movies ascending within a user.
    order = ratings.sort_values(["userId", "movieId"], kind="stable").index
    assert (order == ratings.index).all()
    assert ratings["timestamp"].dtype == np.int64
    assert ratings["timestamp"].between(789_652_009, 1_574_327_703).all()


def test_ratings_on_half_star_grid(ratings: pd.DataFrame) -> None:
    values = ratings["rating"].to_numpy()
    assert values.min() >= 0.5
    assert values.max() <= 5.0
    np.testing.assert_array_equal(values * 2, np.round(values * 2))
    assert set(np.unique(values)) >= {1.0, 3.5, 5.0}


def test_looks_like_movielens(generated: tuple[Path, dict], ratings: pd.DataFrame) -> None:
    _, summary = generated
    assert 3.2 < ratings["rating"].mean() < 3.8
    assert 0.85 < ratings["rating"].std() < 1.2
    assert summary["rating_mean"] == pytest.approx(ratings["rating"].mean())
    assert summary["rating_std"] == pytest.approx(ratings["rating"].std(ddof=0))


def test_skew(ratings: pd.DataFrame) -> None:
    per_movie = ratings.groupby("movieId").size().sort_values(ascending=False)
    top_share = per_movie.iloc[: MOVIES // 10].sum() / RATINGS
    assert top_share > 0.3, top_share
    per_user = ratings.groupby("userId").size()
    assert per_user.max() > 4 * per_user.median()


def test_csv_parses_with_pandas_and_pyarrow(generated: tuple[Path, dict]) -> None:
    out, _ = generated
    by_pandas = pd.read_csv(out / "movies.csv")
    by_arrow = pacsv.read_csv(out / "movies.csv").to_pandas()
    pd.testing.assert_frame_equal(by_pandas, by_arrow)
    assert list(by_pandas.columns) == ["movieId", "title", "genres"]
    assert len(by_pandas) == MOVIES
    ratings_arrow = pacsv.read_csv(out / "ratings.csv")
    assert ratings_arrow.num_rows == RATINGS
    assert ratings_arrow.column_names == ["userId", "movieId", "rating", "timestamp"]


def test_movie_titles_round_trip(generated: tuple[Path, dict]) -> None:
    out, _ = generated
    movies = pd.read_csv(out / "movies.csv")
    titles = movies["title"]
    pattern = re.compile(r'(Movie (\d+)( "Redux")?|Synthetic Story (\d+), The) \((\d{4})\)')
    parsed = titles.str.fullmatch(pattern)
    assert parsed.all(), titles[~parsed].tolist()[:5]
    number = titles.str.extract(r"(\d+)", expand=False).astype(int)
    assert (number == movies["movieId"]).all()
    assert titles.str.contains(",").sum() > 5
    assert titles.str.contains('"').sum() > 0
    # The raw text quotes exactly when needed and doubles inner quotes, like MovieLens.
    raw = (out / "movies.csv").read_text().splitlines()
    for line, (_, row) in zip(raw[1:], movies.iterrows(), strict=True):
        if "," in row["title"] or '"' in row["title"]:
            quoted = '"' + row["title"].replace('"', '""') + '"'
            assert line == f"{row['movieId']},{quoted},{row['genres']}"
        else:
            assert line == f"{row['movieId']},{row['title']},{row['genres']}"
    with (out / "movies.csv").open(newline="") as handle:
        assert all(len(fields) == 3 for fields in csv.reader(handle))


def test_genres(generated: tuple[Path, dict]) -> None:
    genres = pd.read_csv(generated[0] / "movies.csv")["genres"]
    assert (genres == synth.NO_GENRES).any()
    listed = genres[genres != synth.NO_GENRES].str.split("|")
    assert all(set(g) <= set(synth.GENRES) and g == sorted(g) for g in listed)
    assert listed.map(len).max() > 1


def test_planted_truth_shapes(generated: tuple[Path, dict], ratings: pd.DataFrame) -> None:
    out, _ = generated
    with np.load(out / "planted.npz") as planted:
        truth = dict(planted)
    assert set(truth) == {
        "user_id",
        "movie_id",
        "global_mean",
        "user_bias",
        "movie_bias",
        "user_embedding",
        "movie_embedding",
        "noise",
        "rmse_floor",
        "rmse_bias_only",
    }
    assert truth["user_id"].dtype == truth["movie_id"].dtype == np.int32
    for key in ("global_mean", "user_bias", "movie_bias", "user_embedding", "movie_embedding"):
        assert truth[key].dtype == np.float32, key
    assert truth["user_embedding"].shape == (USERS, 4)
    assert truth["movie_embedding"].shape == (MOVIES, 4)
    assert truth["user_bias"].shape == (USERS,)
    assert truth["movie_bias"].shape == (MOVIES,)
    np.testing.assert_array_equal(truth["user_id"], np.arange(1, USERS + 1))
    movie_id = truth["movie_id"]
    assert movie_id[0] == 1
    assert (np.diff(movie_id) >= 1).all()
    assert movie_id[-1] > MOVIES  # there are gaps
    assert np.isin(ratings["movieId"], movie_id).all()
    assert float(truth["noise"]) == 0.5
    movies = pd.read_csv(out / "movies.csv")
    np.testing.assert_array_equal(movies["movieId"], movie_id)


def test_rmse_floor_recomputed(generated: tuple[Path, dict], ratings: pd.DataFrame) -> None:
    out, summary = generated
    truth = np.load(out / "planted.npz")
    user = np.searchsorted(truth["user_id"], ratings["userId"].to_numpy())
    movie = np.searchsorted(truth["movie_id"], ratings["movieId"].to_numpy())
    bias = (
        float(truth["global_mean"])
        + truth["user_bias"][user].astype(np.float64)
        + truth["movie_bias"][movie].astype(np.float64)
    )
    interaction = (
        truth["user_embedding"][user].astype(np.float64)
        * truth["movie_embedding"][movie].astype(np.float64)
    ).sum(axis=1)
    observed = ratings["rating"].to_numpy()
    floor = np.sqrt(np.mean((np.clip(bias + interaction, 0.5, 5.0) - observed) ** 2))
    bias_only = np.sqrt(np.mean((np.clip(bias, 0.5, 5.0) - observed) ** 2))
    assert float(truth["rmse_floor"]) == pytest.approx(floor, rel=1e-9)
    assert summary["rmse_floor"] == pytest.approx(floor, rel=1e-9)
    assert float(truth["rmse_bias_only"]) == pytest.approx(bias_only, rel=1e-9)
    # Noise 0.5 plus half-star rounding, and the low-rank part is worth a lot.
    assert 0.4 < floor < 0.6
    assert bias_only > floor + 0.2


def test_deterministic_for_a_seed(tmp_path: Path, generated: tuple[Path, dict]) -> None:
    out, _ = generated
    again = tmp_path / "again"
    _generate(again, seed=7)
    for name in ("ratings.csv", "movies.csv", "planted.npz"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    _generate(other, seed=8)
    assert (other / "ratings.csv").read_bytes() != (out / "ratings.csv").read_bytes()


@pytest.mark.parametrize(
    ("users", "movies", "ratings"),
    [(3, 25, 75), (5, 20, 100), (4, 30, 80), (1, 1000, 20)],
)
def test_extreme_but_valid_sizes(tmp_path: Path, users: int, movies: int, ratings: int) -> None:
    out = tmp_path / "out"
    synth.generate(out, n_users=users, n_movies=movies, n_ratings=ratings, seed=3)
    frame = pd.read_csv(out / "ratings.csv")
    assert len(frame) == ratings
    assert not frame.duplicated(["userId", "movieId"]).any()
    assert frame.groupby("userId").size().min() >= 20


def test_ratings_per_user_respects_bounds() -> None:
    for users, movies, ratings in [(50, 40, 1500), (1000, 500, 30_000), (10, 100, 999)]:
        counts = synth.ratings_per_user(users, movies, ratings, seed=1)
        assert counts.sum() == ratings
        assert counts.min() >= 20
        assert counts.max() <= movies


def test_samplers_agree_with_each_other_and_popularity() -> None:
    # The rejection sampler and the key sampler both implement successive weighted sampling
    # without replacement; their inclusion frequencies must match each other and, for a
    # single draw, the popularity itself.
    rng = np.random.default_rng(5)
    popularity = 1.0 / np.arange(1, 31)
    popularity /= popularity.sum()
    cumulative = np.cumsum(popularity)
    cumulative /= cumulative[-1]
    users = 20_000
    counts = np.full(users, 3, dtype=np.int64)
    owner, movie = synth._sample_sparse(rng, counts, cumulative)
    assert np.bincount(owner).tolist() == counts.tolist()
    assert len(np.unique(owner * 30 + movie)) == len(owner)
    sparse_freq = np.bincount(movie, minlength=30) / users
    dense = np.concatenate(synth._sample_dense(rng, counts, popularity))
    dense_freq = np.bincount(dense, minlength=30) / users
    np.testing.assert_allclose(sparse_freq, dense_freq, atol=0.02)
    single = synth._sample_sparse(rng, np.ones(users, dtype=np.int64), cumulative)[1]
    np.testing.assert_allclose(np.bincount(single, minlength=30) / users, popularity, atol=0.01)


def test_sample_movies_mixes_both_paths() -> None:
    rng = np.random.default_rng(9)
    popularity = np.linspace(1, 2, 400)
    popularity /= popularity.sum()
    cumulative = np.cumsum(popularity)
    counts = np.array([20, 390, 25, 50, 400], dtype=np.int64)  # 390 and 400 take the key path
    owner, movie = synth.sample_movies(rng, counts, popularity, cumulative)
    assert np.bincount(owner).tolist() == counts.tolist()
    assert len(np.unique(owner * 400 + movie)) == counts.sum()
    assert (np.lexsort((movie, owner)) == np.arange(len(owner))).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--users", "100", "--movies", "50", "--ratings", "1999"], "below 20 per user"),
        (["--users", "2", "--movies", "20", "--ratings", "41"], "exceeds the 40 distinct"),
        (["--users", "0", "--movies", "50", "--ratings", "100"], "--users must be at least 1"),
        (["--users", "1", "--movies", "19", "--ratings", "19"], "--movies must be at least 20"),
        (["--users", "2", "--movies", "50", "--ratings", "40", "--rank", "0"], "--rank"),
        (["--users", "2", "--movies", "50", "--ratings", "40", "--noise", "-1"], "--noise"),
        (["--users", "2", "--movies", "50", "--ratings", "40", "--noise", "nan"], "--noise"),
        (["--users", "2", "--movies", "50", "--ratings", "40", "--seed", "-1"], "--seed"),
    ],
)
def test_bad_arguments_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["synth", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("mfpipe synth: error: ")
    assert message in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    argv = ["synth", "--users", "3", "--movies", "30", "--ratings", "60", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mfpipe synth: error: {out} already exists; pass --overwrite to replace it"
    assert (out / "old.txt").exists()
    assert main([*argv, "--overwrite", "--seed", "4"]) == 0
    assert "60 ratings" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["movies.csv", "planted.npz", "ratings.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
