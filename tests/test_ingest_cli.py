"""`mfpipe ingest` on the command line: exit codes, one-line errors, the summary."""

from __future__ import annotations

import os
import subprocess
import sys

from ingest_fixtures import ml100k_lines, sample_ratings, write_csv, write_lines

from pipeline.cli import main
from pipeline.dataset import open_dataset


def scheduler(dask_client) -> list[str]:
    return ["--scheduler", dask_client.scheduler.address]


def test_cli_ingests_and_refuses_to_overwrite(tmp_path, rng, dask_client, capsys):
    source = write_csv(tmp_path / "src", sample_ratings(rng, 90, half=True))
    out = tmp_path / "out"
    args = [
        "ingest",
        str(source),
        "--out",
        str(out),
        "--user-buckets",
        "4",
        *scheduler(dask_client),
    ]
    assert main(args) == 0
    assert f"{out}: 90 ratings" in capsys.readouterr().out
    dataset = open_dataset(out)
    assert dataset.n_buckets == 4 and dataset.manifest["ratings"] == 90

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mfpipe ingest: error: {out} already exists; pass --overwrite to replace it"]
    assert main([*args, "--overwrite", "--max-reject-fraction", "0"]) == 0


def test_cli_rejects_bad_arguments(tmp_path, dask_client, capsys):
    path = write_lines(tmp_path / "u.data", ["1\t2\t3\t4"])
    out = str(tmp_path / "out")
    assert (
        main(["ingest", str(path), "--out", out, "--user-buckets", "0", *scheduler(dask_client)])
        == 2
    )
    assert "--user-buckets must be at least 1, got 0" in capsys.readouterr().err
    assert (
        main(
            [
                "ingest",
                str(path),
                "--out",
                out,
                "--max-reject-fraction",
                "2",
                *scheduler(dask_client),
            ]
        )
        == 2
    )
    assert "--max-reject-fraction must be within 0..1" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "nothing"), "--out", out, "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_reject_fraction_exit_code_and_one_line(tmp_path, rng):
    lines = [*ml100k_lines(sample_ratings(rng, 40)), "7\t8\t9\t10"]
    path = write_lines(tmp_path / "data" / "u.data", lines)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-q",
            "ingest",
            str(path),
            "--out",
            str(out),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mfpipe ingest: error: {path}: 1 of 41 lines rejected "
        "(2.44% > --max-reject-fraction 0.01); first bad line 41: rating 9.0 outside 1.0..5.0"
    ]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
