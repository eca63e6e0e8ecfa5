"""Benchmark: ingest a synthetic ml-25m-layout ratings.csv on a 2-worker LocalCluster.

Prints lines per second and the peak resident memory of the client and of each worker,
against a baseline measured in the same run: pyarrow's CSV reader plus Parquet writer on the
same file in one process (no validation, no partitioning).

    python tests/bench/bench_ingest.py [--lines 25000000] [--ratings FILE] [--workdir DIR]

Without --ratings the file is written by ``pipeline.synth.generate`` (kept in --workdir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def write_ratings_csv(folder: Path, n_lines: int, seed: int = 7) -> Path:
    """An ml-25m-layout folder from the planted-model generator; returns its ratings.csv.

    Users and movies are scaled from ml-25m (162,541 users, 62,423 movies, 25M ratings).
    """
    from pipeline.synth import generate

    scale = n_lines / 25_000_095
    generate(
        folder,
        n_users=max(1, round(162_541 * scale)),
        n_movies=max(1, round(62_423 * min(1.0, 4 * scale))),
        n_ratings=n_lines,
        seed=seed,
        overwrite=True,
    )
    return folder / "ratings.csv"


def baseline(path: Path, out: Path) -> dict:
    """pyarrow CSV read + Parquet write in this process; seconds and peak RSS."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    started = time.perf_counter()
    table = pcsv.read_csv(path)
    pq.write_table(table, out)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": table.num_rows, "peak_rss": _peak_rss_self()}


def _peak_rss_self() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Peak RSS of a set of processes, sampled every `interval` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_pipeline(path: Path, out: Path, workers: int, block_size: int) -> dict:
    from pipeline.cluster import connect
    from pipeline.ingest import ingest

    with connect(None, workers) as client:
        client.wait_for_workers(workers)
        worker_pids = client.run(os.getpid)
        pids = {"client": os.getpid()}
        pids.update({f"worker {i}": pid for i, pid in enumerate(sorted(worker_pids.values()))})
        with RssSampler(pids) as sampler:
            started = time.perf_counter()
            dataset = ingest(path, out, client, overwrite=True, block_size=block_size)
            seconds = time.perf_counter() - started
    counts = dataset.manifest["counts"]["ratings_files"][0]
    return {"seconds": seconds, "lines": counts["lines_read"], "peak_rss": sampler.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=25_000_000)
    parser.add_argument("--ratings", type=Path, help="use this ratings.csv instead of writing one")
    parser.add_argument("--workdir", type=Path, help="where to write files (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block-size-mib", type=int, default=64)
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.baseline_only:
        print(json.dumps(baseline(args.ratings, workdir / "baseline.parquet")))
        return
    ratings = args.ratings
    if ratings is None:
        ratings = workdir / "synth" / "ratings.csv"
        if not ratings.exists():
            started = time.perf_counter()
            write_ratings_csv(ratings.parent, args.lines)
            print(
                f"wrote {ratings} ({ratings.stat().st_size / 2**20:,.0f} MiB) "
                f"in {time.perf_counter() - started:.1f} s"
            )
    size_mib = ratings.stat().st_size / 2**20

    # The baseline runs in its own process so that its peak RSS is its own.
    command = [
        sys.executable,
        __file__,
        "--baseline-only",
        "--ratings",
        str(ratings),
        "--workdir",
        str(workdir),
    ]
    base = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
    piped = run_pipeline(ratings, workdir / "dataset", args.workers, args.block_size_mib << 20)

    base_rate = base["rows"] / base["seconds"]
    rate = piped["lines"] / piped["seconds"]
    print(f"input: {ratings} {size_mib:,.0f} MiB, {piped['lines']:,} lines")
    print(
        f"baseline (pyarrow read_csv + write_table, 1 process): {base['seconds']:.2f} s, "
        f"{base_rate:,.0f} lines/s, peak RSS {base['peak_rss'] / 2**20:,.0f} MiB"
    )
    print(
        f"mfpipe ingest ({args.workers} workers, {args.block_size_mib} MiB blocks): "
        f"{piped['seconds']:.2f} s, {rate:,.0f} lines/s"
    )
    for name, peak in piped["peak_rss"].items():
        print(f"  peak RSS {name}: {peak / 2**20:,.0f} MiB")
    print(f"throughput ratio mfpipe / baseline: {rate / base_rate:.2f}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
