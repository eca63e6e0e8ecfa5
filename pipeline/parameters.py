"""The trainable state of the model: biases and embeddings indexed by dense row numbers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Parameters(NamedTuple):
    """Biases and embeddings, indexed by `user_index` and `movie_index`."""

    global_mean: np.float32
    user_bias: np.ndarray
    """(n_users,) float32"""
    movie_bias: np.ndarray
    """(n_movies,) float32"""
    user_embedding: np.ndarray
    """(n_users, rank) float32, C-contiguous"""
    movie_embedding: np.ndarray
    """(n_movies, rank) float32, C-contiguous"""

    @property
    def rank(self) -> int:
        return int(self.user_embedding.shape[1])


def initial_parameters(
    n_users: int, n_movies: int, rank: int, global_mean: float, seed: int, init_scale: float
) -> Parameters:
    """Zero biases and small normal embeddings (std `init_scale / sqrt(rank)`), seeded."""
    rng = np.random.default_rng([seed, 0x5EED])
    scale = np.float32(init_scale / np.sqrt(rank))
    return Parameters(
        np.float32(global_mean),
        np.zeros(n_users, np.float32),
        np.zeros(n_movies, np.float32),
        (rng.standard_normal((n_users, rank), dtype=np.float32) * scale),
        (rng.standard_normal((n_movies, rank), dtype=np.float32) * scale),
    )
