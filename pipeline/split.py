"""Dividing a dataset into a training and a test dataset.

- random: a rating goes to test when a hash of (seed, user_id, movie_id) falls below
  `test_fraction`, so the split depends on neither row order nor partitioning, and a rating
  keeps its side when other ratings are added or removed.
- temporal: each user's last N ratings by timestamp (equal timestamps ordered by movie_id)
  go to test; a user with N or fewer ratings keeps one (the earliest) in training so that
  every test user is known to the model.
- predefined: separate train and test files, each ingested on its own.

Both computed splits are per-bucket Dask tasks: a user bucket holds all ratings of its users.
The two halves are written with `pipeline.dataset.write_dataset` as OUT/train and OUT/test.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.dataset import Dataset, open_dataset, write_dataset
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class Split:
    """The two halves of a split and a JSON-ready description (method, settings, counts)."""

    train: Dataset
    test: Dataset
    description: dict[str, Any] = field(default_factory=dict)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def rating_hash(seed: int, user_id: np.ndarray, movie_id: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per rating from (seed, user_id, movie_id); (n,) float64."""
    with np.errstate(over="ignore"):
        users = np.asarray(user_id).astype(np.int64).astype(np.uint64)
        movies = np.asarray(movie_id).astype(np.int64).astype(np.uint64)
        x = _mix64(np.uint64(seed) + users * _GOLDEN)
        x = _mix64(x ^ movies)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_test_mask(
    user_id: np.ndarray, movie_id: np.ndarray, *, test_fraction: float, seed: int
) -> np.ndarray:
    """(n,) bool: which ratings go to test in a random split."""
    return rating_hash(seed, user_id, movie_id) < test_fraction


def temporal_test_mask(
    user_id: np.ndarray, movie_id: np.ndarray, timestamp: np.ndarray, *, test_ratings_per_user: int
) -> np.ndarray:
    """(n,) bool: each user's last `test_ratings_per_user` ratings, at most all but one."""
    n = len(user_id)
    order = np.lexsort((movie_id, timestamp, user_id))
    users = np.asarray(user_id)[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.zeros(0, int)
    counts = np.diff(np.r_[starts, n])
    position = np.arange(n) - np.repeat(starts, counts)
    from_end = np.repeat(counts, counts) - position  # 1 for a user's last rating
    n_test = np.minimum(test_ratings_per_user, np.repeat(counts, counts) - 1)
    mask = np.zeros(n, dtype=bool)
    mask[order] = from_end <= n_test
    return mask


def _split_bucket(path: str, bucket: int, method: str, settings: dict) -> tuple[pa.Table, pa.Table]:
    """Read one bucket of the dataset at `path` and return its (train, test) tables."""
    table = open_dataset(Path(path)).read_ratings(buckets=[bucket])
    user_id = table.column("user_id").to_numpy()
    movie_id = table.column("movie_id").to_numpy()
    if method == "random":
        mask = random_test_mask(user_id, movie_id, **settings)
    else:
        timestamp = table.column("timestamp").to_numpy()
        mask = temporal_test_mask(user_id, movie_id, timestamp, **settings)
    return table.filter(pa.array(~mask)), table.filter(pa.array(mask))


def split_random(
    dataset: Dataset,
    out: Path,
    client: Client,
    *,
    test_fraction: float,
    seed: int = 0,
    overwrite: bool = False,
) -> Split:
    """Hash-based random hold-out of about `test_fraction` of the ratings."""
    if not 0 < test_fraction < 1:
        raise PipelineError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    settings = {"test_fraction": float(test_fraction), "seed": int(seed)}
    return _computed_split(dataset, out, client, "random", settings, overwrite)


def split_temporal(
    dataset: Dataset,
    out: Path,
    client: Client,
    *,
    test_ratings_per_user: int,
    overwrite: bool = False,
) -> Split:
    """Per-user temporal hold-out of each user's last `test_ratings_per_user` ratings."""
    if test_ratings_per_user < 1:
        raise PipelineError(
            f"test_ratings_per_user must be at least 1, got {test_ratings_per_user}"
        )
    settings = {"test_ratings_per_user": int(test_ratings_per_user)}
    return _computed_split(dataset, out, client, "temporal", settings, overwrite)


def split_predefined(
    train_source: Path,
    test_source: Path,
    out: Path,
    client: Client,
    *,
    n_buckets: int = 16,
    max_reject_fraction: float = 0.01,
    overwrite: bool = False,
) -> Split:
    """Ingest the given train and test files (e.g. ml-100k u1.base and u1.test) separately."""
    from pipeline.ingest import ingest

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"n_buckets": n_buckets, "max_reject_fraction": max_reject_fraction}
    train = ingest(Path(train_source), out / "train", client, overwrite=overwrite, **options)
    test = ingest(Path(test_source), out / "test", client, overwrite=overwrite, **options)
    settings = {"train": str(train_source), "test": str(test_source)}
    return _described(train, test, "predefined", settings, time.perf_counter() - start)


def _computed_split(
    dataset: Dataset, out: Path, client: Client, method: str, settings: dict, overwrite: bool
) -> Split:
    start = time.perf_counter()
    out = Path(out)
    futures = [
        client.submit(_split_bucket, str(dataset.path), b, method, settings, pure=False)
        for b in range(dataset.n_buckets)
    ]
    halves = client.gather(futures)
    scale = (dataset.rating_min, dataset.rating_max, dataset.rating_step)
    movies = dataset.read_movies()
    written = []
    for index, part in enumerate(("train", "test")):
        ratings = pa.concat_tables([h[index] for h in halves])
        base = dict(dataset.manifest)
        base["split"] = {"part": part, "method": method, **settings, "source": dataset.checksum}
        written.append(
            write_dataset(
                ratings,
                out / part,
                n_buckets=dataset.n_buckets,
                rating_scale=scale,
                base_manifest=base,
                movies=movies,
                overwrite=overwrite,
            )
        )
    seconds = time.perf_counter() - start
    return _described(written[0], written[1], method, settings, seconds, source=dataset)


def _described(
    train: Dataset,
    test: Dataset,
    method: str,
    settings: dict,
    seconds: float,
    source: Dataset | None = None,
) -> Split:
    n_train = _count(train)
    n_test = _count(test)
    logger.info(
        "%s split: %s train and %s test ratings in %.1f s",
        method,
        f"{n_train:,}",
        f"{n_test:,}",
        seconds,
    )
    description = {
        "method": method,
        **settings,
        "train_ratings": n_train,
        "test_ratings": n_test,
        "train_users": int(train.manifest["users"]),
        "test_users": int(test.manifest["users"]),
        "train_checksum": train.checksum,
        "test_checksum": test.checksum,
    }
    if source is not None:
        description["source_checksum"] = source.checksum
    return Split(train=train, test=test, description=description)


def _count(dataset: Dataset) -> int:
    return int(dataset.manifest["ratings"])
