"""Shards: the training ratings split by user across workers, and the step each computes.

Shard `s` of `S` holds the ratings of the users with ``user_id % S == s``. It is loaded by a
task on a worker from the dataset's Parquet buckets (bucket ``b`` holds ``user_id % B == b``,
so shard `s` reads only the buckets with ``b % gcd(S, B) == s % gcd(S, B)``), which lets Dask
rebuild it elsewhere if its worker dies. The client never holds the ratings.

Because a shard holds every rating of its users, their gradient sums are complete inside the
shard: a step moves the shard's user rows right there (`UserState`, passed from step to step
as task results) and only the movie sums travel to the reducer. The client sends the movie
rows each step, a fraction of the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.kernel import gradient_sums, predict
from pipeline.optimizer import apply_rows
from pipeline.parameters import Parameters
from pipeline.reducer import Partial, RowSums
from pipeline.schedule import step_of, validation_mask


def buckets_of_shard(shard: int, n_shards: int, n_buckets: int) -> list[int]:
    """The buckets that can hold users of `shard`."""
    g = math.gcd(n_shards, n_buckets)
    return [b for b in range(n_buckets) if b % g == shard % g]


def shard_users(user_ids: np.ndarray, shard: int, n_shards: int) -> np.ndarray:
    """(n_s,) int32 ascending `user_index` of the users of `shard` (all of the vocabulary's)."""
    return np.flatnonzero(user_ids % n_shards == shard).astype(np.int32)


@dataclass
class UserState:
    """The rows of one shard's users: biases, embeddings and optimiser moments."""

    index: np.ndarray
    """(n_s,) int32 global `user_index` of row i"""
    bias: np.ndarray
    """(n_s,) float32"""
    embedding: np.ndarray
    """(n_s, rank) float32"""
    moments: dict[str, np.ndarray]
    """`pipeline.optimizer.new_moments` arrays for these rows"""

    def copy(self) -> UserState:
        return UserState(
            self.index,
            self.bias.copy(),
            self.embedding.copy(),
            {k: v.copy() for k, v in self.moments.items()},
        )


@dataclass(frozen=True)
class MovieState:
    """What the client sends each step: the global mean and every movie row."""

    global_mean: np.float32
    bias: np.ndarray
    """(n_movies,) float32"""
    embedding: np.ndarray
    """(n_movies, rank) float32"""


@dataclass(frozen=True)
class StepSpec:
    """Which step to compute, and how."""

    config: TrainConfig
    epoch: int
    step: int
    steps: int
    step_count: int
    """global step number from 1, for Adam's bias correction"""
    rating_range: tuple[float, float]
    with_validation: bool
    """also report the validation error of the state before the step"""
    with_gradients: bool = True


@dataclass
class StepResult:
    """A shard's output for one step: its moved user rows and its movie partial sums."""

    users: UserState
    partial: Partial


@dataclass
class Shard:
    """The ratings of one shard, split into training and validation parts."""

    shard: int
    user_id: np.ndarray
    """(n,) int32 training ratings' user ids (the schedule hashes ids, not indices)"""
    movie_id: np.ndarray
    """(n,) int32"""
    user_row: np.ndarray
    """(n,) int32 row of the rating's user in this shard's `UserState`"""
    movie_index: np.ndarray
    """(n,) int32"""
    rating: np.ndarray
    """(n,) float32"""
    validation_user_row: np.ndarray
    """(v,) int32"""
    validation_movie_index: np.ndarray
    """(v,) int32"""
    validation_rating: np.ndarray
    """(v,) float32"""
    n_users: int
    """users of this shard"""
    n_movies: int
    _epoch_rows: tuple[int, int, list[np.ndarray]] | None = field(default=None, repr=False)
    _full_counts: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def n_ratings(self) -> int:
        return len(self.rating)

    def summary(self) -> tuple[int, float, int]:
        """(training ratings, their sum, validation ratings)."""
        return self.n_ratings, float(self.rating.sum(dtype=np.float64)), len(self.validation_rating)

    def rows(self, seed: int, epoch: int, step: int, steps: int) -> np.ndarray | None:
        """Positions (int64) of this shard's ratings in `step` of `epoch`; None means all."""
        if steps == 1:
            return None
        if self._epoch_rows is None or self._epoch_rows[:2] != (epoch, steps):
            steps_of = step_of(self.user_id, self.movie_id, seed, epoch, steps)
            order = np.argsort(steps_of, kind="stable")
            bounds = np.searchsorted(steps_of[order], np.arange(steps + 1))
            groups = [order[bounds[i] : bounds[i + 1]] for i in range(steps)]
            self._epoch_rows = (epoch, steps, groups)
        return self._epoch_rows[2][step]

    def counts(self, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Occurrences of each user row and movie_index among `rows`: (n_users,), (n_movies,)."""
        if rows is None:
            if self._full_counts is None:
                self._full_counts = (
                    np.bincount(self.user_row, minlength=self.n_users),
                    np.bincount(self.movie_index, minlength=self.n_movies),
                )
            return self._full_counts
        return (
            np.bincount(self.user_row[rows], minlength=self.n_users),
            np.bincount(self.movie_index[rows], minlength=self.n_movies),
        )

    def validation_squared_error(
        self, params: Parameters, rating_range: tuple[float, float]
    ) -> float:
        """Sum of squared errors of the clipped predictions on the validation ratings."""
        if len(self.validation_rating) == 0:
            return 0.0
        pred = predict(self.validation_user_row, self.validation_movie_index, params)
        np.clip(pred, *rating_range, out=pred)
        err = pred - self.validation_rating
        return float(np.dot(err, err))


def load_shard(
    files: list[str],
    shard: int,
    n_shards: int,
    user_ids: np.ndarray,
    movie_ids: np.ndarray,
    seed: int,
    validation_fraction: float,
) -> Shard:
    """Read the Parquet `files`, keep this shard's users and split off the validation ratings.

    `user_ids`, `movie_ids`: (n,) int32 ascending vocabularies; an id's position is its index.
    """
    parts = [pq.read_table(f, columns=["user_id", "movie_id", "rating"]) for f in files]
    user_id = np.concatenate([p.column("user_id").to_numpy() for p in parts]).astype(np.int32)
    movie_id = np.concatenate([p.column("movie_id").to_numpy() for p in parts]).astype(np.int32)
    rating = np.concatenate([p.column("rating").to_numpy() for p in parts]).astype(np.float32)
    return make_shard(
        user_id, movie_id, rating, shard, n_shards, user_ids, movie_ids, seed, validation_fraction
    )


def make_shard(
    user_id: np.ndarray,
    movie_id: np.ndarray,
    rating: np.ndarray,
    shard: int,
    n_shards: int,
    user_ids: np.ndarray,
    movie_ids: np.ndarray,
    seed: int,
    validation_fraction: float,
) -> Shard:
    """Keep this shard's users of (n,) ratings arrays and split off the validation ratings."""
    mine = user_id % n_shards == shard
    user_id, movie_id, rating = user_id[mine], movie_id[mine], rating[mine]
    users = user_ids[shard_users(user_ids, shard, n_shards)]
    user_row = _to_index(user_id, users, "user_id")
    movie_index = _to_index(movie_id, movie_ids, "movie_id")

    held = validation_mask(user_id, movie_id, seed, validation_fraction)
    train = ~held
    return Shard(
        shard=shard,
        user_id=np.ascontiguousarray(user_id[train]),
        movie_id=np.ascontiguousarray(movie_id[train]),
        user_row=np.ascontiguousarray(user_row[train]),
        movie_index=np.ascontiguousarray(movie_index[train]),
        rating=np.ascontiguousarray(rating[train]),
        validation_user_row=user_row[held],
        validation_movie_index=movie_index[held],
        validation_rating=rating[held],
        n_users=len(users),
        n_movies=len(movie_ids),
    )


def _to_index(ids: np.ndarray, vocabulary: np.ndarray, name: str) -> np.ndarray:
    index = np.searchsorted(vocabulary, ids).astype(np.int32)
    np.minimum(index, max(len(vocabulary) - 1, 0), out=index)
    if len(ids) and not np.array_equal(vocabulary[index], ids):
        raise PipelineError(f"a {name} in the ratings is missing from the dataset's vocabulary")
    return index


def shard_summary(shard: Shard) -> tuple[int, float, int]:
    """Task wrapper of `Shard.summary`."""
    return shard.summary()


def shard_step(shard: Shard, users: UserState, movies: MovieState, spec: StepSpec) -> StepResult:
    """One shard's step: move its user rows, and report its movie gradient sums and counts.

    The inputs are not modified, so a step can be retried. With `spec.with_validation`, the
    result also carries the validation error of the state before the step.
    """
    params = Parameters(
        movies.global_mean, users.bias, movies.bias, users.embedding, movies.embedding
    )
    validation_sse, n_validation = 0.0, 0
    if spec.with_validation:
        validation_sse = shard.validation_squared_error(params, spec.rating_range)
        n_validation = len(shard.validation_rating)
    if not spec.with_gradients:
        empty = _empty_rows(params.rank)
        return StepResult(users, Partial(empty, 0.0, 0, validation_sse, n_validation))

    rows = shard.rows(spec.config.seed, spec.epoch, spec.step, spec.steps)
    sums = gradient_sums(shard.user_row, shard.movie_index, shard.rating, params, rows)
    user_counts, movie_counts = shard.counts(rows)
    moved = users.copy()
    user_rows = RowSums.from_dense(sums.user_sums, sums.user_bias_sums, user_counts)
    apply_rows(
        spec.config,
        spec.step_count,
        user_rows,
        moved.embedding,
        moved.bias,
        moved.moments,
        spec.config.learning_rate_scale(spec.epoch),
    )
    partial = Partial(
        RowSums.from_dense(sums.movie_sums, sums.movie_bias_sums, movie_counts),
        sums.squared_error,
        shard.n_ratings if rows is None else len(rows),
        validation_sse,
        n_validation,
    )
    return StepResult(moved, partial)


def result_users(result: StepResult) -> UserState:
    """Task: the moved user rows of a step result."""
    return result.users


def result_partial(result: StepResult) -> Partial:
    """Task: the movie partial of a step result."""
    return result.partial


def _empty_rows(rank: int) -> RowSums:
    return RowSums(
        np.zeros(0, np.int32),
        np.zeros((0, rank), np.float32),
        np.zeros(0, np.float32),
        np.zeros(0, np.int32),
    )
