"""The distributed trainer on real LocalClusters: reference, sharding, failures, resume."""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from distributed import Client, LocalCluster
from reference import reference_train

from pipeline.checkpoint import load_latest
from pipeline.config import TrainConfig
from pipeline.dataset import write_dataset
from pipeline.evaluate import evaluate
from pipeline.schedule import validation_mask
from pipeline.trainer import TrainingDiverged, train

PARAMS = ("user_bias", "movie_bias", "user_embedding", "movie_embedding")


def planted_ratings(rng, n_users, n_movies, n_ratings, rank=3):
    """Unique (user, movie) pairs with ratings from a small planted model, on the 1..5 grid."""
    flat = rng.choice(n_users * n_movies, size=n_ratings, replace=False)
    users, movies = flat // n_movies, flat % n_movies
    p = rng.normal(0, 0.6, (n_users, rank))
    q = rng.normal(0, 0.6, (n_movies, rank))
    value = 3.5 + rng.normal(0, 0.3, n_users)[users] + (p[users] * q[movies]).sum(1)
    value = np.clip(np.round(value + rng.normal(0, 0.3, n_ratings)), 1, 5)
    return pa.table(
        {
            "user_id": pa.array(users * 2 + 1, pa.int32()),
            "movie_id": pa.array(movies * 3 + 1, pa.int32()),
            "rating": pa.array(value, pa.float32()),
            "timestamp": pa.array(np.arange(n_ratings), pa.int64()),
        }
    )


def write(table, path, n_buckets=4):
    return write_dataset(table, path, n_buckets=n_buckets, rating_scale=(1.0, 5.0, 1.0))


@pytest.fixture(scope="module")
def four_workers():
    with (
        LocalCluster(
            n_workers=4, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def test_matches_reference_and_does_not_depend_on_sharding(
    tmp_path, rng, dask_client, four_workers
):
    table = planted_ratings(rng, 40, 25, 500)
    data = write(table, tmp_path / "data")
    config = TrainConfig(
        rank=4, epochs=3, batch_size=64, validation_fraction=0.0, seed=5, learning_rate=0.05
    )

    one = train(data, TrainConfig(**{**config.to_dict(), "shards": 1}), dask_client, progress=False)
    many = train(
        data, TrainConfig(**{**config.to_dict(), "shards": 16}), four_workers, progress=False
    )
    ref, ref_rmse = reference_train(
        table.column("user_id").to_numpy(),
        table.column("movie_id").to_numpy(),
        table.column("rating").to_numpy(),
        config,
        epochs=3,
    )

    assert [r["epoch"] for r in one.history] == [1, 2, 3]
    for name in PARAMS:
        np.testing.assert_allclose(
            getattr(one.model.params, name), getattr(many.model.params, name), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            getattr(one.model.params, name), getattr(ref, name), rtol=1e-4, atol=1e-4
        )
    np.testing.assert_allclose([r["train_rmse"] for r in many.history], ref_rmse, rtol=1e-4)
    assert many.model.metadata["shards"] == 16


def test_early_stopping_keeps_the_best_epoch(tmp_path, rng, dask_client):
    table = planted_ratings(rng, 60, 40, 1500)
    data = write(table, tmp_path / "data")
    config = TrainConfig(
        rank=16,
        epochs=300,
        learning_rate=0.1,
        regularization=0.0,
        validation_fraction=0.2,
        patience=4,
        refit=False,
    )
    result = train(data, config, dask_client, progress=False)

    validation = [r["validation_rmse"] for r in result.history]
    best = int(np.argmin(validation)) + 1
    assert result.model.metadata["best_epoch"] == best
    assert len(validation) == best + config.patience < config.epochs  # stopped early
    held = validation_mask(
        table.column("user_id").to_numpy(),
        table.column("movie_id").to_numpy(),
        config.seed,
        config.validation_fraction,
    )
    pred = result.model.predict(
        table.column("user_id").to_numpy()[held], table.column("movie_id").to_numpy()[held]
    )
    rmse = math.sqrt(np.mean((pred - table.column("rating").to_numpy()[held]) ** 2))
    assert rmse == pytest.approx(min(validation), rel=1e-5)


def test_refit_trains_on_all_ratings_for_the_best_epoch_count(tmp_path, rng, dask_client):
    data = write(planted_ratings(rng, 60, 40, 1500), tmp_path / "data")
    config = TrainConfig(rank=8, epochs=200, validation_fraction=0.2, patience=5)
    result = train(data, config, dask_client, progress=False)

    refit = [r for r in result.history if r["phase"] == "refit"]
    assert len(refit) == result.model.metadata["best_epoch"] > 0
    assert all(r["validation_rmse"] is None for r in refit)
    assert result.model.metadata["refit_epochs"] == len(refit)


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, rng, dask_client):
    data = write(planted_ratings(rng, 50, 30, 1000), tmp_path / "data")
    config = TrainConfig(rank=4, epochs=60, validation_fraction=0.2, patience=3)
    whole = train(data, config, dask_client, checkpoint_dir=tmp_path / "ckpt", progress=False)

    # Pretend the run died after the next-to-last search epoch: keep only that checkpoint.
    checkpoints = sorted((tmp_path / "ckpt").glob("checkpoint-0-*.npz"))
    for path in [*checkpoints[1:], *(tmp_path / "ckpt").glob("checkpoint-1-*.npz")]:
        path.unlink()
    state = load_latest(tmp_path / "ckpt", f"{config.fingerprint()}-{data.checksum[:16]}")
    assert state is not None and state.phase == "search"

    resumed = train(
        data,
        config,
        dask_client,
        checkpoint_dir=tmp_path / "ckpt",
        metrics_path=tmp_path / "metrics.jsonl",
        progress=False,
    )
    for name in PARAMS:
        np.testing.assert_array_equal(
            getattr(whole.model.params, name), getattr(resumed.model.params, name)
        )

    def numbers(history):
        return [(r["phase"], r["epoch"], r["train_rmse"], r["validation_rmse"]) for r in history]

    assert numbers(resumed.history) == numbers(whole.history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(whole.history)


def test_checkpoints_of_another_run_are_refused(tmp_path, rng, dask_client):
    data = write(planted_ratings(rng, 20, 10, 150), tmp_path / "data")
    train(
        data,
        TrainConfig(rank=2, epochs=2, validation_fraction=0),
        dask_client,
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )
    with pytest.raises(Exception, match="different run"):
        train(
            data,
            TrainConfig(rank=3, epochs=2, validation_fraction=0),
            dask_client,
            checkpoint_dir=tmp_path / "ckpt",
            progress=False,
        )


def test_divergence_stops_with_a_clear_error(tmp_path, rng, dask_client):
    data = write(planted_ratings(rng, 30, 20, 400), tmp_path / "data")
    config = TrainConfig(
        rank=8, epochs=50, optimizer="sgd", learning_rate=9.0, validation_fraction=0
    )
    with pytest.raises(TrainingDiverged, match=r"diverged in refit epoch \d+ step 0"):
        train(data, config, dask_client, progress=False)


def test_a_killed_worker_does_not_change_the_model(tmp_path, rng, caplog):
    data = write(planted_ratings(rng, 3000, 800, 150_000), tmp_path / "data", n_buckets=8)
    config = TrainConfig(rank=16, epochs=40, validation_fraction=0.0, shards=4)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        calm = train(data, config, client, progress=False)

        metrics = tmp_path / "metrics.jsonl"
        result = {}

        def disturbed() -> None:
            try:
                result["run"] = train(
                    data, config, client, metrics_path=metrics, progress=False, anchor_seconds=0
                )
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        worker = threading.Thread(target=disturbed)
        pids = client.run(os.getpid)
        worker.start()
        deadline = time.monotonic() + 60
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 8) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = len(metrics.read_text().splitlines())
        worker.join(timeout=180)
        survivors = client.run(os.getpid)

    assert not worker.is_alive()
    assert "error" not in result, repr(result.get("error"))
    assert 0 < killed_at < config.epochs  # the kill landed mid-training
    assert victim not in survivors.values()
    replays = [r.getMessage() for r in caplog.records if "replaying from epoch" in r.message]
    assert replays, "the kill did not reach the trainer's recovery"
    assert int(replays[0].rsplit(" ", 1)[1]) >= 1  # from an anchor taken mid-run
    for name in PARAMS:
        np.testing.assert_allclose(
            getattr(calm.model.params, name),
            getattr(result["run"].model.params, name),
            rtol=1e-6,
            atol=1e-7,
        )


def test_evaluate_counts_unseen_ids_and_matches_a_direct_computation(tmp_path, rng, dask_client):
    table = planted_ratings(rng, 40, 30, 600)
    data = write(table, tmp_path / "train")
    model = train(
        data, TrainConfig(rank=4, epochs=5, validation_fraction=0), dask_client, progress=False
    ).model
    test = pa.table(
        {
            "user_id": pa.array([1, 3, 9999, 1], pa.int32()),
            "movie_id": pa.array([1, 4, 1, 8888], pa.int32()),
            "rating": pa.array([4.0, 2.0, 3.0, 5.0], pa.float32()),
            "timestamp": pa.array([0, 0, 0, 0], pa.int64()),
        }
    )
    held = write(test, tmp_path / "test")
    result = evaluate(model, held, dask_client)

    pred = model.predict(test.column("user_id").to_numpy(), test.column("movie_id").to_numpy())
    err = pred - test.column("rating").to_numpy()
    assert result["rmse"] == pytest.approx(math.sqrt(np.mean(err**2)), rel=1e-6)
    assert result["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-6)
    assert (result["unseen_users"], result["unseen_movies"]) == (1, 1)
    # An unseen user falls back to global mean + movie bias.
    assert pred[2] == pytest.approx(np.clip(model.global_mean + model.movie_bias[0], 1, 5))
    assert result["ratings"] == 4


def test_model_round_trips_and_other_engines_read_it(tmp_path, rng, dask_client):
    import duckdb
    import pandas as pd

    data = write(planted_ratings(rng, 20, 10, 120), tmp_path / "data")
    model = train(
        data, TrainConfig(rank=3, epochs=2, validation_fraction=0), dask_client, progress=False
    ).model
    assert all(getattr(model.params, name).dtype == np.float32 for name in PARAMS)
    model.save(tmp_path / "model")
    loaded = type(model).load(tmp_path / "model")
    for name in PARAMS:
        np.testing.assert_array_equal(getattr(model.params, name), getattr(loaded.params, name))
    assert loaded.metadata["best_epoch"] == model.metadata["best_epoch"]

    users = pd.read_parquet(tmp_path / "model" / "users.parquet")
    assert list(users.columns) == ["user_id", "bias", "embedding"]
    np.testing.assert_allclose(np.stack(users["embedding"].to_numpy()), model.user_embedding)
    dot = duckdb.sql(
        f"select sum(u.bias) as s, count(*) as n from '{tmp_path}/model/users.parquet' u"
    ).fetchall()[0]
    assert dot[1] == len(model.user_ids)
    assert dot[0] == pytest.approx(float(model.user_bias.sum()), rel=1e-5, abs=1e-5)
    shutil.rmtree(tmp_path / "model")
