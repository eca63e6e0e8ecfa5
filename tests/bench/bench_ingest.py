"""Benchmark: ingest a synthetic ml-25m-layout ratings.csv on a 2-worker LocalCluster.

Prints lines per second, CPU seconds and the peak resident memory of the client and of each
worker, against a baseline measured in the same run: pyarrow's CSV reader plus Parquet
writer on the same file in one process (no validation, no partitioning). Baseline and ingest
alternate `--repeat` times and medians are reported, since a shared machine is noisy. The
cluster starts once before timing (its start-up is not counted).

    python tests/bench/bench_ingest.py [--lines 25000000] [--ratings FILE] [--workdir DIR]

Without --ratings the file is written by ``pipeline.synth.generate`` (kept in --workdir).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
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
    """pyarrow CSV read + Parquet write in this process; seconds, CPU seconds, peak RSS."""
    import resource

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    began_cpu = _cpu_self()
    started = time.perf_counter()
    table = pcsv.read_csv(path)
    pq.write_table(table, out)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu": _cpu_self() - began_cpu,
        "rows": table.num_rows,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _cpu_self() -> float:
    times = os.times()
    return times.user + times.system


class RssSampler:
    """Peak RSS of a set of processes, sampled every `interval` seconds in a thread, and
    their CPU seconds over the block."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.cpu = 0.0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, proc in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)
            self._stop.wait(self.interval)

    def _cpu(self) -> float:
        total = 0.0
        for proc in self.procs.values():
            times = proc.cpu_times()
            total += times.user + times.system
        return total

    def __enter__(self) -> RssSampler:
        self._began = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu = self._cpu() - self._began


def run_pipeline(client, path: Path, out: Path, block_size: int) -> dict:
    from pipeline.ingest import ingest

    worker_pids = client.run(os.getpid)
    pids = {"client": os.getpid()}
    pids.update({f"worker {i}": pid for i, pid in enumerate(sorted(worker_pids.values()))})
    with RssSampler(pids) as sampler:
        started = time.perf_counter()
        dataset = ingest(path, out, client, overwrite=True, block_size=block_size)
        seconds = time.perf_counter() - started
    counts = dataset.manifest["counts"]["ratings_files"][0]
    return {
        "seconds": seconds,
        "cpu": sampler.cpu,
        "lines": counts["lines_read"],
        "peak_rss": sampler.peak,
    }


def _times(results: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in results)


def main() -> None:
    from pipeline.cluster import connect

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=25_000_000)
    parser.add_argument("--ratings", type=Path, help="use this ratings.csv instead of writing one")
    parser.add_argument("--workdir", type=Path, help="where to write files (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block-size-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved")
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
    bases, runs = [], []
    with connect(None, args.workers) as client:
        client.wait_for_workers(args.workers)
        # A warm-up on a small slice loads the compiled scanner in every worker.
        warm = workdir / "warm.csv"
        with open(ratings, "rb") as src:
            warm.write_bytes(src.read(1 << 20).rpartition(b"\n")[0] + b"\n")
        run_pipeline(client, warm, workdir / "warm-dataset", args.block_size_mib << 20)
        for _ in range(args.repeat):
            output = subprocess.run(command, check=True, capture_output=True).stdout
            bases.append(json.loads(output))
            runs.append(
                run_pipeline(client, ratings, workdir / "dataset", args.block_size_mib << 20)
            )

    lines = runs[0]["lines"]
    base_s = statistics.median(b["seconds"] for b in bases)
    run_s = statistics.median(r["seconds"] for r in runs)
    base_cpu = statistics.median(b["cpu"] for b in bases)
    run_cpu = statistics.median(r["cpu"] for r in runs)
    print(f"input: {ratings} {size_mib:,.0f} MiB, {lines:,} lines; median of {args.repeat} runs")
    print(
        f"baseline (pyarrow read_csv + write_table, 1 process): {base_s:.2f} s "
        f"(runs {_times(bases)}), "
        f"{lines / base_s:,.0f} lines/s, {base_cpu:.1f} CPU s, "
        f"peak RSS {max(b['peak_rss'] for b in bases) / 2**20:,.0f} MiB"
    )
    print(
        f"mfpipe ingest ({args.workers} workers, {args.block_size_mib} MiB blocks): {run_s:.2f} s "
        f"(runs {_times(runs)}), "
        f"{lines / run_s:,.0f} lines/s, {run_cpu:.1f} CPU s"
    )
    for name in runs[0]["peak_rss"]:
        peak = max(r["peak_rss"][name] for r in runs)
        print(f"  peak RSS {name}: {peak / 2**20:,.0f} MiB")
    print(f"throughput ratio mfpipe / baseline (median times): {base_s / run_s:.2f}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
