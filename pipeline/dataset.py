"""The on-disk ratings dataset: hive-partitioned Parquet plus vocabulary and a manifest.

Layout under a dataset folder ``DIR``::

    DIR/manifest.json
    DIR/ratings/user_bucket=B/part-0.parquet   B = user_id % n_buckets, one file per bucket
    DIR/movies/part-0.parquet                  only when the source had movie metadata
    DIR/rejects/part-0.parquet                 always present, possibly with 0 rows
    DIR/vocabulary/users.parquet               user_id -> user_index
    DIR/vocabulary/movies.parquet              movie_id -> movie_index

Bucket files hold ``user_id`` int32, ``movie_id`` int32, ``rating`` float32 and
``timestamp`` int64 (Unix seconds), sorted by (user_id, movie_id), one row per pair.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.publish import publishing

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PART = "part-0.parquet"
PARTITION_RULE = "user_bucket = user_id % n_buckets"

RATINGS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int32()),
        ("movie_id", pa.int32()),
        ("rating", pa.float32()),
        ("timestamp", pa.int64()),
    ]
)
MOVIES_SCHEMA = pa.schema(
    [
        ("movie_id", pa.int32()),
        ("title", pa.string()),
        ("year", pa.int16()),
        ("genres", pa.list_(pa.string())),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("line_number", pa.int64()),
        ("raw_text", pa.string()),
        ("reason", pa.string()),
    ]
)
USERS_SCHEMA = pa.schema([("user_id", pa.int32()), ("user_index", pa.int32())])
MOVIE_INDEX_SCHEMA = pa.schema([("movie_id", pa.int32()), ("movie_index", pa.int32())])

# Keys a derived dataset recomputes instead of inheriting from its base manifest.
_COMPUTED_KEYS = (
    "schema_version",
    "pipeline_version",
    "created",
    "rating_scale",
    "n_buckets",
    "partitioning",
    "ratings",
    "users",
    "movies",
    "rows_per_partition",
    "counts",
)


def bucket_dir(root: Path, bucket: int) -> Path:
    """The hive partition folder of one bucket."""
    return Path(root) / "ratings" / f"user_bucket={bucket}"


def bucket_of(user_id: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket of each user: ``user_id % n_buckets``; `user_id` (n,) int32 -> (n,) int64."""
    return np.asarray(user_id, dtype=np.int64) % n_buckets


def partitioning(n_buckets: int) -> dict:
    """The manifest entry describing the ratings partitioning."""
    return {
        "key": "user_bucket",
        "column": "user_id",
        "n_buckets": n_buckets,
        "rule": PARTITION_RULE,
    }


def sort_ratings(table: pa.Table) -> pa.Table:
    """Rows ordered by (user_id, movie_id); a stable sort, so equal pairs keep their order."""
    if table.num_rows < 2:
        return table
    key = table.column("user_id").to_numpy().astype(np.int64) << 32
    key |= table.column("movie_id").to_numpy().astype(np.int64)
    order = np.argsort(key, kind="stable")
    if np.all(order[1:] > order[:-1]):
        return table
    return table.take(order)


def write_bucket(root: Path, bucket: int, table: pa.Table) -> int:
    """Write one sorted bucket as ``ratings/user_bucket=B/part-0.parquet``; return its rows."""
    folder = bucket_dir(root, bucket)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.cast(RATINGS_SCHEMA), folder / PART, row_group_size=1 << 20)
    return table.num_rows


def write_vocabulary(root: Path, user_ids: np.ndarray, movie_ids: np.ndarray) -> None:
    """Write the dense index of users and movies: index = position in ascending id order.

    `user_ids` (n_users,) and `movie_ids` (n_movies,) int32, ascending and unique.
    """
    folder = Path(root) / "vocabulary"
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids, schema in (
        ("users", user_ids, USERS_SCHEMA),
        ("movies", movie_ids, MOVIE_INDEX_SCHEMA),
    ):
        ids = np.asarray(ids, dtype=np.int32)
        index = np.arange(len(ids), dtype=np.int32)
        table = pa.Table.from_arrays([pa.array(ids), pa.array(index)], schema=schema)
        pq.write_table(table, folder / f"{name}.parquet")


def write_rejects(root: Path, rejects: pa.Table | None) -> None:
    """Write ``rejects/part-0.parquet`` (an empty table when `rejects` is None)."""
    folder = Path(root) / "rejects"
    folder.mkdir(parents=True, exist_ok=True)
    table = REJECTS_SCHEMA.empty_table() if rejects is None else rejects.cast(REJECTS_SCHEMA)
    pq.write_table(table, folder / PART)


def write_movies(root: Path, movies: pa.Table) -> None:
    """Write ``movies/part-0.parquet``: movie_id, title, year (nullable), genres."""
    folder = Path(root) / "movies"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(movies.select(MOVIES_SCHEMA.names).cast(MOVIES_SCHEMA), folder / PART)


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` (indented, keys in insertion order)."""
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    (Path(root) / MANIFEST).write_text(text, encoding="utf-8")


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a Z suffix, to the second."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def is_dataset(path: Path) -> bool:
    """Whether `path` holds an ingested dataset of a supported schema version."""
    try:
        open_dataset(path)
    except PipelineError:
        return False
    return True


def open_dataset(path: Path) -> Dataset:
    """Open an ingested dataset; a PipelineError (one line) when `path` is not one."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise PipelineError(f"{path}: no such dataset folder")
    if not manifest_path.is_file():
        raise PipelineError(f"{path} is not an ingested dataset (no {MANIFEST})")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = getattr(exc, "lineno", 1)
        raise PipelineError(f"{manifest_path} line {line}: not valid JSON") from None
    if not isinstance(manifest, dict):
        raise PipelineError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PipelineError(
            f"{manifest_path}: schema_version {version!r} is not supported "
            f"(expected {SCHEMA_VERSION})"
        )
    for key in ("n_buckets", "rating_scale", "rows_per_partition"):
        if key not in manifest:
            raise PipelineError(f"{manifest_path}: missing key {key!r}")
    scale = manifest["rating_scale"]
    for key in ("min", "max", "step"):
        if not isinstance(scale, dict) or key not in scale:
            raise PipelineError(f"{manifest_path}: missing key 'rating_scale.{key}'")
    n_buckets = manifest["n_buckets"]
    if not isinstance(n_buckets, int) or n_buckets < 1:
        raise PipelineError(f"{manifest_path}: n_buckets must be a positive integer")
    for sub in ("ratings", "vocabulary", "rejects"):
        if not (path / sub).is_dir():
            raise PipelineError(f"{path} is not a complete dataset (no {sub}/ folder)")
    return Dataset(path, manifest, hashlib.sha256(raw).hexdigest())


class Dataset:
    """An ingested ratings dataset on disk (see the module docstring for the layout)."""

    def __init__(self, path: Path, manifest: dict, checksum: str) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.checksum = checksum
        self.n_buckets: int = int(manifest["n_buckets"])
        scale = manifest["rating_scale"]
        self.rating_min: float = float(scale["min"])
        self.rating_max: float = float(scale["max"])
        self.rating_step: float = float(scale["step"])

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, n_buckets={self.n_buckets})"

    def _check_bucket(self, bucket: int) -> int:
        if isinstance(bucket, bool) or not 0 <= int(bucket) < self.n_buckets:
            raise PipelineError(
                f"{self.path}: bucket {bucket} out of range 0..{self.n_buckets - 1}"
            )
        return int(bucket)

    def bucket_files(self, bucket: int) -> list[Path]:
        """The Parquet files of one bucket, sorted by name."""
        folder = bucket_dir(self.path, self._check_bucket(bucket))
        return sorted(folder.glob("*.parquet"))

    def user_ids(self) -> np.ndarray:
        """(n_users,) int32 ascending; a user's ``user_index`` is its position."""
        table = pq.read_table(self.path / "vocabulary" / "users.parquet", columns=["user_id"])
        return table.column("user_id").to_numpy().astype(np.int32, copy=False)

    def movie_ids(self) -> np.ndarray:
        """(n_movies,) int32 ascending; a movie's ``movie_index`` is its position."""
        table = pq.read_table(self.path / "vocabulary" / "movies.parquet", columns=["movie_id"])
        return table.column("movie_id").to_numpy().astype(np.int32, copy=False)

    def read_ratings(self, buckets: Sequence[int] | None = None) -> pa.Table:
        """Ratings of the given buckets (all by default), bucket by bucket.

        Columns ``user_id`` int32, ``movie_id`` int32, ``rating`` float32, ``timestamp``
        int64; within a bucket rows are sorted by (user_id, movie_id).
        """
        chosen = range(self.n_buckets) if buckets is None else buckets
        tables = [
            pq.read_table(file, schema=RATINGS_SCHEMA)
            for bucket in chosen
            for file in self.bucket_files(bucket)
        ]
        if not tables:
            return RATINGS_SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def read_movies(self) -> pa.Table | None:
        """movie_id int32, title string, year int16 (nullable), genres list<string>; or None
        when the source had no movie metadata."""
        file = self.path / "movies" / PART
        if not file.is_file():
            return None
        return pq.read_table(file, schema=MOVIES_SCHEMA)


def _clean_ratings(ratings: pa.Table, rating_scale: tuple[float, float, float]) -> pa.Table:
    missing = [name for name in RATINGS_SCHEMA.names if name not in ratings.column_names]
    if missing:
        raise PipelineError(f"ratings table lacks column(s) {', '.join(missing)}")
    try:
        table = ratings.select(RATINGS_SCHEMA.names).cast(RATINGS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise PipelineError(f"ratings table has unusable column types: {exc}") from None
    if table.num_rows == 0:
        return table
    if any(table.column(name).null_count for name in RATINGS_SCHEMA.names):
        raise PipelineError("ratings table has null values")
    low, high, _ = rating_scale
    if (
        pc.min(table.column("user_id")).as_py() <= 0
        or pc.min(table.column("movie_id")).as_py() <= 0
    ):
        raise PipelineError("ratings table has a non-positive user_id or movie_id")
    rating = table.column("rating").to_numpy()
    if not np.all((rating >= low) & (rating <= high)):
        raise PipelineError(f"ratings table has ratings outside {low}..{high}")
    return table


def write_dataset(
    ratings: pa.Table,
    out: Path,
    *,
    n_buckets: int,
    rating_scale: tuple[float, float, float],
    base_manifest: dict | None = None,
    movies: pa.Table | None = None,
    overwrite: bool = False,
) -> Dataset:
    """Write clean in-memory ratings (e.g. a train or test split) in the dataset layout.

    `ratings` has user_id, movie_id, rating, timestamp, one row per (user_id, movie_id);
    the vocabulary covers exactly these rows. Keys of `base_manifest` are kept except the
    ones recomputed here (counts, vocabulary sizes, partitioning, times, versions); the
    ingest line accounting (``counts``) is dropped because it describes the source files.
    Published atomically; an existing `out` is replaced only with `overwrite`.
    """
    if n_buckets < 1:
        raise PipelineError(f"n_buckets must be at least 1, got {n_buckets}")
    table = _clean_ratings(ratings, rating_scale)
    buckets = bucket_of(table.column("user_id").to_numpy(), n_buckets)
    order = np.argsort(buckets, kind="stable")
    bounds = np.searchsorted(buckets[order], np.arange(n_buckets + 1))
    rows_per_partition: dict[str, int] = {}
    with publishing(Path(out), overwrite=overwrite) as staging:
        for bucket in range(n_buckets):
            part = sort_ratings(table.take(order[bounds[bucket] : bounds[bucket + 1]]))
            key = part.column("user_id").to_numpy().astype(np.int64) << 32
            key |= part.column("movie_id").to_numpy().astype(np.int64)
            if part.num_rows and np.any(key[1:] == key[:-1]):
                raise PipelineError(
                    f"ratings table has duplicate (user_id, movie_id) pairs in bucket {bucket}"
                )
            rows_per_partition[str(bucket)] = write_bucket(staging, bucket, part)
        user_ids = np.unique(table.column("user_id").to_numpy())
        movie_ids = np.unique(table.column("movie_id").to_numpy())
        write_vocabulary(staging, user_ids, movie_ids)
        write_rejects(staging, None)
        if movies is not None:
            write_movies(staging, movies)
        manifest = {
            key: value for key, value in (base_manifest or {}).items() if key not in _COMPUTED_KEYS
        }
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "pipeline_version": __version__,
            "created": utc_now(),
            **manifest,
            "rating_scale": {
                "min": float(rating_scale[0]),
                "max": float(rating_scale[1]),
                "step": float(rating_scale[2]),
            },
            "n_buckets": n_buckets,
            "partitioning": partitioning(n_buckets),
            "ratings": table.num_rows,
            "users": len(user_ids),
            "movies": len(movie_ids),
            "rows_per_partition": rows_per_partition,
        }
        write_manifest(staging, manifest)
    logger.info("wrote %s ratings in %d buckets to %s", f"{table.num_rows:,}", n_buckets, out)
    return open_dataset(Path(out))
