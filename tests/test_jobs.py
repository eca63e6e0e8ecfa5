"""Job files: parsing, defaults, relative paths and one-line errors before any cluster starts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.dataset import write_dataset
from pipeline.errors import PipelineError
from pipeline.jobs import load_job

JOBS = Path(__file__).resolve().parent.parent / "jobs"

MINIMAL = """
[source.synth]
users = 50
movies = 40
ratings = 1500

[output]
root = "out"
"""


def write_job(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(PipelineError) as info:
        load_job(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_job_files_parse():
    quickstart = load_job(JOBS / "quickstart.toml")
    assert quickstart.name == "quickstart"
    assert quickstart.source.kind == "synth"
    assert quickstart.source.synth.n_ratings == 100_000
    assert quickstart.output == (JOBS.parent / "out" / "quickstart").resolve()
    assert quickstart.cluster.workers == 2

    # the MovieLens jobs point at downloads the user provides
    ml25 = load_job(JOBS / "movielens-25m.toml", check_paths=False)
    assert ml25.split.method == "temporal" and ml25.split.test_ratings_per_user == 5
    assert ml25.source.kind == "raw"
    ml100 = load_job(JOBS / "movielens-100k.toml", check_paths=False)
    assert ml100.source is None
    assert ml100.split.train_path.name == "u1.base" and ml100.split.test_path.name == "u1.test"


def test_defaults_and_relative_paths(tmp_path):
    job = load_job(write_job(tmp_path, MINIMAL))
    assert job.name == "job"
    assert job.output == tmp_path / "out"
    assert job.split.method == "random" and job.split.test_fraction == 0.1
    assert job.export.top_k == 10 and job.export.outputs == ("model", "recommendations")
    assert job.ingest.n_buckets == 16
    assert job.cluster.workers is None and job.cluster.scheduler is None
    described = job.describe()
    assert described["source"] == {
        "kind": "synth",
        "n_users": 50,
        "n_movies": 40,
        "n_ratings": 1500,
        "seed": 0,
        "rank": 8,
        "noise": 0.5,
    }
    assert described["train"]["rank"] == job.train.rank

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "u1.base").write_text("1\t2\t3\t4\n")
    (tmp_path / "data" / "u1.test").write_text("1\t3\t3\t4\n")
    nested = tmp_path / "jobs"
    nested.mkdir()
    job = load_job(
        write_job(
            nested,
            '[split]\nmethod = "predefined"\ntrain = "../data/u1.base"\ntest = "../data/u1.test"\n'
            '[train]\nrank = 4\nepochs = 3\n[export]\noutputs = ["model"]\n'
            '[output]\nroot = "../runs"\n',
        )
    )
    assert job.split.train_path == tmp_path / "data" / "u1.base"
    assert job.output == tmp_path / "runs"
    assert job.train.rank == 4 and job.train.epochs == 3
    assert job.export.outputs == ("model",)


def test_source_dataset_must_be_ingested(tmp_path):
    import pyarrow as pa

    ratings = pa.table({"user_id": [1], "movie_id": [2], "rating": [3.0], "timestamp": [5]})
    write_dataset(ratings, tmp_path / "ds", n_buckets=1, rating_scale=(0.5, 5.0, 0.5))
    job = load_job(write_job(tmp_path, '[source]\ndataset = "ds"\n[output]\nroot = "o"\n'))
    assert job.source.path == tmp_path / "ds"
    (tmp_path / "empty").mkdir()
    path = write_job(tmp_path, '[source]\ndataset = "empty"\n[output]\nroot = "o"\n')
    assert error_of(path) == (
        f"{path}: source.dataset: {tmp_path / 'empty'} is not an ingested dataset "
        "(no manifest.json)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[source.synth]\nusers = 5\nmovies = = 3\n",
            "line 3: invalid TOML: Invalid value (column 10)",
        ),
        (
            'name = "x"\n[source]\nraw = "a\n',
            "line 3: invalid TOML: Illegal character '\\n' (column 9)",
        ),
        ("colour = 3\n" + MINIMAL, "colour: unknown key (expected one of name, source, ingest"),
        (
            MINIMAL + "[export]\ntopk = 3\n",
            "export.topk: unknown key (expected one of top_k, outputs)",
        ),
        (
            MINIMAL + '[train]\nrank = "big"\n',
            "train.rank: expected an integer, got 'big'",
        ),
        (MINIMAL + "[train]\nlearnig_rate = 0.1\n", "train.learnig_rate: unknown setting"),
        (MINIMAL + "[train]\nrank = 0\n", "train.rank: expected a positive integer, got 0"),
        (MINIMAL + "[export]\ntop_k = 2.5\n", "export.top_k: expected a positive integer, got 2.5"),
        (
            MINIMAL + "[export]\ntop_k = true\n",
            "export.top_k: expected a positive integer, got true",
        ),
        (
            MINIMAL + '[export]\noutputs = ["model", "plots"]\n',
            'export.outputs: expected a list of "model" and "recommendations", '
            'got ["model", "plots"]',
        ),
        (
            MINIMAL + '[split]\nmethod = "kfold"\n',
            'split.method: expected "random" or "temporal" or "predefined", got "kfold"',
        ),
        (
            MINIMAL + "[split]\ntest_fraction = 1.0\n",
            "split.test_fraction: expected a number between 0 and 1 (exclusive), got 1.0",
        ),
        (
            MINIMAL + '[split]\nmethod = "temporal"\ntest_fraction = 0.2\n',
            "split.test_fraction: unknown key (expected one of method, test_ratings_per_user)",
        ),
        (
            MINIMAL + "[cluster]\nworkers = 0\n",
            "cluster.workers: expected a positive integer, got 0",
        ),
        (
            MINIMAL + '[cluster]\nscheduler = "localhost"\n',
            'cluster.scheduler: expected an address like tcp://host:8786, got "localhost"',
        ),
        ("[output]\nroot = 'o'\n", "source: missing (give one of source.dataset, source.raw"),
        (
            '[source]\nraw = "nowhere.zip"\n[output]\nroot = "o"\n',
            "source.raw: {dir}/nowhere.zip does not exist",
        ),
        (
            '[source]\nraw = "a"\ndataset = "b"\n[output]\nroot = "o"\n',
            "source: give exactly one of source.dataset, source.raw, [source.synth], "
            "got source.dataset and source.raw",
        ),
        (
            "[source.synth]\nusers = 50\nmovies = 40\nratings = 10\n[output]\nroot = 'o'\n",
            "source.synth: ratings 10 is below 20 per user",
        ),
        ("[source.synth]\nusers = 50\nmovies = 40\n", "source.synth.ratings: missing"),
        (
            '[source.synth]\nusers = 5\nmovies = 40\nratings = 100\nnoise = "x"\n',
            "source.synth.noise",
        ),
        (MINIMAL.replace('root = "out"', ""), "output.root: missing"),
        (MINIMAL + '[split]\nmethod = "predefined"\ntrain = "a"\ntest = "b"\n', "source: not used"),
        ("[source]\nsynth = 3\n", "source.synth: expected a table, got 3"),
    ],
)
def test_bad_job_files(tmp_path, text, expected):
    path = write_job(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert expected.format(dir=tmp_path) in message


def test_missing_job_file(tmp_path):
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: job file not found"


def test_cli_reports_one_line_and_exit_2_before_any_cluster(tmp_path, capsys):
    path = write_job(tmp_path, MINIMAL + '[train]\nrank = "big"\n')
    start = time.perf_counter()
    code = main(["run", str(path), "--workers", "1"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"mfpipe run: error: {path}: train.rank: expected an integer, got 'big'\n"
    assert elapsed < 2  # no cluster was started
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_run_id_and_workers(tmp_path, capsys):
    path = write_job(tmp_path, MINIMAL)
    assert main(["run", str(path), "--run-id", "../x"]) == 2
    assert "--run-id '../x': use 1 to 100 letters" in capsys.readouterr().err
    assert main(["run", str(path), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "mfpipe run: error: --workers must be at least 1, got 0\n"
