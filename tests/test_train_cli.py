"""`mfpipe train` and `mfpipe evaluate` from the command line: the path a user takes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.model import Model


def write_ratings_csv(path: Path, rng, n_users=60, n_movies=40, per_user=20) -> Path:
    """A small ml-25m-layout ratings.csv with a little structure."""
    path.mkdir(parents=True, exist_ok=True)
    lines = ["userId,movieId,rating,timestamp"]
    taste = rng.normal(0, 1, n_users)
    appeal = rng.normal(0, 1, n_movies)
    for u in range(n_users):
        for m in rng.choice(n_movies, per_user, replace=False):
            value = min(5.0, max(0.5, round((3.5 + 0.5 * taste[u] + 0.5 * appeal[m]) * 2) / 2))
            lines.append(f"{u + 1},{m + 1},{value},{1_000_000 + u * 100 + int(m)}")
    (path / "ratings.csv").write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_then_evaluate_from_raw_ratings(tmp_path, rng, capsys):
    data = write_ratings_csv(tmp_path / "raw", rng)
    out = tmp_path / "model"
    code = main(
        [
            "train",
            str(data),
            "--out",
            str(out),
            "--workers",
            "1",
            "--rank",
            "4",
            "--epochs",
            "30",
            "--patience",
            "5",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl",
        "model.json",
        "movies.parquet",
        "users.parquet",
    ]
    meta = json.loads((out / "model.json").read_text())
    assert meta["rank"] == 4 and meta["hyper_parameters"]["rank"] == 4
    assert meta["rating_min"] == 0.5 and meta["rating_max"] == 5.0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == meta["epochs_run"] + meta["refit_epochs"]
    assert not list(tmp_path.glob(".model.staging-*"))

    capsys.readouterr()
    assert main(["evaluate", str(out), str(data), "--json", "--workers", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ratings"] == 60 * 20
    assert 0 < result["rmse"] < 1.0  # the model fits its own training data
    assert Model.load(out).rank == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "--rank: expected a positive integer, got 0"),
        (["--learning-rate", "-0.1"], "--learning-rate: expected a number in (0, 10), got -0.1"),
        (["--regularization", "-1"], "--regularization: expected a non-negative number"),
        (["--validation-fraction", "1.5"], "--validation-fraction: expected a number in [0, 1)"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_arguments_fail_with_one_line(tmp_path, rng, capsys, args, message):
    data = write_ratings_csv(tmp_path / "raw", rng, n_users=3, per_user=20)
    code = main(["train", str(data), "--out", str(tmp_path / "m"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"mfpipe train: error: {message}" or (
        err.startswith("mfpipe train: error: ") and message in err and "\n" not in err
    )
    assert not (tmp_path / "m").exists()


def test_missing_data_and_existing_output_are_refused(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mfpipe train: error: DATA {tmp_path / 'nope'}: no such file or folder"
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    assert main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "m")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_evaluate_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["evaluate", str(tmp_path / "m"), str(tmp_path)]) == 2
    assert "is not a model folder (no model.json)" in capsys.readouterr().err


def test_unreachable_scheduler_fails_fast_with_one_line(tmp_path, rng):
    data = write_ratings_csv(tmp_path / "raw", rng, n_users=3)
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            str(data),
            "--out",
            str(tmp_path / "m"),
            "--scheduler",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"mfpipe train: error: cannot connect to the Dask scheduler at {address}"
    )
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "m").exists()


def test_divergence_writes_no_model(tmp_path, rng, capsys):
    data = write_ratings_csv(tmp_path / "raw", rng)
    code = main(
        [
            "train",
            str(data),
            "--out",
            str(tmp_path / "m"),
            "--workers",
            "1",
            "--optimizer",
            "sgd",
            "--learning-rate",
            "9",
            "--validation-fraction",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "training diverged in refit epoch" in err[-1]
    assert "no model was written" in err[-1]
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.staging-*"))
