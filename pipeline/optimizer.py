"""Optimisers that move each touched row by its averaged gradient.

The averaged gradient of a row is its merged gradient sum divided by its merged count, plus
the L2 term (`regularization * row`). Rows the step did not touch keep their values and their
optimiser state.

- `sgd`: ``row -= learning_rate * averaged_gradient``.
- `adam`: Adam on the averaged gradients, updating only the touched rows' moments ("lazy"
  Adam); the bias correction uses the global step count. With the whole training set as one
  batch every row is touched at each step and this is plain Adam.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.parameters import Parameters
from pipeline.reducer import Partial, RowSums

BETA1 = 0.9
BETA2 = 0.999
EPSILON = 1e-8

# The four trainable arrays of Parameters, in order.
_SLOTS = ("user_bias", "movie_bias", "user_embedding", "movie_embedding")


def averaged_gradients(
    rows: RowSums, embedding: np.ndarray, bias: np.ndarray, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray]:
    """((t, rank), (t,)) float32 averaged gradients of the touched rows, L2 terms included."""
    counts = rows.counts.astype(np.float32)
    grad = rows.sums / counts[:, None]
    grad += config.regularization * embedding[rows.index]
    bias_grad = rows.bias_sums / counts
    bias_grad += config.bias_regularization * bias[rows.index]
    return grad, bias_grad


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
        lr = self.config.learning_rate
        bias_lr = self.config.effective_bias_learning_rate
        sides = (
            (merged.users, "user_embedding", "user_bias"),
            (merged.movies, "movie_embedding", "movie_bias"),
        )
        for rows, emb_slot, bias_slot in sides:
            if len(rows.index) == 0:
                continue
            embedding, bias = getattr(params, emb_slot), getattr(params, bias_slot)
            grad, bias_grad = averaged_gradients(rows, embedding, bias, self.config)
            self._update(embedding, emb_slot, rows.index, grad, lr)
            self._update(bias, bias_slot, rows.index, bias_grad, bias_lr)

    def _update(
        self, array: np.ndarray, slot: str, index: np.ndarray, grad: np.ndarray, lr: float
    ) -> None:
        full = len(index) == len(array)
        if self.config.optimizer == "sgd":
            if full:
                array -= lr * grad
            else:
                array[index] -= lr * grad
            return
        m, v = self.moments[f"m_{slot}"], self.moments[f"v_{slot}"]
        m_rows = m if full else m[index]
        v_rows = v if full else v[index]
        m_rows *= BETA1
        m_rows += (1 - BETA1) * grad
        v_rows *= BETA2
        v_rows += (1 - BETA2) * grad * grad
        t = self.step_count
        step = (lr / (1 - BETA1**t)) * m_rows / (np.sqrt(v_rows / (1 - BETA2**t)) + EPSILON)
        if full:
            array -= step
        else:
            m[index], v[index] = m_rows, v_rows
            array[index] -= step

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint (moments and the step count)."""
        return {**self.moments, "step_count": np.array(self.step_count)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name in self.moments:
            if name not in state or state[name].shape != self.moments[name].shape:
                raise PipelineError(f"checkpoint lacks optimiser state {name!r} of the right shape")
            self.moments[name][...] = state[name]
        self.step_count = int(state["step_count"])
