"""Per-index partial results of a step, and their merge across shards as a tree of tasks.

A shard reports, for each movie its part of the batch touched, the gradient sums and the
occurrence counts. Merging adds sums and counts index by index, so the merged result is the
same whichever way the ratings were split (up to float rounding). The tree is built in shard
order, so for a given sharding the result is bitwise reproducible wherever the shards run.
Users need no merge: a shard holds all the ratings of its users, so their sums are complete
where they are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from distributed import Client, Future


@dataclass(frozen=True)
class RowSums:
    """Gradient sums and counts for the rows one side (users or movies) touched."""

    index: np.ndarray
    """(t,) int32, ascending row numbers (`user_index` or `movie_index`)"""
    sums: np.ndarray
    """(t, rank) float32 embedding-gradient sums"""
    bias_sums: np.ndarray
    """(t,) float32 bias-gradient sums"""
    counts: np.ndarray
    """(t,) int32 occurrences in the batch"""

    @classmethod
    def from_dense(cls, sums: np.ndarray, bias_sums: np.ndarray, counts: np.ndarray) -> RowSums:
        """Keep the rows with a non-zero count of dense (n, rank), (n,), (n,) arrays."""
        index = np.flatnonzero(counts).astype(np.int32)
        if len(index) == len(counts):
            return cls(index, sums, bias_sums, counts.astype(np.int32, copy=False))
        return cls(index, sums[index], bias_sums[index], counts[index].astype(np.int32))

    def merge(self, other: RowSums) -> RowSums:
        """Add two partial results index by index."""
        if np.array_equal(self.index, other.index):
            return RowSums(
                self.index,
                self.sums + other.sums,
                self.bias_sums + other.bias_sums,
                self.counts + other.counts,
            )
        index = np.union1d(self.index, other.index).astype(np.int32)
        rank = self.sums.shape[1]
        sums = np.zeros((len(index), rank), np.float32)
        bias_sums = np.zeros(len(index), np.float32)
        counts = np.zeros(len(index), np.int32)
        for part in (self, other):
            at = np.searchsorted(index, part.index)
            sums[at] += part.sums
            bias_sums[at] += part.bias_sums
            counts[at] += part.counts
        return RowSums(index, sums, bias_sums, counts)


@dataclass(frozen=True)
class Partial:
    """Everything one shard reports for one step."""

    movies: RowSums
    squared_error: float
    """sum of squared training errors of the batch (before the update)"""
    ratings: int
    """training ratings in the batch"""
    validation_squared_error: float
    validation_ratings: int

    def merge(self, other: Partial) -> Partial:
        return Partial(
            self.movies.merge(other.movies),
            self.squared_error + other.squared_error,
            self.ratings + other.ratings,
            self.validation_squared_error + other.validation_squared_error,
            self.validation_ratings + other.validation_ratings,
        )


def merge_partials(*partials: Partial) -> Partial:
    """Merge in the given order (a task of the reduction tree)."""
    merged = partials[0]
    for partial in partials[1:]:
        merged = merged.merge(partial)
    return merged


def tree_reduce(
    client: Client, futures: Sequence[Future], fan_in: int = 4, key_prefix: str = "merge"
) -> Future:
    """Merge the futures of per-shard Partials with a tree of tasks of `fan_in` inputs each."""
    level = list(futures)
    depth = 0
    while len(level) > 1:
        level = [
            client.submit(
                merge_partials,
                *level[i : i + fan_in],
                key=f"{key_prefix}-{depth}-{i // fan_in}",
            )
            for i in range(0, len(level), fan_in)
        ]
        depth += 1
    return level[0]
