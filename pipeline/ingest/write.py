"""Shuffling parsed blocks into user buckets through the scratch folder, and assembling them.

A block task writes one Arrow IPC piece per non-empty bucket; a bucket task reads the pieces
of its bucket in block order (so rows stay in file order), drops duplicate pairs and writes
the sorted Parquet file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.dataset import RATINGS_SCHEMA, REJECTS_SCHEMA, bucket_of

PIECE_SCHEMA = RATINGS_SCHEMA
LOCAL_REJECTS_SCHEMA = pa.schema(
    [("line_number", pa.int64()), ("raw_text", pa.string()), ("reason", pa.string())]
)


def piece_path(scratch: Path, block: int, bucket: int) -> Path:
    return Path(scratch) / "shuffle" / f"bucket-{bucket}" / f"block-{block:06d}.arrow"


def rejects_piece_path(scratch: Path, label: str) -> Path:
    return Path(scratch) / "rejects" / f"{label}.arrow"


def _write_ipc(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_ipc(path: Path) -> pa.Table:
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_file(source).read_all()


def write_pieces(
    columns: dict[str, np.ndarray], scratch: Path, block: int, n_buckets: int
) -> list[int]:
    """Split one block's accepted rows by bucket and write a piece per non-empty bucket.

    `columns` holds (n,) arrays user_id int32, movie_id int32, rating float32, timestamp
    int64 in file order; returns the rows per bucket, (n_buckets,) ints.
    """
    buckets = bucket_of(columns["user_id"], n_buckets)
    dtype = np.uint8 if n_buckets <= 256 else np.int64
    # A stable sort keeps file order inside each bucket (radix sort for 8-bit keys).
    order = np.argsort(buckets.astype(dtype), kind="stable")
    counts = np.bincount(buckets, minlength=n_buckets)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    table = pa.Table.from_arrays(
        [pa.array(columns[name][order]) for name in PIECE_SCHEMA.names], schema=PIECE_SCHEMA
    )
    for bucket in np.flatnonzero(counts).tolist():
        piece = table.slice(bounds[bucket], counts[bucket])
        _write_ipc(piece_path(scratch, block, bucket), piece)
    return counts.tolist()


def read_bucket(scratch: Path, bucket: int) -> pa.Table:
    """All pieces of one bucket, concatenated in block order (file order)."""
    folder = Path(scratch) / "shuffle" / f"bucket-{bucket}"
    files = sorted(folder.glob("block-*.arrow")) if folder.is_dir() else []
    if not files:
        return PIECE_SCHEMA.empty_table()
    return pa.concat_tables([_read_ipc(file) for file in files]).combine_chunks()


def keep_latest(table: pa.Table) -> tuple[pa.Table, int]:
    """One row per (user_id, movie_id), sorted by that pair; returns (table, rows dropped).

    Rows must be in file order. Among rows of one pair the latest timestamp wins, and on
    equal timestamps the later row.
    """
    n = table.num_rows
    if n == 0:
        return table, 0
    key = table.column("user_id").to_numpy().astype(np.int64) << 32
    key |= table.column("movie_id").to_numpy().astype(np.int64)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    if not np.any(sorted_key[1:] == sorted_key[:-1]):
        if np.all(order[1:] > order[:-1]):
            return table, 0
        return table.take(order), 0
    timestamp = table.column("timestamp").to_numpy()
    order = np.lexsort((np.arange(n), timestamp, key))
    sorted_key = key[order]
    last_of_pair = np.append(sorted_key[1:] != sorted_key[:-1], True)
    keep = order[last_of_pair]
    return table.take(keep), n - len(keep)


def write_rejects_piece(path: Path, lines: list[int], texts: list[str], reasons: list[str]) -> None:
    """Write rejected lines (line numbers local to their block or file) to a piece."""
    table = pa.Table.from_arrays(
        [pa.array(lines, pa.int64()), pa.array(texts, pa.string()), pa.array(reasons, pa.string())],
        schema=LOCAL_REJECTS_SCHEMA,
    )
    _write_ipc(path, table)


def gather_rejects(pieces: list[tuple[Path, str, int]]) -> pa.Table:
    """Rejects from (piece path, source file name, line offset) triples, in the given order;
    the offset turns block-local line numbers into physical line numbers of the file."""
    tables = []
    for path, source_file, offset in pieces:
        if not path.is_file():
            continue
        local = _read_ipc(path)
        tables.append(
            pa.Table.from_arrays(
                [
                    pa.array(np.full(local.num_rows, source_file, dtype=object), pa.string()),
                    pa.array(local.column("line_number").to_numpy() + offset, pa.int64()),
                    local.column("raw_text"),
                    local.column("reason"),
                ],
                schema=REJECTS_SCHEMA,
            )
        )
    if not tables:
        return REJECTS_SCHEMA.empty_table()
    return pa.concat_tables(tables)
