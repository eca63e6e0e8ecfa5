"""Per-epoch training checkpoints: everything needed to resume and match an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.parameters import Parameters

logger = logging.getLogger(__name__)

KEEP = 2
"""Checkpoints kept per phase; older ones are removed."""
_PARAM_NAMES = ("user_bias", "movie_bias", "user_embedding", "movie_embedding")


@dataclass
class TrainingState:
    """The trainer's state at the end of an epoch."""

    phase: str
    """"search" (with validation, for early stopping) or "refit" (all ratings)"""
    epoch: int
    """epochs finished in this phase"""
    params: Parameters
    optimizer: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    best_epoch: int
    best_validation_rmse: float
    best_params: Parameters | None
    fingerprint: str
    """config fingerprint and dataset checksum; a checkpoint of another run is never resumed"""


def save(folder: Path, state: TrainingState) -> Path:
    """Write `state` as ``folder/<phase>-<epoch>.npz`` atomically and prune old checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"global_mean": np.array(state.params.global_mean)}
    for name in _PARAM_NAMES:
        arrays[f"param_{name}"] = getattr(state.params, name)
        if state.best_params is not None:
            arrays[f"best_{name}"] = getattr(state.best_params, name)
    arrays.update({f"opt_{k}": v for k, v in state.optimizer.items()})
    meta = {
        "phase": state.phase,
        "epoch": state.epoch,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_validation_rmse": state.best_validation_rmse,
        "fingerprint": state.fingerprint,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    order = 0 if state.phase == "search" else 1
    final = folder / f"checkpoint-{order}-{state.epoch:06d}.npz"
    tmp = folder / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in sorted(folder.glob(f"checkpoint-{order}-*.npz"))[:-KEEP]:
        old.unlink(missing_ok=True)
    logger.debug("checkpoint %s", final)
    return final


def load_latest(folder: Path | None, fingerprint: str) -> TrainingState | None:
    """The newest checkpoint in `folder` made by a run with the same `fingerprint`, if any."""
    if folder is None or not folder.is_dir():
        return None
    for path in sorted(folder.glob("checkpoint-*.npz"), reverse=True):
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        meta = json.loads(str(arrays["meta"]))
        if meta["fingerprint"] != fingerprint:
            raise PipelineError(
                f"{folder} holds checkpoints of a different run (other settings or data); "
                "remove it or choose another checkpoint folder"
            )
        gm = np.float32(arrays["global_mean"])
        params = Parameters(gm, *(arrays[f"param_{n}"] for n in _PARAM_NAMES))
        best = None
        if "best_user_bias" in arrays:
            best = Parameters(gm, *(arrays[f"best_{n}"] for n in _PARAM_NAMES))
        optimizer = {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}
        return TrainingState(
            meta["phase"],
            meta["epoch"],
            params,
            optimizer,
            meta["history"],
            meta["best_epoch"],
            meta["best_validation_rmse"],
            best,
            fingerprint,
        )
    return None
