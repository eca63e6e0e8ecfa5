"""The ingest stage: MovieLens files -> validated, hive-partitioned Parquet (see
:mod:`pipeline.dataset` for the layout).

The client only lists and sniffs the source; workers decompress, checksum, parse blocks,
shuffle rows to user buckets through a scratch folder beside the output, and write the
buckets into a staging folder that is published atomically once the accounting adds up.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from distributed import Client, Future

from pipeline import __version__
from pipeline.dataset import (
    SCHEMA_VERSION,
    Dataset,
    open_dataset,
    partitioning,
    utc_now,
    write_manifest,
    write_vocabulary,
)
from pipeline.errors import PipelineError
from pipeline.ingest.parse import plan_blocks
from pipeline.ingest.sources import SourceFile, Sources, checksum, resolve, unpack
from pipeline.ingest.tasks import (
    BlockSummary,
    BucketSummary,
    MoviesSummary,
    block_label,
    collect_rejects,
    ingest_block,
    ingest_bucket,
    ingest_movies,
)
from pipeline.ingest.write import rejects_piece_path
from pipeline.publish import check_destination, publishing

__all__ = ["DEFAULT_BLOCK_SIZE", "ingest"]

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 64 * 1024 * 1024


def scratch_path(dest: Path) -> Path:
    """A fresh sibling folder of `dest` for decompressed files and shuffle pieces."""
    return dest.parent / f".{dest.name}.scratch-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def ingest(
    source: Path,
    out: Path,
    client: Client,
    *,
    overwrite: bool = False,
    max_reject_fraction: float = 0.01,
    n_buckets: int = 16,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Dataset:
    """Ingest a MovieLens folder, ratings file, .zip or .gz into the dataset folder `out`.

    Nothing is written to `out` unless the whole run succeeds: bad lines are counted as
    rejects, and a reject fraction above `max_reject_fraction` in any file fails the run
    with a PipelineError naming the file, the first bad line and its reason.
    """
    if n_buckets < 1:
        raise PipelineError(f"--user-buckets must be at least 1, got {n_buckets}")
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise PipelineError(f"--max-reject-fraction must be within 0..1, got {max_reject_fraction}")
    if block_size < 1:
        raise PipelineError(f"block size must be positive, got {block_size}")
    source, out = Path(source), Path(out)
    check_destination(out, overwrite)
    started = time.perf_counter()
    scratch = scratch_path(out.absolute())
    try:
        sources = resolve(source, scratch)
        logger.info("ingesting %s (%s layout)", source, sources.layout.format)
        with publishing(out, overwrite=overwrite) as staging:
            manifest = _run(
                client, sources, staging, scratch, n_buckets, max_reject_fraction, block_size
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - started
    logger.info(
        "ingested %s ratings (%s users, %s movies) in %.1f s",
        f"{manifest['ratings']:,}",
        f"{manifest['users']:,}",
        f"{manifest['movies']:,}",
        elapsed,
    )
    return open_dataset(out)


def _prepare(client: Client, file: SourceFile) -> Future:
    """A future of (bytes, sha256, lines): decompress a compressed file, else checksum it."""
    if file.compression is not None:
        return client.submit(unpack, file, pure=False, key=f"ingest-unpack-{uuid.uuid4().hex}")
    return client.submit(checksum, file, pure=False, key=f"ingest-checksum-{uuid.uuid4().hex}")


def _fail_fraction(name: str, rejected: int, considered: int, limit: float, first) -> None:
    if considered and rejected / considered > limit:
        line, reason = first
        raise PipelineError(
            f"{name}: {rejected:,} of {considered:,} lines rejected "
            f"({rejected / considered:.2%} > --max-reject-fraction {limit:g}); "
            f"first bad line {line}: {reason}"
        )


def _run(
    client: Client,
    sources: Sources,
    staging: Path,
    scratch: Path,
    n_buckets: int,
    max_reject_fraction: float,
    block_size: int,
) -> dict:
    layout = sources.layout
    ratings = sources.ratings
    run = uuid.uuid4().hex[:8]
    prepared = {file.role: _prepare(client, file) for file in sources.files()}
    # Tasks reading a decompressed copy wait for it; plain files are read right away.
    unpacked = {file.role: [prepared[file.role]] for file in sources.files() if file.compression}
    if ratings.compression is not None:
        size = prepared["ratings"].result()[0]
    else:
        size = ratings.path.stat().st_size
        if size == 0:
            raise PipelineError(f"{ratings.name}: file is empty")
    blocks = plan_blocks(size, block_size)
    block_futures = [
        client.submit(
            ingest_block,
            ratings,
            layout,
            index,
            start,
            end,
            n_buckets,
            scratch,
            *unpacked.get("ratings", []),
            key=f"ingest-block-{run}-{index}",
        )
        for index, (start, end) in enumerate(blocks)
    ]
    movies_future = None
    if sources.movies is not None:
        movies_future = client.submit(
            ingest_movies,
            sources.movies,
            sources.genres,
            layout,
            staging,
            scratch,
            *unpacked.get("movies", []),
            *unpacked.get("genres", []),
            key=f"ingest-movies-{run}",
        )
    began = time.perf_counter()
    summaries: list[BlockSummary] = client.gather(block_futures)
    logger.debug("parsed %d blocks in %.2f s", len(summaries), time.perf_counter() - began)
    n_bytes, sha256, lines_read = prepared["ratings"].result()
    logger.debug("checksum done after %.2f s", time.perf_counter() - began)
    ratings_counts = _check_ratings_accounting(
        ratings.name, summaries, lines_read, max_reject_fraction
    )
    movies_summary: MoviesSummary | None = None
    if movies_future is not None:
        movies_summary = movies_future.result()
        assert sources.movies is not None
        _check_movies_accounting(
            sources.movies.name, movies_summary, prepared["movies"].result()[2], max_reject_fraction
        )

    bucket_futures = [
        client.submit(ingest_bucket, scratch, bucket, staging, key=f"ingest-bucket-{run}-{bucket}")
        for bucket in range(n_buckets)
    ]
    offsets = np.concatenate([[0], np.cumsum([s.lines for s in summaries])])
    pieces = [
        (rejects_piece_path(scratch, block_label(s.index)), ratings.name, int(offsets[s.index]))
        for s in summaries
        if s.rejected
    ]
    if sources.movies is not None:
        pieces.append((rejects_piece_path(scratch, "movies"), sources.movies.name, 0))
    rejects_future = client.submit(collect_rejects, pieces, staging, key=f"ingest-rejects-{run}")
    began = time.perf_counter()
    buckets: list[BucketSummary] = client.gather(bucket_futures)
    rejects_future.result()
    logger.debug("wrote %d buckets in %.2f s", n_buckets, time.perf_counter() - began)

    duplicates = sum(b.duplicates_dropped for b in buckets)
    total = sum(b.rows for b in buckets)
    if total == 0:
        raise PipelineError(f"{ratings.name}: no ratings accepted")
    user_ids = np.sort(np.concatenate([b.user_ids for b in buckets]))
    movie_ids = np.unique(np.concatenate([b.movie_ids for b in buckets]))
    write_vocabulary(staging, user_ids, movie_ids)
    ratings_counts["duplicates_dropped"] = duplicates
    ratings_counts["ratings"] = ratings_counts["accepted"] - duplicates
    if ratings_counts["ratings"] != total:
        raise PipelineError(f"{ratings.name}: internal error, bucket rows do not add up")

    source_entries = [ratings.manifest_entry(n_bytes, sha256)]
    for role in ("movies", "genres"):
        file = getattr(sources, role)
        if file is not None:
            size_, sha_, _ = prepared[role].result()
            source_entries.append(file.manifest_entry(size_, sha_))
    movies_counts = []
    if movies_summary is not None:
        assert sources.movies is not None
        movies_counts.append(
            {
                "source_file": sources.movies.name,
                "lines_read": movies_summary.lines,
                "header_lines": movies_summary.header_lines,
                "accepted": movies_summary.accepted,
                "rejected": movies_summary.rejected,
                "duplicates_dropped": movies_summary.duplicates_dropped,
                "movies": movies_summary.movies,
            }
        )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": __version__,
        "created": utc_now(),
        "format": layout.format,
        "sources": source_entries,
        "rating_scale": {
            "min": layout.rating_min,
            "max": layout.rating_max,
            "step": layout.rating_step,
        },
        "n_buckets": n_buckets,
        "partitioning": partitioning(n_buckets),
        "max_reject_fraction": max_reject_fraction,
        "ratings": total,
        "users": len(user_ids),
        "movies": len(movie_ids),
        "rows_per_partition": {str(b.bucket): b.rows for b in buckets},
        "counts": {"ratings_files": [ratings_counts], "movies_files": movies_counts},
    }
    write_manifest(staging, manifest)
    strict = sum(s.strict_lines for s in summaries)
    logger.debug("%s of %s lines read by the strict scan", f"{strict:,}", f"{lines_read:,}")
    return manifest


def _check_ratings_accounting(
    name: str, summaries: list[BlockSummary], lines_read: int, max_reject_fraction: float
) -> dict:
    """Line counts of the ratings file; fails when they do not add up or when too many
    lines were rejected."""
    header = sum(s.header_lines for s in summaries)
    accepted = sum(s.accepted for s in summaries)
    rejected = sum(s.rejected for s in summaries)
    accounted = header + accepted + rejected
    if lines_read != accounted:
        raise PipelineError(
            f"{name}: internal error, {lines_read:,} lines read but {accounted:,} accounted for "
            "(header + accepted + rejected)"
        )
    considered = accepted + rejected
    if considered == 0:
        raise PipelineError(f"{name}: no rating lines")
    first = None
    offset = 0
    for summary in summaries:
        if summary.first_reject is not None:
            line, reason = summary.first_reject
            first = (offset + line, reason)
            break
        offset += summary.lines
    _fail_fraction(name, rejected, considered, max_reject_fraction, first)
    return {
        "source_file": name,
        "lines_read": lines_read,
        "header_lines": header,
        "accepted": accepted,
        "rejected": rejected,
        "duplicates_dropped": 0,
        "ratings": accepted,
    }


def _check_movies_accounting(
    name: str, summary: MoviesSummary, lines_read: int, max_reject_fraction: float
) -> None:
    accounted = summary.header_lines + summary.accepted + summary.rejected
    if not lines_read == summary.lines == accounted:
        raise PipelineError(f"{name}: internal error, movie lines do not add up")
    considered = summary.accepted + summary.rejected
    _fail_fraction(name, summary.rejected, considered, max_reject_fraction, summary.first_reject)
