"""report.md and the learning-curve PNG."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np

from pipeline.report import CURVE_FILE, REPORT_FILE, plot_learning_curve, write_report


def history(n: int, validation: bool = True) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_rmse": 1.5 / e,
            "validation_rmse": (1.6 / e + 0.01 * e) if validation else None,
            "seconds": 0.25,
            "ratings_per_second": 400_000.0,
        }
        for e in range(1, n + 1)
    ]


def table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the Markdown table that starts with `header`."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_has_metrics_epochs_and_timings(tmp_path):
    write_report(
        tmp_path,
        title="quickstart: run 2026-12-03",
        history=history(8),
        metrics={"rmse": 0.8612345, "mae": 0.67, "ratings": 10_000, "unseen_users": 0},
        counts={"users": 2000, "train_ratings": 90_000},
        timings={"ingest": 1.25, "train": 10.0},
        settings={"split": "method=random, test_fraction=0.1"},
    )
    text = (tmp_path / REPORT_FILE).read_text()
    assert text.startswith("# quickstart: run 2026-12-03\n")
    test_metrics = dict(table_rows(section(text, "Test metrics"), "| | |"))
    assert test_metrics == {
        "rmse": "0.8612",
        "mae": "0.6700",
        "ratings": "10,000",
        "unseen_users": "0",
    }
    counts = dict(table_rows(section(text, "Counts"), "| | |"))
    assert counts == {"users": "2,000", "train_ratings": "90,000"}
    settings = dict(table_rows(section(text, "Settings"), "| | |"))
    assert settings == {"split": "method=random, test_fraction=0.1"}

    epochs = table_rows(text, "| epoch | train RMSE | validation RMSE | seconds | ratings/s |")
    assert [row[0] for row in epochs] == [str(e) for e in range(1, 9)]
    assert epochs[1] == ["2", "0.7500", "0.8200", "0.25", "400,000"]
    # 1.6/e + 0.01e falls until e = 12.6, so the best of epochs 1..8 is the last
    assert "- best validation RMSE 0.2800 at epoch 8" in text
    assert "- training time 2.0 s" in text
    timings = table_rows(text, "| stage | seconds |")
    assert timings == [["ingest", "1.2"], ["train", "10.0"], ["total", "11.2"]]
    assert f"![Train and validation RMSE per epoch]({CURVE_FILE})" in text

    image = matplotlib.image.imread(tmp_path / CURVE_FILE)
    assert image.shape[:2] == (400, 640)
    assert (tmp_path / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # something was drawn: the picture is not one flat colour
    assert np.unique(image.reshape(-1, image.shape[2]), axis=0).shape[0] > 10


def test_long_runs_are_subsampled_and_keep_the_last_epoch(tmp_path):
    write_report(tmp_path, title="t", history=history(45), metrics={}, counts={}, timings={})
    text = (tmp_path / REPORT_FILE).read_text()
    epochs = [
        row[0]
        for row in table_rows(
            text, "| epoch | train RMSE | validation RMSE | seconds | ratings/s |"
        )
    ]
    assert epochs[0] == "1" and epochs[-1] == "45"
    assert len(epochs) <= 21
    assert "- best validation RMSE 0.2531 at epoch 13" in text


def test_without_validation_or_epochs(tmp_path):
    assert plot_learning_curve(history(3, validation=False), tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert not plot_learning_curve([], tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()

    write_report(
        tmp_path / "r", title="t", history=history(3, False), metrics={}, counts={}, timings={}
    )
    text = (tmp_path / "r" / REPORT_FILE).read_text()
    assert "best validation" not in text
    rows = table_rows(text, "| epoch | train RMSE | validation RMSE | seconds | ratings/s |")
    assert rows[0][2] == "–"
    assert not math.isnan(float(rows[0][1]))

    write_report(tmp_path / "e", title="t", history=[], metrics={}, counts={}, timings={})
    assert "No epochs were run." in (tmp_path / "e" / REPORT_FILE).read_text()
    assert not (tmp_path / "e" / CURVE_FILE).exists()


def test_trainer_phases_get_their_own_rows_and_lines(tmp_path):
    search = [dict(h, phase="search") for h in history(6)]
    refit = [dict(h, phase="refit", validation_rmse=None) for h in history(4)]
    write_report(tmp_path, title="t", history=search + refit, metrics={}, counts={}, timings={})
    text = (tmp_path / REPORT_FILE).read_text()
    header = "| phase | epoch | train RMSE | validation RMSE | seconds | ratings/s |"
    rows = table_rows(text, header)
    assert [(r[0], r[1]) for r in rows] == [("search", str(e)) for e in range(1, 7)] + [
        ("refit", str(e)) for e in range(1, 5)
    ]
    assert "- search: 6 epochs, final train RMSE 0.2500" in text
    assert "- refit: 4 epochs, final train RMSE 0.3750" in text
    assert "- best validation RMSE 0.3267 at epoch 6" in text
    assert "- training time 2.5 s" in text
    assert matplotlib.image.imread(tmp_path / CURVE_FILE).shape[:2] == (400, 640)
