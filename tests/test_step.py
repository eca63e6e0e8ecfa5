"""The step math (kernel, reducer, optimiser) against the loop reference, for any sharding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ReferenceOptimizer, step_sums

from pipeline.config import TrainConfig
from pipeline.optimizer import apply_rows, new_moments
from pipeline.parameters import Parameters, initial_parameters
from pipeline.reducer import RowSums, merge_partials
from pipeline.schedule import n_steps, rating_hash, step_of, validation_mask
from pipeline.shards import (
    MovieState,
    StepSpec,
    UserState,
    buckets_of_shard,
    make_shard,
    shard_step,
    shard_users,
)


def simulate(user_id, movie_id, rating, n_shards, config, start, epochs):
    """The trainer's step protocol in one process: shards, user rows, merge, movie update."""
    user_ids, movie_ids = np.unique(user_id), np.unique(movie_id)
    shards = [
        make_shard(user_id, movie_id, rating, s, n_shards, user_ids, movie_ids, config.seed, 0.0)
        for s in range(n_shards)
    ]
    users = []
    for s in range(n_shards):
        rows = shard_users(user_ids, s, n_shards)
        moments = {k: v[rows] for k, v in new_moments(config, len(user_ids), config.rank).items()}
        users.append(UserState(rows, start.user_bias[rows], start.user_embedding[rows], moments))
    movies = MovieState(start.global_mean, start.movie_bias.copy(), start.movie_embedding.copy())
    movie_moments = new_moments(config, len(movie_ids), config.rank)
    steps = n_steps(len(rating), config.batch_size)
    t, merged_steps = 0, []
    for epoch in range(1, epochs + 1):
        for step in range(steps):
            spec = StepSpec(config, epoch, step, steps, t + 1, (1.0, 5.0), False)
            results = [
                shard_step(sh, us, movies, spec) for sh, us in zip(shards, users, strict=True)
            ]
            merged = merge_partials(*[r.partial for r in results])
            t += 1
            apply_rows(
                config,
                t,
                merged.movies,
                movies.embedding,
                movies.bias,
                movie_moments,
                config.learning_rate_scale(epoch),
            )
            users = [r.users for r in results]
            merged_steps.append(merged)
    user_bias = np.zeros(len(user_ids), np.float32)
    user_embedding = np.zeros((len(user_ids), config.rank), np.float32)
    for state in users:
        user_bias[state.index] = state.bias
        user_embedding[state.index] = state.embedding
    params = Parameters(
        movies.global_mean, user_bias, movies.bias, user_embedding, movies.embedding
    )
    return params, merged_steps


@st.composite
def ratings(draw):
    """Few users and movies, many ratings: heavy index repetition in every batch."""
    n_users = draw(st.integers(1, 7))
    n_movies = draw(st.integers(1, 6))
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, n_users - 1), st.integers(0, n_movies - 1)),
            min_size=1,
            max_size=n_users * n_movies,
            unique=True,
        )
    )
    user_id = np.array([p[0] for p in pairs], np.int32) * 3 + 1
    movie_id = np.array([p[1] for p in pairs], np.int32) * 5 + 2
    values = draw(
        st.lists(
            st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0]), min_size=len(pairs), max_size=len(pairs)
        )
    )
    return user_id, movie_id, np.array(values, np.float32)


@settings(max_examples=60, deadline=None)
@given(
    data=ratings(),
    n_shards=st.integers(1, 6),
    optimizer=st.sampled_from(["adam", "sgd"]),
    batch_size=st.sampled_from([None, 1, 3, 8]),
    decay=st.sampled_from([1.0, 0.8]),
    seed=st.integers(0, 2**31),
)
def test_steps_match_reference_for_any_sharding(data, n_shards, optimizer, batch_size, decay, seed):
    user_id, movie_id, rating = data
    n_users, n_movies = len(np.unique(user_id)), len(np.unique(movie_id))
    config = TrainConfig(
        rank=3,
        optimizer=optimizer,
        learning_rate=0.05,
        batch_size=batch_size,
        learning_rate_decay=decay,
        regularization=0.1,
        bias_regularization=0.05,
        seed=seed,
    )
    start = initial_parameters(n_users, n_movies, 3, float(rating.mean()), seed, 0.5)
    ours, merged_steps = simulate(user_id, movie_id, rating, n_shards, config, start, epochs=2)

    ref = Parameters(start.global_mean, *(a.astype(np.float64) for a in start[1:]))
    ref_opt = ReferenceOptimizer(ref, config)
    users = np.searchsorted(np.unique(user_id), user_id)
    movies = np.searchsorted(np.unique(movie_id), movie_id)
    steps = n_steps(len(rating), batch_size)
    merged = iter(merged_steps)
    for epoch in (1, 2):
        which = step_of(user_id, movie_id, seed, epoch, steps)
        for step in range(steps):
            sums = step_sums(users, movies, rating, np.flatnonzero(which == step), ref)
            m = next(merged)
            assert m.ratings == int((which == step).sum())
            assert m.squared_error == pytest.approx(sums[4], rel=1e-4, abs=1e-5)
            movie_counts = dict(zip(m.movies.index.tolist(), m.movies.counts.tolist(), strict=True))
            assert movie_counts == sums[3]
            ref_opt.apply(ref, sums, config.learning_rate_scale(epoch))
    for name in ("user_bias", "movie_bias", "user_embedding", "movie_embedding"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-4, atol=1e-5)


def test_untouched_rows_do_not_move():
    user_id = np.array([1, 1, 2, 3], np.int32)
    movie_id = np.array([10, 11, 10, 12], np.int32)
    rating = np.array([5, 1, 3, 4], np.float32)
    config = TrainConfig(rank=4, batch_size=2, seed=1)
    start = initial_parameters(3, 3, 4, 3.0, 0, 0.5)
    which = step_of(user_id, movie_id, config.seed, 1, 2)
    user_ids, movie_ids = np.unique(user_id), np.unique(movie_id)
    shard = make_shard(user_id, movie_id, rating, 0, 1, user_ids, movie_ids, config.seed, 0.0)
    users = UserState(
        np.arange(3, dtype=np.int32),
        start.user_bias.copy(),
        start.user_embedding.copy(),
        new_moments(config, 3, 4),
    )
    movies = MovieState(start.global_mean, start.movie_bias.copy(), start.movie_embedding.copy())
    result = shard_step(shard, users, movies, StepSpec(config, 1, 0, 2, 1, (1, 5), False))

    in_step = which == 0
    touched_users = set(np.searchsorted(user_ids, user_id[in_step]).tolist())
    for row in range(3):
        moved = not np.array_equal(result.users.embedding[row], start.user_embedding[row])
        assert moved == (row in touched_users)
    assert set(result.partial.movies.index.tolist()) == set(
        np.searchsorted(movie_ids, movie_id[in_step]).tolist()
    )
    np.testing.assert_array_equal(users.embedding, start.user_embedding)  # inputs untouched


def test_repeated_index_gets_the_mean_of_its_gradients():
    """One user rated two movies in one batch: it moves by the average, not the sum."""
    user_id = np.array([1, 1], np.int32)
    movie_id = np.array([1, 2], np.int32)
    rating = np.array([5, 1], np.float32)
    params = initial_parameters(1, 2, 2, 3.0, 7, 1.0)
    config = TrainConfig(rank=2, optimizer="sgd", learning_rate=0.5, regularization=0.0)
    ours, _ = simulate(user_id, movie_id, rating, 1, config, params, epochs=1)
    e = 3.0 + params.movie_embedding @ params.user_embedding[0] - rating
    expected = (e[:, None] * params.movie_embedding).mean(axis=0)
    np.testing.assert_allclose(
        ours.user_embedding[0], params.user_embedding[0] - 0.5 * expected, rtol=1e-5
    )


@settings(max_examples=40, deadline=None)
@given(
    a=st.sets(st.integers(0, 30), max_size=12),
    b=st.sets(st.integers(0, 30), max_size=12),
)
def test_row_sums_merge_is_an_indexwise_sum(a, b):
    rng = np.random.default_rng(len(a) * 31 + len(b))
    dense = np.zeros((31, 2))
    dense_counts = np.zeros(31, int)

    def part(rows):
        index = np.array(sorted(rows), np.int32)
        sums = rng.standard_normal((len(index), 2)).astype(np.float32)
        counts = rng.integers(1, 5, len(index)).astype(np.int32)
        dense[index] += sums
        dense_counts[index] += counts
        return RowSums(index, sums, sums[:, 0].copy(), counts)

    merged = part(a).merge(part(b))
    assert merged.index.tolist() == sorted(a | b)
    np.testing.assert_allclose(merged.sums, dense[merged.index], rtol=1e-6)
    np.testing.assert_array_equal(merged.counts, dense_counts[merged.index])


def test_schedule_uses_every_rating_once_per_epoch_whatever_the_order(rng):
    user_id = rng.integers(1, 500, 5000).astype(np.int32)
    movie_id = rng.integers(1, 900, 5000).astype(np.int32)
    steps = 7
    which = step_of(user_id, movie_id, 3, 1, steps)
    perm = rng.permutation(5000)
    np.testing.assert_array_equal(step_of(user_id[perm], movie_id[perm], 3, 1, steps), which[perm])
    assert set(np.unique(which)) == set(range(steps))
    assert np.bincount(which).min() > 5000 / steps * 0.8
    assert not np.array_equal(which, step_of(user_id, movie_id, 3, 2, steps))  # reshuffled
    held = validation_mask(user_id, movie_id, 3, 0.1)
    assert 0.08 < held.mean() < 0.12
    assert rating_hash(user_id, movie_id, 1, 0).dtype == np.uint64


@pytest.mark.parametrize(("n_shards", "n_buckets"), [(1, 16), (4, 16), (16, 16), (32, 16), (6, 16)])
def test_shards_read_only_the_buckets_that_can_hold_their_users(n_shards, n_buckets):
    users = np.arange(1, 2000)
    for shard in range(n_shards):
        needed = set((users[users % n_shards == shard] % n_buckets).tolist())
        assert needed <= set(buckets_of_shard(shard, n_shards, n_buckets))
        assert len(buckets_of_shard(shard, n_shards, n_buckets)) == len(needed)
