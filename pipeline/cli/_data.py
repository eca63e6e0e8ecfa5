"""Opening the DATA argument: an ingested dataset, or raw MovieLens ratings ingested on the fly."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import Client

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def check_exists(path: Path, what: str = "DATA") -> None:
    """One clear line when a path argument does not exist (checked before any cluster starts)."""
    if not path.exists():
        raise PipelineError(f"{what} {path}: no such file or folder")


@contextmanager
def open_ratings(path: Path, client: Client, max_reject_fraction: float = 0.01) -> Iterator[Any]:
    """Yield a Dataset for `path`; raw ratings are ingested into a temporary folder first."""
    from pipeline.dataset import is_dataset, open_dataset
    from pipeline.ingest import ingest

    if is_dataset(path):
        yield open_dataset(path)
        return
    with tempfile.TemporaryDirectory(prefix="mfpipe-ingest-") as tmp:
        logger.info("%s is not an ingested dataset; ingesting it first", path)
        yield ingest(path, Path(tmp) / "dataset", client, max_reject_fraction=max_reject_fraction)
