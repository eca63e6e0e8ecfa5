"""The training loop: shards on the workers, a tree reduction, averaged updates on the client.

Each step, every shard computes the gradient sums and counts of its part of the batch
(`pipeline.shards.shard_step`), a tree of tasks merges them (`pipeline.reducer`), and the
optimiser moves each touched row by its averaged gradient (`pipeline.optimizer`). The
parameters are sent once per step to each worker that holds shards.

Training runs in up to two phases. "search" holds out a seeded validation share and stops
early when the validation RMSE has not improved for `patience` epochs. With `refit`, a second
phase retrains from the same initial state on all the ratings for the best epoch count, so
no rating is wasted; otherwise the best search epoch is kept.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from distributed import CancelledError, Client, Future, KilledWorker

from pipeline import __version__, checkpoint
from pipeline.checkpoint import TrainingState
from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.model import Model
from pipeline.optimizer import Optimizer
from pipeline.parameters import Parameters, initial_parameters
from pipeline.progress import EpochProgress
from pipeline.reducer import Partial, tree_reduce
from pipeline.schedule import n_steps
from pipeline.shards import bucket_files, buckets_of_shard, load_shard, shard_step, shard_summary

logger = logging.getLogger(__name__)

STEP_ATTEMPTS = 5
"""Tries of one step when workers are lost; the step is a pure function, so a retry is exact."""


class RatingsSource(Protocol):
    """What the trainer needs of an ingested dataset (`pipeline.dataset.Dataset`)."""

    path: Path
    n_buckets: int
    rating_min: float
    rating_max: float
    checksum: str

    def user_ids(self) -> np.ndarray: ...

    def movie_ids(self) -> np.ndarray: ...


class TrainingDiverged(PipelineError):
    """The loss became non-finite or exploded; no model is written."""


@dataclass
class TrainResult:
    """The trained model and one record per epoch (phase, epoch, train_rmse, validation_rmse,
    seconds, ratings_per_second)."""

    model: Model
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    dataset: RatingsSource,
    config: TrainConfig,
    client: Client,
    *,
    checkpoint_dir: Path | None = None,
    metrics_path: Path | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Fit the model on `dataset` with the cluster behind `client`.

    Resumes from the newest checkpoint in `checkpoint_dir` made with the same settings and
    data; the result then equals that of an uninterrupted run. Appends one JSON line per epoch
    to `metrics_path`. `progress`: a bar (True), log lines (False) or by terminal (None).
    """
    return _Trainer(dataset, config, client, checkpoint_dir, metrics_path, progress).run()


class _ShardSet:
    """The futures of the shards of one phase, and the step protocol over them."""

    def __init__(
        self,
        client: Client,
        dataset: RatingsSource,
        n_shards: int,
        user_ids: np.ndarray,
        movie_ids: np.ndarray,
        seed: int,
        validation_fraction: float,
    ) -> None:
        self.client = client
        workers = sorted(client.scheduler_info()["workers"])
        token = uuid.uuid4().hex[:8]
        self.futures: list[Future] = []
        for shard in range(n_shards):
            files = bucket_files(dataset.path, buckets_of_shard(shard, n_shards, dataset.n_buckets))
            self.futures.append(
                client.submit(
                    load_shard,
                    files,
                    shard,
                    n_shards,
                    user_ids,
                    movie_ids,
                    seed,
                    validation_fraction,
                    key=f"shard-{token}-{shard}",
                    workers=[workers[shard % len(workers)]],
                    allow_other_workers=True,
                )
            )
        summaries = client.gather([client.submit(shard_summary, f) for f in self.futures])
        self.n_train = sum(s[0] for s in summaries)
        self.train_sum = sum(s[1] for s in summaries)
        self.n_validation = sum(s[2] for s in summaries)

    def step(self, params: Parameters, **spec: Any) -> Partial:
        """Run one step on all shards and return the merged Partial, retrying on lost workers."""
        for attempt in range(1, STEP_ATTEMPTS + 1):
            try:
                return self._step_once(params, spec)
            except (KilledWorker, CancelledError, OSError) as exc:
                if attempt == STEP_ATTEMPTS:
                    raise PipelineError(
                        f"step failed {STEP_ATTEMPTS} times as workers were lost: {exc}"
                    ) from None
                logger.warning(
                    "a worker was lost during epoch %d step %d (%s: %s); retrying the step",
                    spec["epoch"],
                    spec["step"],
                    type(exc).__name__,
                    exc,
                )
                self.client.wait_for_workers(1, timeout=60)
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _step_once(self, params: Parameters, spec: dict[str, Any]) -> Partial:
        holders = self.client.who_has(self.futures)
        workers = sorted(self.client.scheduler_info()["workers"])
        shard_workers = []
        for future in self.futures:
            where = holders.get(future.key) or (workers[0],)
            shard_workers.append(where[0])
        param_futures = {
            w: self.client.scatter([params], workers=[w], hash=False)[0]
            for w in sorted(set(shard_workers))
        }
        token = uuid.uuid4().hex[:8]
        steps = [
            self.client.submit(
                shard_step,
                future,
                param_futures[w],
                **spec,
                key=f"step-{token}-{i}",
                workers=[w],
                allow_other_workers=True,
            )
            for i, (future, w) in enumerate(zip(self.futures, shard_workers, strict=True))
        ]
        return tree_reduce(self.client, steps, key_prefix=f"merge-{token}").result()

    def release(self) -> None:
        self.client.cancel(self.futures)
        self.futures = []


class _Trainer:
    def __init__(
        self,
        dataset: RatingsSource,
        config: TrainConfig,
        client: Client,
        checkpoint_dir: Path | None,
        metrics_path: Path | None,
        progress: bool | None,
    ) -> None:
        self.dataset = dataset
        self.config = config
        self.client = client
        self.checkpoint_dir = checkpoint_dir
        self.metrics_path = metrics_path
        self.progress_enabled = progress
        self.user_ids = dataset.user_ids()
        self.movie_ids = dataset.movie_ids()
        self.rating_range = (float(dataset.rating_min), float(dataset.rating_max))
        self.fingerprint = f"{config.fingerprint()}-{dataset.checksum[:16]}"
        self.history: list[dict[str, Any]] = []

    def run(self) -> TrainResult:
        started = time.perf_counter()
        n_workers = len(self.client.scheduler_info()["workers"])
        if n_workers == 0:
            self.client.wait_for_workers(1, timeout=60)
            n_workers = len(self.client.scheduler_info()["workers"])
        n_shards = self.config.shards or n_workers
        logger.info(
            "training rank %d on %d users x %d movies, %d shards on %d workers",
            self.config.rank,
            len(self.user_ids),
            len(self.movie_ids),
            n_shards,
            n_workers,
        )

        state = checkpoint.load_latest(self.checkpoint_dir, self.fingerprint)
        if state is not None:
            logger.info("resuming from the %s checkpoint after epoch %d", state.phase, state.epoch)
            self.history = list(state.history)
            if self.metrics_path is not None:
                finished = [
                    r
                    for r in self.history
                    if r["validation_rmse"] is not None or r["phase"] == "refit"
                ]
                self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in finished))
        searching = self.config.validation_fraction > 0
        phase = state.phase if state is not None else ("search" if searching else "refit")
        best_epoch = state.best_epoch if state is not None else 0
        best_rmse = state.best_validation_rmse if state is not None else math.inf

        params: Parameters | None = None
        if phase == "search":
            params, best_epoch, best_rmse = self._search(n_shards, state)
            state = None
            if self.config.refit:
                phase = "refit"
        if phase == "refit":
            epochs = best_epoch if searching else self.config.epochs
            params = self._refit(n_shards, epochs, state)
        assert params is not None

        seconds = time.perf_counter() - started
        model = self._model(params, best_epoch, best_rmse, n_shards, seconds)
        logger.info("trained in %.1f s (best epoch %d)", seconds, best_epoch)
        return TrainResult(model, self.history)

    def _search(self, n_shards: int, state: TrainingState | None) -> tuple[Parameters, int, float]:
        shards = self._shards(n_shards, self.config.validation_fraction)
        try:
            if state is None:
                params = self._initial(shards)
                optimizer = Optimizer(params, self.config)
                start, best = 0, (0, math.inf, None)
            else:
                params = state.params
                optimizer = Optimizer(params, self.config)
                optimizer.load_state(state.optimizer)
                start = state.epoch
                best = (state.best_epoch, state.best_validation_rmse, state.best_params)
            return self._fit("search", shards, params, optimizer, start, self.config.epochs, best)
        finally:
            shards.release()

    def _refit(self, n_shards: int, epochs: int, state: TrainingState | None) -> Parameters:
        shards = self._shards(n_shards, 0.0)
        try:
            if state is None:
                params = self._initial(shards)
                optimizer = Optimizer(params, self.config)
                start = 0
            else:
                params = state.params
                optimizer = Optimizer(params, self.config)
                optimizer.load_state(state.optimizer)
                start = state.epoch
            params, _, _ = self._fit("refit", shards, params, optimizer, start, epochs, None)
            return params
        finally:
            shards.release()

    def _shards(self, n_shards: int, validation_fraction: float) -> _ShardSet:
        t0 = time.perf_counter()
        shards = _ShardSet(
            self.client,
            self.dataset,
            n_shards,
            self.user_ids,
            self.movie_ids,
            self.config.seed,
            validation_fraction,
        )
        if shards.n_train == 0:
            raise PipelineError(f"{self.dataset.path}: no training ratings")
        logger.info(
            "loaded %d shards: %s training and %s validation ratings in %.1f s",
            n_shards,
            f"{shards.n_train:,}",
            f"{shards.n_validation:,}",
            time.perf_counter() - t0,
        )
        return shards

    def _initial(self, shards: _ShardSet) -> Parameters:
        c = self.config
        global_mean = shards.train_sum / shards.n_train
        return initial_parameters(
            len(self.user_ids), len(self.movie_ids), c.rank, global_mean, c.seed, c.init_scale
        )

    def _fit(
        self,
        phase: str,
        shards: _ShardSet,
        params: Parameters,
        optimizer: Optimizer,
        start: int,
        epochs: int,
        best: tuple[int, float, Parameters | None] | None,
    ) -> tuple[Parameters, int, float]:
        """Run epochs `start+1 .. epochs`; with `best`, early-stop on the validation RMSE.

        The validation RMSE of the state after epoch e is computed in the first step of epoch
        e + 1 (or a final evaluation-only step), so it costs no extra round trip.
        """
        c = self.config
        validating = best is not None and shards.n_validation > 0
        steps = n_steps(shards.n_train, c.batch_size)
        bar = EpochProgress(epochs, phase, self.progress_enabled)
        best_epoch, best_rmse, best_params = best if best is not None else (epochs, math.nan, None)
        pending = self.history[-1] if start > 0 and validating else None
        try:
            for epoch in range(start + 1, epochs + 2):
                final = epoch == epochs + 1
                if final and pending is None:
                    break
                t0 = time.perf_counter()
                sse, count = 0.0, 0
                for step in range(steps):
                    validate = step == 0 and pending is not None
                    merged = shards.step(
                        params,
                        seed=c.seed,
                        epoch=epoch,
                        step=step,
                        steps=steps,
                        rating_range=self.rating_range,
                        with_validation=validate,
                        with_gradients=not final,
                    )
                    if validate:
                        rmse = math.sqrt(
                            merged.validation_squared_error / merged.validation_ratings
                        )
                        self._finish(pending, rmse, bar)
                        pending = None
                        if rmse < best_rmse:
                            best_epoch, best_rmse = epoch - 1, rmse
                            best_params = None if c.refit else params.copy()
                        elif not math.isfinite(rmse):
                            self._diverged(phase, epoch - 1, 0, "validation", rmse)
                        if final or epoch - 1 - best_epoch >= c.patience:
                            break
                    self._check(phase, epoch, step, merged)
                    optimizer.apply(params, merged)
                    sse += merged.squared_error
                    count += merged.ratings
                else:
                    record = self._record(phase, epoch, sse, count, time.perf_counter() - t0)
                    if not params.all_finite():
                        self._diverged(phase, epoch, steps - 1, "parameters", math.nan)
                    if validating:
                        pending = record
                    else:
                        self._finish(record, None, bar)
                    if self.checkpoint_dir is not None and epoch % c.checkpoint_every == 0:
                        self._checkpoint(
                            phase, epoch, params, optimizer, best_epoch, best_rmse, best_params
                        )
                    continue
                break
        finally:
            bar.close()
        if not validating:
            best_epoch = epochs
        elif not c.refit and best_params is not None:
            params = best_params
        return params, best_epoch, best_rmse

    def _check(self, phase: str, epoch: int, step: int, merged: Partial) -> None:
        if merged.ratings == 0:
            return
        rmse = math.sqrt(merged.squared_error / merged.ratings)
        limit = 3 * (self.rating_range[1] - self.rating_range[0]) + 1
        if not math.isfinite(rmse) or rmse > limit:
            self._diverged(phase, epoch, step, "training", rmse)

    def _diverged(self, phase: str, epoch: int, step: int, what: str, rmse: float) -> None:
        kept = (
            f"the last good checkpoint is in {self.checkpoint_dir}"
            if self.checkpoint_dir is not None
            else "no model was written"
        )
        raise TrainingDiverged(
            f"training diverged in {phase} epoch {epoch} step {step} ({what} RMSE {rmse:.4g}); "
            f"lower --learning-rate (now {self.config.learning_rate}) or use --optimizer adam; "
            f"{kept}"
        )

    def _record(
        self, phase: str, epoch: int, sse: float, count: int, seconds: float
    ) -> dict[str, Any]:
        record = {
            "phase": phase,
            "epoch": epoch,
            "train_rmse": math.sqrt(sse / max(count, 1)),
            "validation_rmse": None,
            "seconds": seconds,
            "ratings_per_second": count / seconds if seconds > 0 else 0.0,
        }
        self.history.append(record)
        return record

    def _finish(
        self, record: dict[str, Any], validation_rmse: float | None, bar: EpochProgress
    ) -> None:
        record["validation_rmse"] = validation_rmse
        bar.update(record)
        logger.debug("epoch record %s", record)
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _checkpoint(
        self,
        phase: str,
        epoch: int,
        params: Parameters,
        optimizer: Optimizer,
        best_epoch: int,
        best_rmse: float,
        best_params: Parameters | None,
    ) -> None:
        assert self.checkpoint_dir is not None
        checkpoint.save(
            self.checkpoint_dir,
            TrainingState(
                phase,
                epoch,
                params,
                optimizer.state(),
                self.history,
                best_epoch,
                best_rmse,
                best_params,
                self.fingerprint,
            ),
        )

    def _model(
        self, params: Parameters, best_epoch: int, best_rmse: float, n_shards: int, seconds: float
    ) -> Model:
        search = [r for r in self.history if r["phase"] == "search"]
        last = self.history[-1] if self.history else {}
        metadata = {
            "hyper_parameters": self.config.to_dict(),
            "epochs_run": len(search) if search else len(self.history),
            "best_epoch": best_epoch,
            "refit_epochs": sum(1 for r in self.history if r["phase"] == "refit"),
            "metrics": {
                "best_validation_rmse": best_rmse if math.isfinite(best_rmse) else None,
                "final_train_rmse": last.get("train_rmse"),
            },
            "shards": n_shards,
            "training_seconds": round(seconds, 3),
            "input_checksum": self.dataset.checksum,
            "input_path": str(self.dataset.path),
            "pipeline_version": __version__,
        }
        return Model(self.user_ids, self.movie_ids, params, *self.rating_range, metadata)
