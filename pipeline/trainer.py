"""The training loop: shards on the workers, a tree reduction, averaged updates.

Each step, the client sends the movie rows to every worker holding shards; each shard
computes in one compiled pass the gradient sums and counts of its part of the batch, moves
its own users' rows by their averaged gradients (a shard holds all the ratings of its users),
and reports its movie sums and counts; a tree of tasks merges those (`pipeline.reducer`) and
the client moves each touched movie row by its averaged gradient (`pipeline.optimizer`).

Training runs in up to two phases. "search" holds out a seeded validation share and stops
early when the validation RMSE has not improved for `patience` epochs. With `refit`, a second
phase retrains from the same initial state on all the ratings for the best epoch count, so
no rating is wasted; otherwise the best search epoch is kept.

The user rows live on the workers between steps. At epoch ends the trainer gathers them into
an anchor (and, if asked, a checkpoint on disk); when a worker is lost, training goes back to
the last anchor and replays. Every step is a pure function of its inputs and the reduction
runs in shard order, so the replayed run ends with the same model as an undisturbed one.
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
from pipeline.optimizer import apply_rows, new_moments
from pipeline.parameters import Parameters, initial_parameters
from pipeline.progress import EpochProgress
from pipeline.reducer import Partial, tree_reduce
from pipeline.schedule import n_steps
from pipeline.shards import (
    MovieState,
    StepSpec,
    UserState,
    buckets_of_shard,
    load_shard,
    result_partial,
    result_users,
    shard_step,
    shard_summary,
    shard_users,
)

logger = logging.getLogger(__name__)

RECOVERY_ATTEMPTS = 5
"""Times a phase goes back to its last anchor after losing workers before giving up."""
ANCHOR_SECONDS = 20.0
"""Gather the user rows into an anchor at the first epoch end this long after the last."""

_LOST = (KilledWorker, CancelledError, OSError, TimeoutError)


class RatingsSource(Protocol):
    """What the trainer needs of an ingested dataset (`pipeline.dataset.Dataset`)."""

    path: Path
    n_buckets: int
    rating_min: float
    rating_max: float
    checksum: str

    def user_ids(self) -> np.ndarray: ...

    def movie_ids(self) -> np.ndarray: ...

    def bucket_files(self, bucket: int) -> list[Path]: ...


class TrainingDiverged(PipelineError):
    """The loss became non-finite or exploded; no model is written."""


@dataclass
class TrainResult:
    """The trained model and one record per epoch (phase, epoch, train_rmse,
    validation_rmse, seconds, ratings_per_second)."""

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
    anchor_seconds: float = ANCHOR_SECONDS,
) -> TrainResult:
    """Fit the model on `dataset` with the cluster behind `client`.

    Resumes from the newest checkpoint in `checkpoint_dir` made with the same settings and
    data; the result then equals that of an uninterrupted run. Appends one JSON line per epoch
    to `metrics_path`. `progress`: a bar (True), log lines (False) or by terminal (None).
    `anchor_seconds`: least time between in-memory anchors (replay points after a lost worker).
    """
    trainer = _Trainer(dataset, config, client, checkpoint_dir, metrics_path, progress)
    trainer.anchor_seconds = anchor_seconds
    return trainer.run()


class _ShardSet:
    """The shards of one phase on the workers, their user rows, and the step protocol."""

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
        self.n_shards = n_shards
        self.users_of = [shard_users(user_ids, s, n_shards) for s in range(n_shards)]
        workers = sorted(client.scheduler_info()["workers"])
        token = uuid.uuid4().hex[:8]
        self.futures: list[Future] = []
        for shard in range(n_shards):
            buckets = buckets_of_shard(shard, n_shards, dataset.n_buckets)
            files = [str(f) for b in buckets for f in dataset.bucket_files(b)]
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
        self.user_states: list[Future] = []
        self.previous_user_states: list[Future] = []

    def _holders(self, futures: list[Future]) -> list[str]:
        """The address of a live worker holding each future (any live worker for a lost one)."""
        holders = self.client.who_has(futures)
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:
            raise OSError("no workers left")
        where = []
        for i, f in enumerate(futures):
            alive = [w for w in holders.get(f.key, ()) if w in workers]
            where.append(alive[0] if alive else workers[i % len(workers)])
        return where

    def _scatter_to(self, value: Any, worker: str) -> Future:
        """Put `value` on `worker`; a worker that has just left is reported as a lost one."""
        try:
            return self.client.scatter([value], workers=[worker], hash=False)[0]
        except (KeyError, ValueError) as exc:  # the scheduler no longer knows `worker`
            raise OSError(f"worker {worker} left the cluster ({exc!r})") from exc

    def place_users(self, params: Parameters, moments: dict[str, np.ndarray]) -> None:
        """Send each shard the rows of its users (from full (n_users, ...) arrays)."""
        placed = []
        for users, where in zip(self.users_of, self._holders(self.futures), strict=True):
            state = UserState(
                users,
                params.user_bias[users],
                params.user_embedding[users],
                {k: v[users] for k, v in moments.items()},
            )
            placed.append(self._scatter_to(state, where))
        self.user_states = placed
        self.previous_user_states = []

    def revert(self) -> None:
        """Drop the user rows of the last step: back to that step's inputs."""
        self.user_states = self.previous_user_states

    def gather_users(
        self, n_users: int, rank: int, moment_names: list[str], previous: bool = False
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Full (n_users,) biases, (n_users, rank) embeddings and moments from the shards.

        With `previous`, the rows before the last step.
        """
        bias = np.zeros(n_users, np.float32)
        embedding = np.zeros((n_users, rank), np.float32)
        moments = {
            k: np.zeros((n_users, rank) if "embedding" in k else n_users, np.float32)
            for k in moment_names
        }
        states = self.previous_user_states if previous else self.user_states
        for state in self.client.gather(states):
            bias[state.index] = state.bias
            embedding[state.index] = state.embedding
            for k in moment_names:
                moments[k][state.index] = state.moments[k]
        return bias, embedding, moments

    def step(self, movies: MovieState, spec: StepSpec) -> Partial:
        """Run one step on every shard; return the merged movie partial."""
        where = self._holders(self.futures)
        movie_futures = {w: self._scatter_to(movies, w) for w in sorted(set(where))}
        token = uuid.uuid4().hex[:8]
        results = [
            self.client.submit(
                shard_step,
                shard,
                users,
                movie_futures[w],
                spec,
                key=f"step-{token}-{i}",
                workers=[w],
                allow_other_workers=True,
            )
            for i, (shard, users, w) in enumerate(
                zip(self.futures, self.user_states, where, strict=True)
            )
        ]
        partials = [
            self.client.submit(result_partial, r, key=f"partial-{token}-{i}")
            for i, r in enumerate(results)
        ]
        moved = [
            self.client.submit(result_users, r, key=f"users-{token}-{i}")
            for i, r in enumerate(results)
        ]
        merged = tree_reduce(self.client, partials, key_prefix=f"merge-{token}").result()
        self.previous_user_states, self.user_states = self.user_states, moved
        return merged

    def release(self) -> None:
        self.client.cancel(self.futures + self.user_states + self.previous_user_states)
        self.futures, self.user_states, self.previous_user_states = [], [], []


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
        self.anchor: TrainingState | None = None
        self.anchor_seconds = ANCHOR_SECONDS

    def run(self) -> TrainResult:
        started = time.perf_counter()
        n_workers = len(self.client.scheduler_info()["workers"])
        if n_workers == 0:
            self.client.wait_for_workers(1, timeout=60)
            n_workers = len(self.client.scheduler_info()["workers"])
        n_shards = self.config.shards or n_workers
        logger.info(
            "training rank %d on %s users x %s movies, %d shards on %d workers",
            self.config.rank,
            f"{len(self.user_ids):,}",
            f"{len(self.movie_ids):,}",
            n_shards,
            n_workers,
        )

        state = checkpoint.load_latest(self.checkpoint_dir, self.fingerprint)
        if state is not None:
            logger.info("resuming from the %s checkpoint after epoch %d", state.phase, state.epoch)
        searching = self.config.validation_fraction > 0
        phase = state.phase if state is not None else ("search" if searching else "refit")

        best_epoch = state.best_epoch if state is not None else None
        if phase == "search":
            state = self._phase("search", n_shards, state, self.config.epochs)
            best_epoch = state.best_epoch
            if self.config.refit:
                phase, state = "refit", None
        if phase == "refit":
            epochs = best_epoch if searching and best_epoch is not None else self.config.epochs
            state = self._phase("refit", n_shards, state, epochs, best_epoch)
        assert state is not None

        seconds = time.perf_counter() - started
        model = self._model(state, n_shards, seconds)
        logger.info("trained in %.1f s (best epoch %d)", seconds, state.best_epoch)
        return TrainResult(model, self.history)

    def _phase(
        self,
        phase: str,
        n_shards: int,
        state: TrainingState | None,
        epochs: int,
        best_epoch: int | None = None,
    ) -> TrainingState:
        """Run a phase to its end from `state` (or the start), recovering from lost workers."""
        validation = self.config.validation_fraction if phase == "search" else 0.0
        shards = self._shards(n_shards, validation)
        try:
            if state is None:
                state = self._initial(phase, shards, best_epoch)
            for attempt in range(RECOVERY_ATTEMPTS + 1):
                try:
                    return self._fit(phase, shards, state, epochs)
                except _LOST as exc:
                    if attempt == RECOVERY_ATTEMPTS:
                        raise PipelineError(
                            f"training lost workers {RECOVERY_ATTEMPTS + 1} times; last: {exc}"
                        ) from None
                    assert self.anchor is not None
                    state = self.anchor
                    logger.warning(
                        "a worker was lost in %s epoch %d (%s: %s); replaying from epoch %d",
                        phase,
                        len(self.history),
                        type(exc).__name__,
                        exc,
                        state.epoch,
                    )
                    self.client.wait_for_workers(1, timeout=60)
                    time.sleep(0.5 * (attempt + 1))
            raise AssertionError("unreachable")
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

    def _initial(self, phase: str, shards: _ShardSet, best_epoch: int | None) -> TrainingState:
        c = self.config
        params = initial_parameters(
            len(self.user_ids),
            len(self.movie_ids),
            c.rank,
            shards.train_sum / shards.n_train,
            c.seed,
            c.init_scale,
        )
        optimizer: dict[str, np.ndarray] = {"step_count": np.array(0)}
        for side, n in (("user", len(self.user_ids)), ("movie", len(self.movie_ids))):
            for name, array in new_moments(c, n, c.rank).items():
                optimizer[f"{side}_{name}"] = array
        history = [r for r in self.history if r["phase"] != phase]
        return TrainingState(
            phase, 0, params, optimizer, history, best_epoch or 0, math.inf, None, self.fingerprint
        )

    def _fit(
        self, phase: str, shards: _ShardSet, state: TrainingState, epochs: int
    ) -> TrainingState:
        """Run epochs `state.epoch + 1 .. epochs`; in "search", stop early on validation RMSE.

        The validation RMSE of the state after epoch e is computed in the first step of epoch
        e + 1 (or in a final evaluation-only step), so it costs no extra round trip.
        """
        c = self.config
        self._restore(state)
        params = state.params
        shards.place_users(params, _side(state.optimizer, "user"))
        movies = MovieState(
            params.global_mean, params.movie_bias.copy(), params.movie_embedding.copy()
        )
        movie_moments = {k: v.copy() for k, v in _side(state.optimizer, "movie").items()}
        step_count = int(state.optimizer["step_count"])
        validating = phase == "search" and shards.n_validation > 0
        best_epoch, best_rmse = state.best_epoch, state.best_validation_rmse
        best_params = state.best_params
        steps = n_steps(shards.n_train, c.batch_size)
        pending = self.history[-1] if state.epoch > 0 and validating else None
        last_anchor = time.monotonic()
        bar = EpochProgress(epochs, phase, self.progress_enabled)

        def snapshot(done: int) -> TrainingState:
            return self._state(
                phase,
                done,
                shards,
                movies,
                movie_moments,
                step_count,
                best_epoch,
                best_rmse,
                best_params,
            )

        try:
            epoch = state.epoch
            while epoch < epochs or pending is not None:
                epoch += 1
                final = epoch > epochs
                t0 = time.perf_counter()
                sse, count, stop = 0.0, 0, False
                for step in range(steps):
                    spec = StepSpec(
                        c,
                        epoch,
                        step,
                        steps,
                        step_count + 1,
                        self.rating_range,
                        with_validation=step == 0 and pending is not None,
                        with_gradients=not final,
                    )
                    merged = shards.step(movies, spec)
                    if spec.with_validation:
                        rmse = math.sqrt(
                            merged.validation_squared_error / merged.validation_ratings
                        )
                        self._finish(pending, rmse, bar)
                        pending = None
                        if not math.isfinite(rmse):
                            self._diverged(phase, epoch - 1, 0, "validation", rmse)
                        if rmse < best_rmse:
                            best_epoch, best_rmse = epoch - 1, rmse
                            if not c.refit:
                                best_params, _ = self._gather(shards, movies, previous=True)
                        if final or epoch - 1 - best_epoch >= c.patience:
                            shards.revert()  # back to the state after epoch - 1
                            stop = True
                            break
                    self._check(phase, epoch, step, merged)
                    step_count += 1
                    apply_rows(
                        c,
                        step_count,
                        merged.movies,
                        movies.embedding,
                        movies.bias,
                        movie_moments,
                        c.learning_rate_scale(epoch),
                    )
                    sse += merged.squared_error
                    count += merged.ratings
                if stop:
                    epoch -= 1
                    break
                record = self._record(phase, epoch, sse, count, time.perf_counter() - t0)
                if not (np.isfinite(movies.embedding).all() and np.isfinite(movies.bias).all()):
                    self._diverged(phase, epoch, steps - 1, "parameters", math.nan)
                if validating:
                    pending = record
                else:
                    self._finish(record, None, bar)
                    best_epoch = epoch
                checkpoint_due = self.checkpoint_dir is not None and epoch % c.checkpoint_every == 0
                if checkpoint_due or time.monotonic() - last_anchor >= self.anchor_seconds:
                    self.anchor = snapshot(epoch)
                    last_anchor = time.monotonic()
                    if checkpoint_due:
                        assert self.checkpoint_dir is not None
                        checkpoint.save(self.checkpoint_dir, self.anchor)
        finally:
            bar.close()

        end = snapshot(epoch)
        if phase == "search" and not c.refit and best_params is not None:
            end.params = best_params
        return end

    def _gather(
        self,
        shards: _ShardSet,
        movies: MovieState,
        moment_names: list[str] | None = None,
        previous: bool = False,
    ) -> tuple[Parameters, dict[str, np.ndarray]]:
        """Full parameters (user rows from the shards, the client's movie rows) and the user
        rows' optimiser moments named in `moment_names`.

        With `previous`, the user rows are those before the step just run (the step's inputs).
        """
        bias, embedding, user_moments = shards.gather_users(
            len(self.user_ids), self.config.rank, moment_names or [], previous=previous
        )
        params = Parameters(
            movies.global_mean, bias, movies.bias.copy(), embedding, movies.embedding.copy()
        )
        return params, user_moments

    def _state(
        self,
        phase: str,
        epoch: int,
        shards: _ShardSet,
        movies: MovieState,
        movie_moments: dict[str, np.ndarray],
        step_count: int,
        best_epoch: int,
        best_rmse: float,
        best_params: Parameters | None,
    ) -> TrainingState:
        params, user_moments = self._gather(shards, movies, sorted(movie_moments))
        optimizer = {"step_count": np.array(step_count)}
        optimizer.update({f"user_{k}": v for k, v in user_moments.items()})
        optimizer.update({f"movie_{k}": v.copy() for k, v in movie_moments.items()})
        history = [dict(r) for r in self.history]
        return TrainingState(
            phase,
            epoch,
            params,
            optimizer,
            history,
            best_epoch,
            best_rmse,
            best_params,
            self.fingerprint,
        )

    def _restore(self, state: TrainingState) -> None:
        """Take the history of `state`; rewrite the metrics file to match it."""
        self.history = [dict(r) for r in state.history]
        if self.anchor is None or self.anchor.phase != state.phase:
            self.anchor = state
        if self.metrics_path is not None:
            finished = [
                r for r in self.history if r["validation_rmse"] is not None or r["phase"] == "refit"
            ]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in finished))

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

    def _model(self, state: TrainingState, n_shards: int, seconds: float) -> Model:
        search = [r for r in self.history if r["phase"] == "search"]
        validation = [r["validation_rmse"] for r in search if r["validation_rmse"] is not None]
        last = self.history[-1] if self.history else {}
        metadata = {
            "hyper_parameters": self.config.to_dict(),
            "epochs_run": len(search) if search else len(self.history),
            "best_epoch": state.best_epoch,
            "refit_epochs": sum(1 for r in self.history if r["phase"] == "refit"),
            "metrics": {
                "best_validation_rmse": min(validation) if validation else None,
                "final_train_rmse": last.get("train_rmse"),
            },
            "shards": n_shards,
            "training_seconds": round(seconds, 3),
            "input_checksum": self.dataset.checksum,
            "input_path": str(self.dataset.path),
            "pipeline_version": __version__,
        }
        return Model(self.user_ids, self.movie_ids, state.params, *self.rating_range, metadata)


def _side(optimizer: dict[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
    """The moments of one side (`user` or `movie`) of a checkpointed optimiser state."""
    prefix = f"{side}_"
    return {k[len(prefix) :]: v for k, v in optimizer.items() if k.startswith(prefix)}
