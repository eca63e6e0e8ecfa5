"""Optimisers that move each touched row by its averaged gradient.

The averaged gradient of a row is its merged gradient sum divided by its merged count, plus
the L2 term (`regularization * row`). Rows the step did not touch keep their values and their
optimiser state.

- `sgd`: ``row -= learning_rate * averaged_gradient``.
- `adam`: Adam on the averaged gradients, updating only the touched rows' moments ("lazy"
  Adam); the bias correction uses the global step count. With the whole training set as one
  batch every row is touched at each step and this is plain Adam.

The same update serves the movie rows (on the client, after the reduction) and the user rows
(on the workers, where each shard holds its users). The update of a row is one compiled pass
over its values: gradient, moments, parameter.
"""

from __future__ import annotations

import numba
import numpy as np

from pipeline.config import TrainConfig
from pipeline.reducer import RowSums

BETA1 = 0.9
BETA2 = 0.999
EPSILON = 1e-8

MOMENT_NAMES = ("m_bias", "v_bias", "m_embedding", "v_embedding")


@numba.njit(cache=True, fastmath=True, nogil=True)
def _sgd_rows(array, index, sums, counts, reg, lr):
    for r in range(index.shape[0]):
        i = index[r]
        inv = np.float32(1.0) / counts[r]
        for j in range(array.shape[1]):
            array[i, j] -= lr * (sums[r, j] * inv + reg * array[i, j])


@numba.njit(cache=True, fastmath=True, nogil=True)
def _adam_rows(array, m, v, index, sums, counts, reg, lr_t, v_correction):
    b1, b2 = np.float32(BETA1), np.float32(BETA2)
    for r in range(index.shape[0]):
        i = index[r]
        inv = np.float32(1.0) / counts[r]
        for j in range(array.shape[1]):
            g = sums[r, j] * inv + reg * array[i, j]
            m[i, j] = b1 * m[i, j] + (1 - b1) * g
            v[i, j] = b2 * v[i, j] + (1 - b2) * g * g
            array[i, j] -= lr_t * m[i, j] / (np.sqrt(v[i, j] * v_correction) + EPSILON)


def _as_rows(array: np.ndarray) -> np.ndarray:
    """A (n, k) view of a (n,) or (n, k) array."""
    return array.reshape(len(array), -1)


def new_moments(config: TrainConfig, n_rows: int, rank: int) -> dict[str, np.ndarray]:
    """Zeroed optimiser state for `n_rows` rows: Adam's moments, nothing for SGD."""
    if config.optimizer == "sgd":
        return {}
    if config.optimizer != "adam":
        raise NotImplementedError(f"optimizer {config.optimizer!r} is not implemented")
    return {
        "m_bias": np.zeros(n_rows, np.float32),
        "v_bias": np.zeros(n_rows, np.float32),
        "m_embedding": np.zeros((n_rows, rank), np.float32),
        "v_embedding": np.zeros((n_rows, rank), np.float32),
    }


def apply_rows(
    config: TrainConfig,
    step_count: int,
    rows: RowSums,
    embedding: np.ndarray,
    bias: np.ndarray,
    moments: dict[str, np.ndarray],
    lr_scale: float = 1.0,
) -> None:
    """Move the touched rows of `embedding` (n, rank) and `bias` (n,) in place.

    `rows` holds the merged sums and counts; `step_count` (from 1) is the global step for
    Adam's bias correction; `moments` (from `new_moments`) is updated in place; `lr_scale`
    multiplies the configured step sizes.
    """
    if len(rows.index) == 0:
        return
    counts = rows.counts.astype(np.float32)
    for array, sums, reg, lr, m, v in (
        (
            embedding,
            rows.sums,
            config.regularization,
            config.learning_rate * lr_scale,
            moments.get("m_embedding"),
            moments.get("v_embedding"),
        ),
        (
            bias,
            rows.bias_sums,
            config.bias_regularization,
            config.effective_bias_learning_rate * lr_scale,
            moments.get("m_bias"),
            moments.get("v_bias"),
        ),
    ):
        sums = _as_rows(np.ascontiguousarray(sums, np.float32))
        if config.optimizer == "sgd":
            _sgd_rows(_as_rows(array), rows.index, sums, counts, np.float32(reg), np.float32(lr))
            continue
        _adam_rows(
            _as_rows(array),
            _as_rows(m),
            _as_rows(v),
            rows.index,
            sums,
            counts,
            np.float32(reg),
            np.float32(lr / (1 - BETA1**step_count)),
            np.float32(1 / (1 - BETA2**step_count)),
        )
