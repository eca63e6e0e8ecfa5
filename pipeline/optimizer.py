"""Optimisers that move each touched row by its averaged gradient.

The averaged gradient of a row is its merged gradient sum divided by its merged count, plus
the L2 term (`regularization * row`). Rows the step did not touch keep their values and their
optimiser state.

- `sgd`: ``row -= learning_rate * averaged_gradient``.
- `adam`: Adam on the averaged gradients, updating only the touched rows' moments ("lazy"
  Adam); the bias correction uses the global step count. With the whole training set as one
  batch every row is touched at each step and this is plain Adam.

The update of a row is one compiled pass over its values (gradient, moments, parameter), so
the client spends little time between steps.
"""

from __future__ import annotations

import numba
import numpy as np

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.parameters import Parameters
from pipeline.reducer import Partial

BETA1 = 0.9
BETA2 = 0.999
EPSILON = 1e-8

# The four trainable arrays of Parameters, in order.
_SLOTS = ("user_bias", "movie_bias", "user_embedding", "movie_embedding")


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


class Optimizer:
    """Applies merged Partials to Parameters in place; its state is checkpointable."""

    def __init__(self, params: Parameters, config: TrainConfig) -> None:
        if config.optimizer not in ("adam", "sgd"):
            raise NotImplementedError(f"optimizer {config.optimizer!r} is not implemented")
        self.config = config
        self.step_count = 0
        self.moments: dict[str, np.ndarray] = {}
        if config.optimizer == "adam":
            for slot in _SLOTS:
                shape = getattr(params, slot).shape
                self.moments[f"m_{slot}"] = np.zeros(shape, np.float32)
                self.moments[f"v_{slot}"] = np.zeros(shape, np.float32)

    def apply(self, params: Parameters, merged: Partial) -> None:
        """Move every touched row of `params` by its averaged gradient."""
        self.step_count += 1
        c = self.config
        sides = (
            (merged.users, "user_embedding", "user_bias"),
            (merged.movies, "movie_embedding", "movie_bias"),
        )
        for rows, emb_slot, bias_slot in sides:
            if len(rows.index) == 0:
                continue
            counts = rows.counts.astype(np.float32)
            self._update(
                emb_slot, params, rows.index, rows.sums, counts, c.regularization, c.learning_rate
            )
            self._update(
                bias_slot,
                params,
                rows.index,
                rows.bias_sums,
                counts,
                c.bias_regularization,
                c.effective_bias_learning_rate,
            )

    def _update(
        self,
        slot: str,
        params: Parameters,
        index: np.ndarray,
        sums: np.ndarray,
        counts: np.ndarray,
        reg: float,
        lr: float,
    ) -> None:
        array = _as_rows(getattr(params, slot))
        sums = _as_rows(np.ascontiguousarray(sums, np.float32))
        if self.config.optimizer == "sgd":
            _sgd_rows(array, index, sums, counts, np.float32(reg), np.float32(lr))
            return
        t = self.step_count
        _adam_rows(
            array,
            _as_rows(self.moments[f"m_{slot}"]),
            _as_rows(self.moments[f"v_{slot}"]),
            index,
            sums,
            counts,
            np.float32(reg),
            np.float32(lr / (1 - BETA1**t)),
            np.float32(1 / (1 - BETA2**t)),
        )

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint (moments and the step count)."""
        return {**self.moments, "step_count": np.array(self.step_count)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name in self.moments:
            if name not in state or state[name].shape != self.moments[name].shape:
                raise PipelineError(f"checkpoint lacks optimiser state {name!r} of the right shape")
            self.moments[name][...] = state[name]
        self.step_count = int(state["step_count"])
