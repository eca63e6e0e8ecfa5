"""The functions the ingest stage runs on Dask workers, one per kind of task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dataset import write_bucket, write_movies, write_rejects
from pipeline.ingest.layouts import Layout
from pipeline.ingest.movies import parse_genre_names, parse_movies
from pipeline.ingest.parse import parse_block, read_block
from pipeline.ingest.sources import SourceFile
from pipeline.ingest.write import (
    gather_rejects,
    keep_latest,
    read_bucket,
    rejects_piece_path,
    write_pieces,
    write_rejects_piece,
)


@dataclass(frozen=True)
class BlockSummary:
    """Line accounting of one block; `first_reject` is (block-local line, reason), and
    `strict_lines` counts the lines the compiled scan read."""

    index: int
    lines: int
    header_lines: int
    accepted: int
    rejected: int
    first_reject: tuple[int, str] | None
    strict_lines: int


@dataclass(frozen=True)
class BucketSummary:
    """One written bucket: rows kept, duplicates dropped and its distinct ids.

    `user_ids` and `movie_ids` are ascending unique (k,) int32 arrays.
    """

    bucket: int
    rows: int
    duplicates_dropped: int
    user_ids: np.ndarray
    movie_ids: np.ndarray


@dataclass(frozen=True)
class MoviesSummary:
    """Line accounting of the movies file; `first_reject` is (line, reason)."""

    lines: int
    header_lines: int
    accepted: int
    rejected: int
    duplicates_dropped: int
    movies: int
    first_reject: tuple[int, str] | None


def block_label(index: int) -> str:
    return f"ratings-{index:06d}"


def ingest_block(
    file: SourceFile,
    layout: Layout,
    index: int,
    start: int,
    end: int,
    n_buckets: int,
    scratch: Path,
    *after: object,
) -> BlockSummary:
    """Parse the block ``[start, end)`` of the ratings file and shuffle it to the buckets.

    `after` takes futures the task must wait for (the decompression of its file).
    """
    data = read_block(file.path, start, end)
    parsed = parse_block(data, layout, name=file.name, first=start == 0)
    del data
    columns = {
        "user_id": parsed.user_id,
        "movie_id": parsed.movie_id,
        "rating": parsed.rating,
        "timestamp": parsed.timestamp,
    }
    write_pieces(columns, scratch, index, n_buckets)
    first = None
    if parsed.rejected:
        path = rejects_piece_path(scratch, block_label(index))
        write_rejects_piece(path, parsed.reject_lines, parsed.reject_text, parsed.reject_reason)
        first = (parsed.reject_lines[0], parsed.reject_reason[0])
    return BlockSummary(
        index,
        parsed.lines,
        parsed.header_lines,
        parsed.accepted,
        parsed.rejected,
        first,
        parsed.strict_lines,
    )


def ingest_bucket(scratch: Path, bucket: int, staging: Path) -> BucketSummary:
    """Assemble one bucket from its pieces, keep the latest rating per pair, write it."""
    table, dropped = keep_latest(read_bucket(scratch, bucket))
    rows = write_bucket(staging, bucket, table)
    user_id = table.column("user_id").to_numpy()
    # Rows are sorted by user, so distinct users are where the id changes.
    users = user_id[np.append(True, user_id[1:] != user_id[:-1])] if rows else user_id
    movies = _distinct(table.column("movie_id").to_numpy())
    return BucketSummary(bucket, rows, dropped, users, movies)


def _distinct(ids: np.ndarray) -> np.ndarray:
    """Ascending distinct values of (n,) int32 ids; counting is faster than sorting while
    the largest id is small."""
    if len(ids) and ids.max() < 1 << 24:
        return np.flatnonzero(np.bincount(ids)).astype(np.int32)
    return np.unique(ids).astype(np.int32)


def ingest_movies(
    movies: SourceFile,
    genres: SourceFile | None,
    layout: Layout,
    staging: Path,
    scratch: Path,
    *after: object,
) -> MoviesSummary:
    """Parse the movies file, write ``movies/part-0.parquet`` and a rejects piece.

    `after` takes futures the task must wait for (the decompression of its files).
    """
    genre_names = None
    if genres is not None:
        genre_names = parse_genre_names(genres.path.read_bytes(), genres.name)
    parsed = parse_movies(
        movies.path.read_bytes(), layout, name=movies.name, genre_names=genre_names
    )
    write_movies(staging, parsed.table)
    first = None
    if parsed.rejected:
        path = rejects_piece_path(scratch, "movies")
        write_rejects_piece(path, parsed.reject_lines, parsed.reject_text, parsed.reject_reason)
        first = (parsed.reject_lines[0], parsed.reject_reason[0])
    return MoviesSummary(
        parsed.lines,
        parsed.header_lines,
        parsed.accepted,
        parsed.rejected,
        parsed.duplicates_dropped,
        parsed.table.num_rows,
        first,
    )


def collect_rejects(pieces: list[tuple[Path, str, int]], staging: Path) -> int:
    """Write ``rejects/part-0.parquet`` from the rejects pieces; return its rows."""
    table = gather_rejects(pieces)
    write_rejects(staging, table)
    return table.num_rows
