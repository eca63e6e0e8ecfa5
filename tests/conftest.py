"""Shared fixtures: a seeded generator and one real LocalCluster for the session."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from distributed import Client, LocalCluster


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261203)


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Client]:
    """A two-process LocalCluster (one thread each), shared by the tests that need one."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
