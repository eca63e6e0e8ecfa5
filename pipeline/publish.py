"""Atomic publication of an output folder.

Everything is written into a staging folder beside the destination (never inside it, so
readers of a hive-partitioned parent never see it) and renamed into place once complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


def staging_path(dest: Path) -> Path:
    """A fresh sibling path of `dest` for staging, hidden from hive and glob readers."""
    return dest.parent / f".{dest.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse an existing `dest` unless `overwrite`; raise before any work is done."""
    if dest.exists() and not overwrite:
        raise PipelineError(f"{dest} already exists; pass --overwrite to replace it")


@contextmanager
def publishing(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success rename it to `dest`, on error remove it.

    An existing `dest` is replaced only with `overwrite`; the swap is two renames, so a reader
    sees either the old folder or the new one, never a mix.
    """
    dest = Path(dest)
    check_destination(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(dest)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace(staging, dest, overwrite=overwrite)


def replace(staging: Path, dest: Path, *, overwrite: bool) -> None:
    """Move a complete `staging` folder to `dest`, swapping out an old `dest` if allowed."""
    retired = None
    if dest.exists():
        check_destination(dest, overwrite)
        retired = dest.parent / f".{dest.name}.retired-{uuid.uuid4().hex[:8]}"
        os.rename(dest, retired)
    os.rename(staging, dest)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    logger.debug("published %s", dest)
