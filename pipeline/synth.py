"""Synthetic MovieLens-style ratings drawn from a planted biased matrix factorisation.

The output folder has the ml-25m layout, so every stage that reads MovieLens reads it too:

- ``ratings.csv``: header ``userId,movieId,rating,timestamp``; half-star ratings in
  [0.5, 5.0] written like MovieLens (``3.5``, ``4.0``), integer Unix timestamps; rows grouped
  by user (ascending ``userId``) and sorted by ``movieId`` within a user; every
  (``userId``, ``movieId``) pair appears once and every user has at least 20 ratings.
- ``movies.csv``: header ``movieId,title,genres``; one row per movie (some movies may have no
  rating), titles such as ``Movie 17 (1994)`` or ``"Synthetic Story 23, The (2001)"``, quoted
  only when needed with inner quotes doubled, as MovieLens does; genres are ``A|B`` from the
  MovieLens genre names or ``(no genres listed)``.
- ``planted.npz``: the truth the ratings were drawn from:

  ``user_id`` (n_users,) int32 and ``movie_id`` (n_movies,) int32
      the MovieLens-style ids; row ``i`` of every per-user array belongs to ``user_id[i]``
      (the ``user_index``), likewise for movies.
  ``global_mean`` () float32, ``user_bias`` (n_users,) float32, ``movie_bias`` (n_movies,)
      float32, ``user_embedding`` (n_users, rank) float32, ``movie_embedding``
      (n_movies, rank) float32
      the planted model; its prediction is
      ``global_mean + user_bias + movie_bias + <user_embedding, movie_embedding>``.
  ``noise`` () float32
      the standard deviation of the Gaussian noise added before clipping and rounding.
  ``rmse_floor`` () float64
      RMSE of the planted prediction (computed in float64 from the float32 arrays above and
      clipped to [0.5, 5]) against the written ratings: the best any model can hope for.
  ``rmse_bias_only`` () float64
      the same for ``global_mean + user_bias + movie_bias`` alone; a factorisation model
      should land well below it.

Each rating is ``round_to_half(clip(prediction + noise, 0.5, 5))``. User activity is
lognormal (heavy-tailed, at least 20 ratings each), movie popularity is Zipf-like with
exponent 1, and each user's movies are drawn from that popularity without replacement.
Users are generated and written in chunks of about a million ratings, so memory stays
bounded whatever the size; everything is deterministic for a seed.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipeline.errors import PipelineError
from pipeline.publish import check_destination, publishing

logger = logging.getLogger(__name__)

MIN_RATINGS_PER_USER = 20
GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "IMAX",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
NO_GENRES = "(no genres listed)"

# Scales chosen so the written ratings look like MovieLens (mean about 3.5, std about 1.0)
# and the low-rank part carries a large share of the variance.
GLOBAL_MEAN = 3.55
USER_BIAS_STD = 0.40
MOVIE_BIAS_STD = 0.45
INTERACTION_STD = 0.70
USER_ACTIVITY_SIGMA = 1.25
POPULARITY_EXPONENT = 1.0

FIRST_TIMESTAMP = 789_652_009  # 1995-01-09, the first ml-25m rating
LAST_TIMESTAMP = 1_574_327_703  # 2019-11-21, the last ml-25m rating
CHUNK_RATINGS = 1 << 20
# A user rating at least 1/DENSE_FRACTION of all movies is sampled with one key per movie;
# lighter users are sampled by rejection, which is cheaper when they rate few movies.
DENSE_FRACTION = 8
DENSE_BLOCK = 1 << 22
RATING_TEXT = pa.array([f"{half / 2:.1f}" for half in range(11)])

_STREAM_PLANT, _STREAM_MOVIES, _STREAM_COUNTS = 0, 1, 2
_STREAM_CHUNK = 3


@dataclass(frozen=True)
class Planted:
    """The planted model and the popularity that drives which movies get rated."""

    user_id: np.ndarray  # (n_users,) int32
    movie_id: np.ndarray  # (n_movies,) int32
    global_mean: np.float32
    user_bias: np.ndarray  # (n_users,) float32
    movie_bias: np.ndarray  # (n_movies,) float32
    user_embedding: np.ndarray  # (n_users, rank) float32
    movie_embedding: np.ndarray  # (n_movies, rank) float32
    popularity: np.ndarray  # (n_movies,) float64, sums to 1


def check_arguments(
    n_users: int, n_movies: int, n_ratings: int, rank: int, noise: float, seed: int = 0
) -> None:
    """Raise `PipelineError` naming the first impossible argument."""
    if seed < 0:
        raise PipelineError(f"--seed must be >= 0, got {seed}")
    if n_users < 1:
        raise PipelineError(f"--users must be at least 1, got {n_users}")
    if n_movies < MIN_RATINGS_PER_USER:
        raise PipelineError(
            f"--movies must be at least {MIN_RATINGS_PER_USER} (every user rates at least "
            f"{MIN_RATINGS_PER_USER} distinct movies), got {n_movies}"
        )
    if n_ratings < MIN_RATINGS_PER_USER * n_users:
        raise PipelineError(
            f"--ratings {n_ratings:,} is below {MIN_RATINGS_PER_USER} per user "
            f"({MIN_RATINGS_PER_USER} x {n_users:,} users = {MIN_RATINGS_PER_USER * n_users:,})"
        )
    if n_ratings > n_users * n_movies:
        raise PipelineError(
            f"--ratings {n_ratings:,} exceeds the {n_users * n_movies:,} distinct "
            f"(user, movie) pairs of {n_users:,} users x {n_movies:,} movies"
        )
    if rank < 1:
        raise PipelineError(f"--rank must be at least 1, got {rank}")
    if not (math.isfinite(noise) and noise >= 0):
        raise PipelineError(f"--noise must be a finite number >= 0, got {noise}")
    if max(n_users, n_movies) > 100_000_000:
        raise PipelineError(
            f"--users and --movies must be at most 100,000,000 (int32 ids), got "
            f"{n_users:,} and {n_movies:,}"
        )


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def plant(n_users: int, n_movies: int, rank: int, seed: int) -> Planted:
    """Draw ids, biases, embeddings and movie popularity."""
    rng = _rng(seed, _STREAM_PLANT)
    user_id = np.arange(1, n_users + 1, dtype=np.int32)
    # Mostly consecutive movie ids with occasional gaps, like MovieLens.
    gaps = np.where(rng.random(n_movies) < 0.08, rng.integers(2, 30, n_movies), 1)
    gaps[0] = 1
    movie_id = np.cumsum(gaps).astype(np.int32)
    # Each coordinate has std (INTERACTION_STD**2 / rank) ** 0.25, so the dot product of a user
    # and a movie embedding has std INTERACTION_STD whatever the rank.
    scale = (INTERACTION_STD**2 / rank) ** 0.25
    user_embedding = rng.normal(0.0, scale, (n_users, rank)).astype(np.float32)
    movie_embedding = rng.normal(0.0, scale, (n_movies, rank)).astype(np.float32)
    user_bias = rng.normal(0.0, USER_BIAS_STD, n_users).astype(np.float32)
    movie_bias = rng.normal(0.0, MOVIE_BIAS_STD, n_movies).astype(np.float32)
    popularity_rank = rng.permutation(n_movies) + 1
    popularity = popularity_rank.astype(np.float64) ** -POPULARITY_EXPONENT
    popularity /= popularity.sum()
    return Planted(
        user_id=user_id,
        movie_id=movie_id,
        global_mean=np.float32(GLOBAL_MEAN),
        user_bias=user_bias,
        movie_bias=movie_bias,
        user_embedding=user_embedding,
        movie_embedding=movie_embedding,
        popularity=popularity,
    )


def ratings_per_user(n_users: int, n_movies: int, n_ratings: int, seed: int) -> np.ndarray:
    """(n_users,) int64 counts: lognormal activity, each in [20, n_movies], summing to N."""
    rng = _rng(seed, _STREAM_COUNTS)
    weight = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, n_users)
    counts = np.full(n_users, MIN_RATINGS_PER_USER, dtype=np.int64)
    remaining = n_ratings - int(counts.sum())
    while remaining > 0:
        room = n_movies - counts
        share = np.where(room > 0, weight, 0.0)
        add = np.minimum(np.floor(remaining * share / share.sum()).astype(np.int64), room)
        if add.sum() == 0:
            # Fewer ratings left than users with room: one more each for the most active.
            open_users = np.flatnonzero(room > 0)
            top = open_users[np.argsort(-weight[open_users], kind="stable")[:remaining]]
            add[top] = 1
        counts += add
        remaining -= int(add.sum())
    return counts


def chunk_bounds(counts: np.ndarray, target: int = CHUNK_RATINGS) -> list[tuple[int, int]]:
    """Consecutive user ranges [start, stop) of about `target` ratings each."""
    ends = np.cumsum(counts)
    bounds, start = [], 0
    n_users = len(counts)
    while start < n_users:
        before = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, before + target, side="right"))
        stop = min(max(stop, start + 1), n_users)
        bounds.append((start, stop))
        start = stop
    return bounds


def _sample_dense(
    rng: np.random.Generator, counts: np.ndarray, popularity: np.ndarray
) -> list[np.ndarray]:
    """Weighted sampling without replacement by exponential keys, one key per movie.

    Returns, per user, the chosen movie indices: (counts[i],) int64.
    """
    n_movies = len(popularity)
    rows = max(1, DENSE_BLOCK // n_movies)
    chosen = []
    for start in range(0, len(counts), rows):
        block = counts[start : start + rows]
        keys = rng.exponential(size=(len(block), n_movies)) / popularity
        order = np.argsort(keys, axis=1)
        chosen.extend(order[i, :k] for i, k in enumerate(block))
    return chosen


def _sample_sparse(
    rng: np.random.Generator, counts: np.ndarray, cumulative: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sampling without replacement by repeated draws, keeping first occurrences.

    Returns (owner, movie_index), both int64 of length counts.sum(): `owner` indexes `counts`.
    """
    n_movies = len(cumulative)
    owners = np.arange(len(counts))
    need = counts.astype(np.int64).copy()
    taken_owner: list[np.ndarray] = []
    taken_movie: list[np.ndarray] = []
    taken_keys = np.empty(0, dtype=np.int64)
    oversample = 1.3
    while need.any():
        active = owners[need > 0]
        draws = np.ceil(need[active] * oversample).astype(np.int64) + 4
        owner = np.repeat(active, draws)
        movie = np.searchsorted(cumulative, rng.random(len(owner)), side="right")
        movie = np.minimum(movie, n_movies - 1)
        key = owner * n_movies + movie
        # First occurrence of each (owner, movie) in draw order. Sorting, not hashing: numpy's
        # hash-based unique is very slow on these strided keys.
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        first = np.sort(order[np.r_[True, ordered[1:] != ordered[:-1]]])
        key, owner, movie = key[first], owner[first], movie[first]
        if len(taken_keys):
            at = np.minimum(np.searchsorted(taken_keys, key), len(taken_keys) - 1)
            fresh = taken_keys[at] != key
            key, owner, movie = key[fresh], owner[fresh], movie[fresh]
        group_start = np.searchsorted(owner, owner, side="left")
        keep = (np.arange(len(owner)) - group_start) < need[owner]
        key, owner, movie = key[keep], owner[keep], movie[keep]
        taken_owner.append(owner)
        taken_movie.append(movie)
        taken_keys = np.sort(np.concatenate((taken_keys, key)))
        need -= np.bincount(owner, minlength=len(counts))
        oversample *= 1.5
    return np.concatenate(taken_owner), np.concatenate(taken_movie)


def sample_movies(
    rng: np.random.Generator, counts: np.ndarray, popularity: np.ndarray, cumulative: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct movies for each user of a chunk.

    `counts` is (chunk_users,) int64. Returns (owner, movie_index) int64 arrays of length
    counts.sum(), sorted by owner (position in `counts`) then movie index.
    """
    n_movies = len(popularity)
    dense = counts * DENSE_FRACTION >= n_movies
    owner_parts, movie_parts = [], []
    dense_users = np.flatnonzero(dense)
    if len(dense_users):
        for user, movies in zip(
            dense_users, _sample_dense(rng, counts[dense_users], popularity), strict=True
        ):
            owner_parts.append(np.full(len(movies), user, dtype=np.int64))
            movie_parts.append(movies.astype(np.int64))
    sparse_users = np.flatnonzero(~dense)
    if len(sparse_users):
        owner, movie = _sample_sparse(rng, counts[sparse_users], cumulative)
        owner_parts.append(sparse_users[owner])
        movie_parts.append(movie)
    owner = np.concatenate(owner_parts)
    movie = np.concatenate(movie_parts)
    order = np.lexsort((movie, owner))
    return owner[order], movie[order]


def _timestamps(rng: np.random.Generator, owner: np.ndarray, n_owners: int) -> np.ndarray:
    """(len(owner),) int64 Unix times: each user rates within an active span of their own."""
    start = rng.integers(FIRST_TIMESTAMP, LAST_TIMESTAMP, n_owners)
    span = rng.exponential(90 * 86_400, n_owners)
    stamp = start[owner] + (rng.random(len(owner)) * span[owner]).astype(np.int64)
    return np.minimum(stamp, LAST_TIMESTAMP)


def write_movies(path: Path, movie_id: np.ndarray, seed: int) -> None:
    """movies.csv for (n_movies,) int32 `movie_id`, quoted exactly like MovieLens."""
    rng = _rng(seed, _STREAM_MOVIES)
    n = len(movie_id)
    years = np.clip(np.rint(2019 - rng.exponential(18.0, n)), 1902, 2019).astype(int)
    style = rng.random(n)
    n_genres = rng.choice([1, 2, 3, 4], size=n, p=[0.45, 0.3, 0.18, 0.07])
    no_genres = rng.random(n) < 0.02
    genre_draw = rng.random((n, len(GENRES))).argsort(axis=1)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["movieId", "title", "genres"])
        for i in range(n):
            mid, year = int(movie_id[i]), int(years[i])
            if style[i] < 0.06:
                title = f"Synthetic Story {mid}, The ({year})"
            elif style[i] < 0.08:
                title = f'Movie {mid} "Redux" ({year})'
            else:
                title = f"Movie {mid} ({year})"
            if no_genres[i]:
                genres = NO_GENRES
            else:
                genres = "|".join(sorted(GENRES[g] for g in genre_draw[i, : n_genres[i]]))
            writer.writerow([mid, title, genres])


def generate(
    out: Path,
    *,
    n_users: int,
    n_movies: int,
    n_ratings: int,
    seed: int = 0,
    rank: int = 8,
    noise: float = 0.5,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic ml-25m-style folder to `out`, published atomically.

    Returns a summary: ``n_users``, ``n_movies``, ``n_ratings``, ``n_movies_rated``,
    ``rating_mean``, ``rating_std``, ``rmse_floor``, ``rmse_bias_only``, ``seconds``.
    """
    check_arguments(n_users, n_movies, n_ratings, rank, noise, seed)
    out = Path(out)
    check_destination(out, overwrite)
    began = time.perf_counter()
    truth = plant(n_users, n_movies, rank, seed)
    counts = ratings_per_user(n_users, n_movies, n_ratings, seed)
    cumulative = np.cumsum(truth.popularity)
    cumulative /= cumulative[-1]
    global_mean = np.float64(truth.global_mean)
    rated = np.zeros(n_movies, dtype=bool)
    sums = np.zeros(4)  # ratings, squares, floor squared error, bias-only squared error
    write_options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    bounds = chunk_bounds(counts, CHUNK_RATINGS)
    with publishing(out, overwrite=overwrite) as staging:
        write_movies(staging / "movies.csv", truth.movie_id, seed)
        with (staging / "ratings.csv").open("wb") as handle:
            handle.write(b"userId,movieId,rating,timestamp\n")
            for number, (start, stop) in enumerate(bounds):
                rng = _rng(seed, _STREAM_CHUNK, number)
                owner, movie = sample_movies(rng, counts[start:stop], truth.popularity, cumulative)
                user = owner + start
                bias = (
                    global_mean
                    + truth.user_bias[user].astype(np.float64)
                    + truth.movie_bias[movie].astype(np.float64)
                )
                interaction = np.einsum(
                    "ij,ij->i",
                    truth.user_embedding[user].astype(np.float64),
                    truth.movie_embedding[movie].astype(np.float64),
                )
                prediction = bias + interaction
                noisy = prediction + rng.normal(0.0, noise, len(user))
                halves = np.rint(np.clip(noisy, 0.5, 5.0) * 2).astype(np.int64)
                rating = halves / 2
                sums += (
                    rating.sum(),
                    np.square(rating).sum(),
                    np.square(np.clip(prediction, 0.5, 5.0) - rating).sum(),
                    np.square(np.clip(bias, 0.5, 5.0) - rating).sum(),
                )
                rated[movie] = True
                table = pa.table(
                    {
                        "userId": truth.user_id[user],
                        "movieId": truth.movie_id[movie],
                        "rating": RATING_TEXT.take(halves),
                        "timestamp": _timestamps(rng, owner, stop - start),
                    }
                )
                pacsv.write_csv(table, handle, write_options)
                logger.debug(
                    "chunk %d/%d: users %d-%d, %d ratings",
                    number + 1,
                    len(bounds),
                    start,
                    stop,
                    len(user),
                )
        rmse_floor = math.sqrt(sums[2] / n_ratings)
        rmse_bias_only = math.sqrt(sums[3] / n_ratings)
        np.savez(
            staging / "planted.npz",
            user_id=truth.user_id,
            movie_id=truth.movie_id,
            global_mean=truth.global_mean,
            user_bias=truth.user_bias,
            movie_bias=truth.movie_bias,
            user_embedding=truth.user_embedding,
            movie_embedding=truth.movie_embedding,
            noise=np.float32(noise),
            rmse_floor=np.float64(rmse_floor),
            rmse_bias_only=np.float64(rmse_bias_only),
        )
    mean = sums[0] / n_ratings
    seconds = time.perf_counter() - began
    summary = {
        "n_users": n_users,
        "n_movies": n_movies,
        "n_ratings": n_ratings,
        "n_movies_rated": int(rated.sum()),
        "rating_mean": float(mean),
        "rating_std": float(math.sqrt(max(sums[1] / n_ratings - mean * mean, 0.0))),
        "rmse_floor": rmse_floor,
        "rmse_bias_only": rmse_bias_only,
        "seconds": seconds,
    }
    logger.info(
        "generated %s synthetic ratings (%s users, %s movies) in %.1f s; rmse_floor %.4f",
        f"{n_ratings:,}",
        f"{n_users:,}",
        f"{n_movies:,}",
        seconds,
        rmse_floor,
    )
    return summary
