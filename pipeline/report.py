"""The human-readable summary of a run: report.md and a learning-curve PNG."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

CURVE_FILE = "learning_curve.png"
REPORT_FILE = "report.md"
MAX_EPOCH_ROWS = 20


def write_report(
    out: Path,
    *,
    title: str,
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    counts: Mapping[str, Any],
    timings: Mapping[str, float],
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write `out/report.md` and `out/learning_curve.png`; return the report path.

    `history`: one mapping per epoch with epoch, train_rmse, validation_rmse (may be None or
    NaN without a validation set), seconds, ratings_per_second. `metrics`: test-set figures
    such as rmse, mae, ratings, unseen_users, unseen_movies. `counts`: sizes to list (users,
    movies, train/test ratings, ...). `timings`: seconds per stage. `settings`: optional
    key/value lines (split, rank, ...).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    has_curve = plot_learning_curve(history, out / CURVE_FILE)
    lines = [f"# {title}", ""]
    if settings:
        lines += ["## Settings", "", *_key_value_table(settings), ""]
    lines += ["## Test metrics", "", *_key_value_table(metrics), ""]
    lines += ["## Counts", "", *_key_value_table(counts), ""]
    lines += ["## Training", ""]
    if history:
        lines += [*_history_summary(history), ""]
        lines += [*_epoch_table(history), ""]
    else:
        lines += ["No epochs were run.", ""]
    if has_curve:
        lines += [f"![Train and validation RMSE per epoch]({CURVE_FILE})", ""]
    lines += ["## Stage timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    lines.append(f"| total | {sum(timings.values()):.1f} |")
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.debug("wrote %s", path)
    return path


def plot_learning_curve(history: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Plot train and validation RMSE against epoch to a PNG at `path`; False if no epochs.

    Records with a ``phase`` (the trainer's "search" and "refit") get one line per phase.
    """
    if not history:
        return False
    # A bare Figure renders with the Agg canvas and leaves pyplot's global state alone.
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.subplots()
    for phase, records in _phases(history).items():
        prefix = f"{phase} " if phase else ""
        epochs = [int(h["epoch"]) for h in records]
        train = [_number(h.get("train_rmse")) for h in records]
        axes.plot(epochs, train, "o-", markersize=3, label=f"{prefix}train")
        validation = [_number(h.get("validation_rmse")) for h in records]
        if any(not math.isnan(v) for v in validation):
            axes.plot(epochs, validation, "s-", markersize=3, label=f"{prefix}validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("RMSE")
    axes.set_title("Learning curve")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


def _phases(history: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Records grouped by phase ("" without phases), in order of appearance."""
    phases: dict[str, list[Mapping[str, Any]]] = {}
    for record in history:
        phases.setdefault(str(record.get("phase") or ""), []).append(record)
    return phases


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _key_value_table(values: Mapping[str, Any]) -> list[str]:
    return ["| | |", "|---|---:|"] + [f"| {key} | {_format(v)} |" for key, v in values.items()]


def _history_summary(history: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for phase, records in _phases(history).items():
        last = records[-1]
        name = f"{phase}: " if phase else ""
        lines.append(
            f"- {name}{len(records)} epochs, final train RMSE "
            f"{_format(_number(last.get('train_rmse')))}"
        )
    validation = [(h["epoch"], _number(h.get("validation_rmse"))) for h in history]
    validation = [(e, v) for e, v in validation if not math.isnan(v)]
    if validation:
        best_epoch, best = min(validation, key=lambda ev: ev[1])
        lines.append(f"- best validation RMSE {best:.4f} at epoch {best_epoch}")
    seconds = sum(_number(h.get("seconds")) for h in history)
    lines.append(f"- training time {seconds:.1f} s")
    return lines


def _epoch_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per-epoch rows; for long runs about MAX_EPOCH_ROWS evenly spaced ones per phase, plus
    the last of each phase."""
    phases = _phases(history)
    budget = max(2, MAX_EPOCH_ROWS // len(phases))
    with_phase = any(phases)
    header = "| epoch | train RMSE | validation RMSE | seconds | ratings/s |"
    rule = "|---:|---:|---:|---:|---:|"
    lines = ["| phase " + header, "|---" + rule] if with_phase else [header, rule]
    for phase, records in phases.items():
        rows = list(records)
        if len(rows) > budget:
            stride = math.ceil(len(rows) / budget)
            rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
        for h in rows:
            lines.append(
                ("| " + phase + " " if with_phase else "")
                + f"| {h['epoch']} | {_format(_number(h.get('train_rmse')))} "
                f"| {_format(_number(h.get('validation_rmse')))} "
                f"| {_number(h.get('seconds')):.2f} "
                f"| {_format(_number(h.get('ratings_per_second')))} |"
            )
    return lines
