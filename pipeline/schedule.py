"""The seeded schedule: which ratings are held out and which step of an epoch uses each rating.

Both are functions of (seed, user_id, movie_id[, epoch]) alone, through a counter-based hash,
so they do not depend on row order, partitioning or sharding: any sharding of the same ratings
trains on exactly the same batches.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_VALIDATION_STREAM = 0xA5A5_0001


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def rating_hash(user_id: np.ndarray, movie_id: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A well-mixed (n,) uint64 per (user_id, movie_id) pair, independent per seed and stream."""
    key = (user_id.astype(np.uint64) << np.uint64(32)) | movie_id.astype(np.uint64)
    salt = splitmix64(np.array([(seed & 0xFFFFFFFF) << 32 | (stream & 0xFFFFFFFF)], np.uint64))
    return splitmix64(key ^ salt[0])


def validation_mask(
    user_id: np.ndarray, movie_id: np.ndarray, seed: int, fraction: float
) -> np.ndarray:
    """(n,) bool: True for the ratings held out for validation (about `fraction` of them)."""
    if fraction <= 0:
        return np.zeros(len(user_id), dtype=bool)
    h = rating_hash(user_id, movie_id, seed, _VALIDATION_STREAM)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def n_steps(n_ratings: int, batch_size: int | None) -> int:
    """Steps per epoch: one when the batch is the whole training set."""
    if batch_size is None or batch_size >= n_ratings:
        return 1
    return -(-n_ratings // batch_size)


def step_of(
    user_id: np.ndarray, movie_id: np.ndarray, seed: int, epoch: int, steps: int
) -> np.ndarray:
    """(n,) int32: the step of `epoch` in which each rating is used."""
    if steps == 1:
        return np.zeros(len(user_id), dtype=np.int32)
    h = rating_hash(user_id, movie_id, seed, epoch)
    return (h % np.uint64(steps)).astype(np.int32)
