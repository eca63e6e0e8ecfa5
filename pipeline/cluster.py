"""Connecting to a Dask cluster: an address, DASK_SCHEDULER_ADDRESS, or a LocalCluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = "5s"


def scheduler_address(scheduler: str | None) -> str | None:
    """The address to connect to: the argument, else DASK_SCHEDULER_ADDRESS, else None."""
    return scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


@contextmanager
def connect(
    scheduler: str | None = None, workers: int | None = None, *, memory_limit: str = "auto"
) -> Iterator[Client]:
    """Yield a Client on the given scheduler, or on a LocalCluster started for the block.

    With no address (argument or DASK_SCHEDULER_ADDRESS), start `workers` single-threaded
    worker processes (default: the CPU count) and close them on exit. TLS settings come from
    Dask's configuration (``distributed.comm.tls.*`` or the matching DASK_ environment
    variables) when the address starts with ``tls://``.
    """
    address = scheduler_address(scheduler)
    if address is not None:
        client = _connect_remote(address)
        try:
            yield client
        finally:
            client.close()
        return

    n_workers = workers or os.cpu_count() or 1
    if n_workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {n_workers}")
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=":0",
        )
    client = Client(cluster)
    logger.info(
        "started a LocalCluster of %d workers; dashboard %s", n_workers, client.dashboard_link
    )
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _connect_remote(address: str) -> Client:
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        raise PipelineError(f"cannot connect to the Dask scheduler at {address}: {exc}") from None
    n_workers = len(client.scheduler_info().get("workers", {}))
    logger.info(
        "connected to %s (%d workers); dashboard %s", address, n_workers, client.dashboard_link
    )
    return client
