"""Submitting `mfpipe run` to a separately started scheduler and workers, over TCP and TLS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest
import trustme
from distributed import Client
from distributed.security import Security

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "jobs" / "quickstart.toml"
DASK = str(Path(sys.executable).with_name("dask"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)


def stop(process: subprocess.Popen) -> None:
    """Terminate a process group started by `start`, killing it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def start_cluster(
    tmp: Path, protocol: str, tls: list[str], security: Security | None
) -> Iterator[Cluster]:
    port = free_port()
    address = f"{protocol}://127.0.0.1:{port}"
    cluster = Cluster(address)
    common = ["--no-dashboard", *tls]
    log = (tmp / "cluster.log").open("w")

    def start(*args: str) -> None:
        cluster.processes.append(
            subprocess.Popen(
                [DASK, *args], cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    try:
        start(
            "scheduler", "--host", "127.0.0.1", "--port", str(port), "--protocol", protocol, *common
        )
        for n in range(2):
            start(
                "worker",
                address,
                "--nthreads",
                "1",
                "--name",
                f"w{n}",
                "--local-directory",
                str(tmp / f"w{n}"),
                *common,
            )
        with Client(address, timeout="30s", security=security) as client:
            client.wait_for_workers(2, timeout=60)
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            stop(process)
        log.close()


@pytest.fixture
def tcp_cluster(tmp_path) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path, "tcp", [], None)


@pytest.fixture
def tls_cluster(tmp_path) -> Iterator[Cluster]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(ca_file)
    for pem in cert.cert_chain_pems:
        pem.write_to_path(cert_file, append=True)
    cert.private_key_pem.write_to_path(key_file)
    tls = ["--tls-ca-file", str(ca_file), "--tls-cert", str(cert_file), "--tls-key", str(key_file)]
    security = Security(
        tls_ca_file=str(ca_file),
        tls_client_cert=str(cert_file),
        tls_client_key=str(key_file),
        require_encryption=True,
    )
    for cluster in start_cluster(tmp_path, "tls", tls, security):
        cluster.env = {
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(ca_file),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(cert_file),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(key_file),
        }
        yield cluster


def mfpipe(*args: str, env: dict[str, str] | None = None, timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def check_published(output: Path, run_id: str) -> None:
    manifest = json.loads((output / f"run_id={run_id}" / "_SUCCESS").read_text())
    assert manifest["run_id"] == run_id
    assert manifest["metrics"]["rmse"] < 0.8  # planted noise 0.5; biases alone give about 0.8
    rows = duckdb.execute(
        "select run_id, count(*), count(distinct user_id) "
        "from read_parquet(?, hive_partitioning=true, hive_types_autocast=false) group by run_id",
        [str(output / "*" / "recommendations" / "*.parquet")],
    ).fetchall()
    assert rows == [(run_id, 20_000, 2_000)]


def test_run_on_a_tcp_scheduler(tcp_cluster, tmp_path):
    output = tmp_path / "runs"
    result = mfpipe(
        "run",
        str(QUICKSTART),
        "--scheduler",
        tcp_cluster.address,
        "--run-id",
        "tcp",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    assert f"connected to {tcp_cluster.address} (2 workers)" in result.stderr
    assert result.stdout.strip() == str(output / "run_id=tcp")
    check_published(output, "tcp")


def test_run_on_a_tls_scheduler_from_the_environment(tls_cluster, tmp_path):
    output = tmp_path / "runs"
    env = {**tls_cluster.env, "DASK_SCHEDULER_ADDRESS": tls_cluster.address}
    result = mfpipe("run", str(QUICKSTART), "--run-id", "tls", "--output", str(output), env=env)
    assert result.returncode == 0, result.stderr
    assert f"connected to {tls_cluster.address} (2 workers)" in result.stderr
    check_published(output, "tls")


def test_unreachable_scheduler_is_one_line_and_exit_2(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = mfpipe(
        "run",
        str(QUICKSTART),
        "--scheduler",
        address,
        "--output",
        str(tmp_path / "runs"),
        timeout=60,
    )
    assert time.monotonic() - start < 30
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"mfpipe run: error: cannot connect to the Dask scheduler at {address}"
    )
    assert not (tmp_path / "runs" / "run_id=").exists()
    assert not list((tmp_path / "runs").glob("run_id=*"))
