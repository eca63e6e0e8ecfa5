"""The gradient kernel: per-index gradient sums over a set of ratings, in one compiled pass.

For each rating the error is ``e = prediction - rating`` with the prediction
``global_mean + user_bias[u] + movie_bias[m] + <user_embedding[u], movie_embedding[m]>``.
The squared-error gradients are accumulated per index: ``e * movie_embedding[m]`` into the
user's row, ``e * user_embedding[u]`` into the movie's row and ``e`` into both biases. An index
that occurs several times receives the sum of its gradients; dividing by the occurrence counts
(`np.bincount`) gives the averaged gradient the optimiser applies.

The loop is compiled by numba: one fused pass reads each rating's two embedding rows once,
which a composition of NumPy calls cannot do without materialising (n, rank) temporaries.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from pipeline.parameters import Parameters


class GradientSums(NamedTuple):
    """Dense per-index sums over the ratings of one step of one shard."""

    user_sums: np.ndarray
    """(n_users, rank) float32"""
    movie_sums: np.ndarray
    """(n_movies, rank) float32"""
    user_bias_sums: np.ndarray
    """(n_users,) float32"""
    movie_bias_sums: np.ndarray
    """(n_movies,) float32"""
    squared_error: float
    """sum of squared errors"""


@numba.njit(cache=True, fastmath=True, nogil=True, inline="always")
def _accumulate_one(i, users, movies, ratings, gm, ub, mb, ue, me, us, ms, ubs, mbs):
    u = users[i]
    m = movies[i]
    e = gm + ub[u] + mb[m] - ratings[i]
    for j in range(ue.shape[1]):
        e += ue[u, j] * me[m, j]
    ubs[u] += e
    mbs[m] += e
    for j in range(ue.shape[1]):
        us[u, j] += e * me[m, j]
        ms[m, j] += e * ue[u, j]
    return e * e


@numba.njit(cache=True, fastmath=True, nogil=True)
def _accumulate_all(users, movies, ratings, gm, ub, mb, ue, me, us, ms, ubs, mbs):
    sse = 0.0
    for i in range(users.shape[0]):
        sse += _accumulate_one(i, users, movies, ratings, gm, ub, mb, ue, me, us, ms, ubs, mbs)
    return sse


@numba.njit(cache=True, fastmath=True, nogil=True)
def _accumulate_rows(rows, users, movies, ratings, gm, ub, mb, ue, me, us, ms, ubs, mbs):
    sse = 0.0
    for r in range(rows.shape[0]):
        sse += _accumulate_one(
            rows[r], users, movies, ratings, gm, ub, mb, ue, me, us, ms, ubs, mbs
        )
    return sse


def gradient_sums(
    user_index: np.ndarray,
    movie_index: np.ndarray,
    rating: np.ndarray,
    params: Parameters,
    rows: np.ndarray | None = None,
) -> GradientSums:
    """Sum the squared-error gradients of the selected ratings per user and per movie.

    `user_index`, `movie_index`: (n,) int32; `rating`: (n,) float32; `rows`: positions (int64)
    of the ratings to use, or None for all of them.
    """
    us = np.zeros_like(params.user_embedding)
    ms = np.zeros_like(params.movie_embedding)
    ubs = np.zeros_like(params.user_bias)
    mbs = np.zeros_like(params.movie_bias)
    args = (
        user_index,
        movie_index,
        rating,
        np.float32(params.global_mean),
        params.user_bias,
        params.movie_bias,
        params.user_embedding,
        params.movie_embedding,
        us,
        ms,
        ubs,
        mbs,
    )
    sse = _accumulate_all(*args) if rows is None else _accumulate_rows(rows, *args)
    return GradientSums(us, ms, ubs, mbs, float(sse))


@numba.njit(cache=True, fastmath=True, nogil=True)
def _predict(users, movies, gm, ub, mb, ue, me, out):
    for i in range(users.shape[0]):
        u = users[i]
        m = movies[i]
        p = gm
        if u >= 0:
            p += ub[u]
        if m >= 0:
            p += mb[m]
        if u >= 0 and m >= 0:
            for j in range(ue.shape[1]):
                p += ue[u, j] * me[m, j]
        out[i] = p


def predict(user_index: np.ndarray, movie_index: np.ndarray, params: Parameters) -> np.ndarray:
    """(n,) float32 unclipped predictions; an index of -1 (unseen) contributes nothing."""
    out = np.empty(len(user_index), np.float32)
    _predict(
        np.ascontiguousarray(user_index, dtype=np.int32),
        np.ascontiguousarray(movie_index, dtype=np.int32),
        np.float32(params.global_mean),
        params.user_bias,
        params.movie_bias,
        params.user_embedding,
        params.movie_embedding,
        out,
    )
    return out
