"""`mfpipe run`: stages, publication, idempotent reruns, refusal, overwrite and kill/resume."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.dataframe as dd
import duckdb
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.jobs import load_job
from pipeline.model import Model
from pipeline.runner import default_run_id, run_job

SMALL_JOB = """
name = "small"

[source.synth]
users = 300
movies = 150
ratings = 12000
seed = 4

[ingest]
n_buckets = 3

[split]
method = "{method}"
{split}

[train]
rank = 4
epochs = {epochs}
batch_size = {batch_size}
learning_rate = 0.05
patience = 50
seed = 1

[export]
top_k = {top_k}

[output]
root = "out"
"""


def write_job(
    folder: Path,
    *,
    method="random",
    split="test_fraction = 0.2",
    epochs=6,
    batch_size=100000,
    top_k=5,
    name="job.toml",
) -> Path:
    path = folder / name
    path.write_text(
        SMALL_JOB.format(
            method=method, split=split, epochs=epochs, batch_size=batch_size, top_k=top_k
        )
    )
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_run_publishes_a_complete_readable_run(tmp_path, dask_client):
    job = load_job(write_job(tmp_path))
    outcome = run_job(job, run_id="2026-12-01", client=dask_client)

    run = tmp_path / "out" / "run_id=2026-12-01"
    assert outcome.path == run and not outcome.skipped
    assert sorted(p.name for p in run.iterdir()) == [
        "_SUCCESS",
        "job.toml",
        "learning_curve.png",
        "metrics.json",
        "model",
        "recommendations",
        "report.md",
        "split.json",
    ]
    assert (tmp_path / "out" / "latest").read_text() == "2026-12-01\n"
    # the work folder is gone, nothing but the run and `latest` is visible in the output root
    assert not (tmp_path / "out" / ".work" / "run_id=2026-12-01").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "latest",
        "run_id=2026-12-01",
    ]

    manifest = json.loads((run / "_SUCCESS").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert manifest["run_id"] == "2026-12-01"
    assert manifest["metrics"] == metrics["test"]
    assert 0.3 < metrics["test"]["rmse"] < 1.5
    assert split["method"] == "random" and split["test_fraction"] == 0.2
    assert split["train_ratings"] + split["test_ratings"] == 12000
    assert manifest["checksums"]["train"] == split["train_checksum"]
    assert set(manifest["stages"]) == {
        "source",
        "ingest",
        "split",
        "train",
        "evaluate",
        "recommend",
        "publish",
    }
    assert not any(stage["skipped"] for stage in manifest["stages"].values())
    assert manifest["versions"]["numpy"] == np.__version__
    assert manifest["inputs"]["job"]["source"]["n_ratings"] == 12000

    model = Model.load(run / "model")
    assert model.user_embedding.shape == (300, 4)
    users = pd.read_parquet(run / "model" / "users.parquet")
    assert len(users) == 300 and users.user_id.is_monotonic_increasing

    pattern = str(tmp_path / "out" / "*" / "recommendations" / "*.parquet")
    query = (
        "select run_id, count(*), count(distinct user_id), max(rank) "
        "from read_parquet(?, hive_partitioning=true{}) group by run_id"
    )
    rows = duckdb.execute(query.format(""), [pattern]).fetchall()
    assert rows == [(datetime.date(2026, 12, 1), 1500, 300, 5)]  # DuckDB types a date-like id
    rows = duckdb.execute(query.format(", hive_types_autocast=false"), [pattern]).fetchall()
    assert rows == [("2026-12-01", 1500, 300, 5)]
    recs = dd.read_parquet(str(run / "recommendations")).compute()
    assert len(recs) == 1500
    # the scores are the model's unclipped predictions
    np.testing.assert_allclose(
        np.clip(recs.score, model.rating_min, model.rating_max),
        model.predict(recs.user_id.to_numpy(), recs.movie_id.to_numpy()),
        rtol=1e-5,
        atol=1e-5,
    )
    report = (run / "report.md").read_text()
    assert report.startswith("# small: run 2026-12-01")
    assert f"| rmse | {metrics['test']['rmse']:.4f} |" in report


def test_rerun_is_a_no_op_and_other_inputs_are_refused(tmp_path, dask_client):
    path = write_job(tmp_path, top_k=3)
    run_job(load_job(path), run_id="a", client=dask_client)
    root = tmp_path / "out"
    before = snapshot(root)

    # no client and an address nobody listens on: a skip must not touch the cluster
    outcome = run_job(load_job(path), run_id="a", scheduler="tcp://127.0.0.1:9")
    assert outcome.skipped and outcome.manifest["run_id"] == "a"
    assert snapshot(root) == before

    # a work folder left by a run killed right after publishing is cleaned up by a rerun
    (root / ".work" / "run_id=a" / "train").mkdir(parents=True)
    assert run_job(load_job(path), run_id="a", scheduler="tcp://127.0.0.1:9").skipped
    assert not (root / ".work" / "run_id=a").exists()
    assert snapshot(root) == before

    changed = write_job(tmp_path, top_k=2)
    with pytest.raises(PipelineError, match="was published from other inputs"):
        run_job(load_job(changed), run_id="a", scheduler="tcp://127.0.0.1:9")
    assert snapshot(root) == before

    outcome = run_job(load_job(changed), run_id="a", client=dask_client, overwrite=True)
    assert not outcome.skipped
    recs = pd.read_parquet(root / "run_id=a" / "recommendations")
    assert recs.groupby("user_id").size().max() == 2
    assert sorted(p.name for p in root.iterdir()) == [".work", "latest", "run_id=a"]
    assert list((root / ".work").iterdir()) == [root / ".work" / "run_id=a.lock"]


def test_concurrent_run_of_the_same_id_is_refused(tmp_path, dask_client):
    path = write_job(tmp_path)
    lock = tmp_path / "out" / ".work" / "run_id=b.lock"
    lock.parent.mkdir(parents=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(PipelineError, match="another mfpipe run is working on run id b"):
            run_job(load_job(path), run_id="b", client=dask_client)
    assert not (tmp_path / "out" / "run_id=b").exists()


def test_temporal_split_run(tmp_path, dask_client):
    job = load_job(write_job(tmp_path, method="temporal", split="test_ratings_per_user = 2"))
    outcome = run_job(job, run_id="t", client=dask_client)
    split = json.loads((outcome.path / "split.json").read_text())
    assert split["method"] == "temporal" and split["test_ratings"] == 600  # 2 x 300 users
    assert outcome.manifest["metrics"]["unseen_users"] == 0


def test_killed_run_resumes_and_matches_an_undisturbed_run(tmp_path, dask_client):
    # small batches make many steps per epoch, so training lasts long enough to be killed
    path = write_job(tmp_path, epochs=8, batch_size=3000)
    address = dask_client.scheduler.address
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(path),
        "--run-id",
        "k",
        "--scheduler",
        address,
    ]
    checkpoints = tmp_path / "out" / ".work" / "run_id=k" / "train" / "checkpoints"
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("checkpoint-*.npz")):
            assert process.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "run_id=k").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for stage in ("source", "ingest", "split"):
        assert f"stage {stage}: up to date, skipped" in resumed.stderr
    assert "resuming from the" in resumed.stderr
    manifest = json.loads((tmp_path / "out" / "run_id=k" / "_SUCCESS").read_text())
    assert manifest["stages"]["split"]["skipped"] and not manifest["stages"]["train"]["skipped"]

    undisturbed = run_job(load_job(path), run_id="u", client=dask_client)
    got = Model.load(tmp_path / "out" / "run_id=k" / "model")
    want = Model.load(undisturbed.path / "model")
    assert np.array_equal(got.user_ids, want.user_ids)
    np.testing.assert_allclose(got.global_mean, want.global_mean, rtol=1e-6)
    for name in ("user_bias", "movie_bias", "user_embedding", "movie_embedding"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    got_recs = pd.read_parquet(tmp_path / "out" / "run_id=k" / "recommendations")
    want_recs = pd.read_parquet(undisturbed.path / "recommendations")
    assert got_recs[["user_id", "rank", "movie_id"]].equals(
        want_recs[["user_id", "rank", "movie_id"]]
    )

    # rerunning the finished run id changes nothing
    before = snapshot(tmp_path / "out" / "run_id=k")
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already published with the same inputs" in again.stderr
    assert snapshot(tmp_path / "out" / "run_id=k") == before


def test_predefined_split_run(tmp_path, rng, dask_client):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name, n in (("u1.base", 20), ("u1.test", 3)):
        lines = [
            f"{user}\t{movie}\t{rng.integers(1, 6)}\t{880000000 + movie}"
            for user in range(1, 41)
            for movie in rng.choice(np.arange(1, 61), n, replace=False)
        ]
        (folder / name).write_text("\n".join(lines) + "\n")
    path = tmp_path / "jobs" / "job.toml"
    path.parent.mkdir()
    path.write_text(
        '[split]\nmethod = "predefined"\ntrain = "../ml-100k/u1.base"\n'
        'test = "../ml-100k/u1.test"\n[ingest]\nn_buckets = 2\n'
        "[train]\nrank = 2\nepochs = 3\n[export]\ntop_k = 2\n[output]\nroot = '../out'\n"
    )
    outcome = run_job(load_job(path), run_id="p", client=dask_client)
    split = json.loads((outcome.path / "split.json").read_text())
    assert split["method"] == "predefined"
    assert (split["train_ratings"], split["test_ratings"]) == (800, 120)
    assert outcome.manifest["metrics"]["ratings"] == 120
    assert set(outcome.manifest["inputs"]["files"]) == {"train", "test"}

    # touching an input file changes the inputs: the published run is no longer a match
    os.utime(folder / "u1.test", ns=(1, 1))
    with pytest.raises(PipelineError, match="was published from other inputs"):
        run_job(load_job(path), run_id="p", client=dask_client)


def test_default_run_id_is_the_utc_date():
    before = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    got = default_run_id()
    after = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    assert got in (before, after)
    assert len(got) == 10 and got[4] == got[7] == "-"
