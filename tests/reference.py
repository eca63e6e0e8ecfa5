"""A plain, obviously correct reference of the training step, used as the oracle in tests.

Loops over ratings one at a time, keeps per-index sums and counts in dicts, and applies the
averaged-gradient update row by row. Slow and simple on purpose.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import TrainConfig
from pipeline.parameters import Parameters, initial_parameters
from pipeline.schedule import n_steps, step_of, validation_mask


def step_sums(users, movies, ratings, rows, params: Parameters):
    """Per-index gradient sums and counts over `rows`, one rating at a time (float64)."""
    user_sums, movie_sums, user_counts, movie_counts = {}, {}, {}, {}
    sse = 0.0
    for i in rows:
        u, m = int(users[i]), int(movies[i])
        pu = params.user_embedding[u].astype(np.float64)
        qm = params.movie_embedding[m].astype(np.float64)
        pred = float(params.global_mean) + params.user_bias[u] + params.movie_bias[m] + pu @ qm
        e = pred - ratings[i]
        sse += e * e
        g_u, b_u = user_sums.get(u, (np.zeros_like(pu), 0.0))
        user_sums[u] = (g_u + e * qm, b_u + e)
        g_m, b_m = movie_sums.get(m, (np.zeros_like(qm), 0.0))
        movie_sums[m] = (g_m + e * pu, b_m + e)
        user_counts[u] = user_counts.get(u, 0) + 1
        movie_counts[m] = movie_counts.get(m, 0) + 1
    return user_sums, movie_sums, user_counts, movie_counts, sse


class ReferenceOptimizer:
    """Adam or SGD on averaged gradients, one row at a time."""

    def __init__(self, params: Parameters, config: TrainConfig) -> None:
        self.config = config
        self.t = 0
        self.m = {name: np.zeros(getattr(params, name).shape) for name in params._fields[1:]}
        self.v = {name: np.zeros(getattr(params, name).shape) for name in params._fields[1:]}

    def _move(self, array, name, row, grad, lr):
        if self.config.optimizer == "sgd":
            array[row] = array[row] - lr * grad
            return
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.m[name][row] = b1 * self.m[name][row] + (1 - b1) * grad
        self.v[name][row] = b2 * self.v[name][row] + (1 - b2) * grad * grad
        m_hat = self.m[name][row] / (1 - b1**self.t)
        v_hat = self.v[name][row] / (1 - b2**self.t)
        array[row] = array[row] - lr * m_hat / (np.sqrt(v_hat) + eps)

    def apply(self, params: Parameters, sums, lr_scale: float = 1.0) -> None:
        user_sums, movie_sums, user_counts, movie_counts, _ = sums
        self.t += 1
        c = self.config
        lr = c.learning_rate * lr_scale
        blr = c.effective_bias_learning_rate * lr_scale
        for side, counts, emb, bias in (
            (user_sums, user_counts, "user_embedding", "user_bias"),
            (movie_sums, movie_counts, "movie_embedding", "movie_bias"),
        ):
            for row, (g, b) in side.items():
                n = counts[row]
                E, B = getattr(params, emb), getattr(params, bias)
                grad = g / n + c.regularization * E[row]
                bgrad = b / n + c.bias_regularization * B[row]
                self._move(E, emb, row, grad, lr)
                self._move(B, bias, row, bgrad, blr)


def reference_train(
    user_id: np.ndarray,
    movie_id: np.ndarray,
    rating: np.ndarray,
    config: TrainConfig,
    epochs: int,
) -> tuple[Parameters, list[float]]:
    """Train for exactly `epochs` epochs on the non-validation ratings; return params, RMSEs."""
    user_ids, movie_ids = np.unique(user_id), np.unique(movie_id)
    users = np.searchsorted(user_ids, user_id)
    movies = np.searchsorted(movie_ids, movie_id)
    train = ~validation_mask(user_id, movie_id, config.seed, config.validation_fraction)
    train_rows = np.flatnonzero(train)
    global_mean = float(np.asarray(rating, np.float64)[train].sum() / len(train_rows))
    p32 = initial_parameters(
        len(user_ids), len(movie_ids), config.rank, global_mean, config.seed, config.init_scale
    )
    params = Parameters(p32.global_mean, *(a.astype(np.float64) for a in p32[1:]))
    optimizer = ReferenceOptimizer(params, config)
    steps = n_steps(len(train_rows), config.batch_size)
    rmses = []
    for epoch in range(1, epochs + 1):
        which = step_of(user_id[train_rows], movie_id[train_rows], config.seed, epoch, steps)
        sse, n = 0.0, 0
        for step in range(steps):
            rows = train_rows[which == step]
            sums = step_sums(users, movies, rating, rows, params)
            optimizer.apply(params, sums, config.learning_rate_scale(epoch))
            sse += sums[4]
            n += len(rows)
        rmses.append(math.sqrt(sse / n))
    return params, rmses
