"""Per-epoch progress: a bar for a person at a terminal, plain log lines for scheduled jobs."""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)


class EpochProgress:
    """Reports each finished epoch; a tqdm bar when stderr is a terminal, else INFO lines."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.label = label
        use_bar = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, desc=label, unit="epoch", leave=True) if use_bar else None

    def update(self, record: dict[str, Any]) -> None:
        """Show one epoch's record (epoch, train_rmse, validation_rmse, ratings_per_second)."""
        validation = record.get("validation_rmse")
        if self.bar is not None:
            postfix = {"train": f"{record['train_rmse']:.4f}"}
            if validation is not None:
                postfix["valid"] = f"{validation:.4f}"
            postfix["ratings/s"] = f"{record['ratings_per_second']:,.0f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
            return
        logger.info(
            "%s epoch %d: train RMSE %.4f, validation RMSE %s, %.1f s, %s ratings/s",
            self.label,
            record["epoch"],
            record["train_rmse"],
            "-" if validation is None else f"{validation:.4f}",
            record["seconds"],
            f"{record['ratings_per_second']:,.0f}",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
