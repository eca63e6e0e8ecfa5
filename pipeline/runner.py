"""Running a job: stages, idempotent reruns, resume after a crash, atomic publication.

A run of job J with run id ID goes through the stages source (synthetic data only), ingest
(raw and synthetic sources), split, train, evaluate, recommend, then writes the report and
publishes ``OUTPUT/run_id=ID/``. Work in progress lives in ``OUTPUT/.work/run_id=ID/<stage>/``
(hidden from readers of ``OUTPUT``); each finished stage writes ``_stage.json`` last with the
checksums of its inputs, so a rerun skips every stage whose inputs have not changed and
redoes the rest. Training keeps its per-epoch checkpoints across attempts, so a killed run
resumes from its last finished epoch.

Publication assembles the run folder in ``OUTPUT/.work/run_id=ID/_publish/`` (model files
hard-linked from the work folder), writes ``_SUCCESS`` (the run manifest) last, renames the
folder to ``OUTPUT/run_id=ID`` and then points ``OUTPUT/latest`` at it; the work folder is
removed once the run is published. An already published run id is a no-op when its
``_SUCCESS`` records the same inputs, and an error otherwise unless ``overwrite`` is set.
Only one process works on a run id at a time (a lock file in ``OUTPUT/.work``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.cluster import connect
from pipeline.errors import PipelineError
from pipeline.jobs import Job

logger = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"
STAGE_FILE = "_stage.json"
LATEST_FILE = "latest"
WORK_FOLDER = ".work"
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSIONED = ("dask", "distributed", "numpy", "pandas", "pyarrow", "numba")


@dataclass
class RunOutcome:
    """What `run_job` did: the published folder, whether it was already there, its manifest."""

    run_id: str
    path: Path
    skipped: bool
    manifest: dict[str, Any] = field(default_factory=dict)


def default_run_id() -> str:
    """Today's UTC date, YYYY-MM-DD: one run per day for a nightly job."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def check_run_id(run_id: str) -> str:
    """Reject a run id that cannot be a folder name part (`run_id=ID`)."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise PipelineError(
            f"--run-id {run_id!r}: use 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return run_id


def run_folder(root: Path, run_id: str) -> Path:
    """Where run `run_id` is published under the output root."""
    return Path(root) / f"run_id={run_id}"


def run_job(
    job: Job,
    *,
    run_id: str | None = None,
    output: Path | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    client: Any = None,
) -> RunOutcome:
    """Run `job` as run `run_id` (default: today's UTC date) under `output` (default: the job's).

    Uses `client` if given, else connects to `scheduler` or starts `workers` local workers;
    with neither, the job's cluster table decides, then DASK_SCHEDULER_ADDRESS, else a local
    cluster. A run id already published with the same inputs returns at once, starting no
    cluster.
    """
    run_id = check_run_id(run_id or default_run_id())
    root = Path(output).resolve() if output is not None else job.output
    if root.exists() and not root.is_dir():
        raise PipelineError(f"output {root} exists and is not a folder")
    dest = run_folder(root, run_id)
    inputs = run_inputs(job)
    inputs_checksum = _digest(inputs)

    work = root / WORK_FOLDER / f"run_id={run_id}"
    outcome = _published(dest, run_id, inputs_checksum, overwrite)
    if outcome is not None and not work.exists():
        return outcome
    with _locked(root / WORK_FOLDER / f"run_id={run_id}.lock", run_id):
        outcome = _published(dest, run_id, inputs_checksum, overwrite)
        if outcome is not None:
            # left by a run killed between publishing and cleaning up
            shutil.rmtree(work, ignore_errors=True)
            return outcome
        if scheduler is None and workers is None:
            scheduler, workers = job.cluster.scheduler, job.cluster.workers
        # Connect before any stage runs, so an unreachable scheduler fails before any work.
        session = (
            contextlib.nullcontext(client) if client is not None else connect(scheduler, workers)
        )
        with session as dask_client:
            manifest = _Run(job, run_id, work, dask_client).execute(
                dest, inputs, inputs_checksum, overwrite
            )
        shutil.rmtree(work, ignore_errors=True)
    _point_latest(root, run_id)
    logger.info("published run %s to %s", run_id, dest)
    return RunOutcome(run_id=run_id, path=dest, skipped=False, manifest=manifest)


def run_inputs(job: Job) -> dict[str, Any]:
    """What decides the results of `job`: its settings and a fingerprint of its input files."""
    fingerprints = {}
    if job.source is not None and job.source.kind == "dataset":
        fingerprints["dataset"] = _dataset_checksum(job.source.path)
    elif job.source is not None and job.source.kind == "raw":
        fingerprints["raw"] = file_fingerprint(job.source.path)
    elif job.source is None:
        fingerprints["train"] = file_fingerprint(job.split.train_path)
        fingerprints["test"] = file_fingerprint(job.split.test_path)
    return {"job": job.describe(), "files": fingerprints}


def file_fingerprint(path: Path) -> str:
    """A cheap fingerprint of a file or folder: relative names, sizes and modification times."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    entries = []
    for f in files:
        stat = f.stat()
        entries.append(
            [str(f.relative_to(path)) if f != path else f.name, stat.st_size, stat.st_mtime_ns]
        )
    return _digest(entries)


def _dataset_checksum(path: Path) -> str:
    from pipeline.dataset import is_dataset, open_dataset

    if not is_dataset(path):
        raise PipelineError(f"{path} is not an ingested dataset (run `mfpipe ingest` first)")
    return open_dataset(path).checksum


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _files_digest(folder: Path) -> str:
    """sha256 over the names and bytes of every file under `folder`."""
    sha = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        sha.update(str(f.relative_to(folder)).encode() + b"\0")
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()


def _published(dest: Path, run_id: str, inputs_checksum: str, overwrite: bool) -> RunOutcome | None:
    """The outcome of a run already published with the same inputs, None to go ahead."""
    success = dest / SUCCESS_FILE
    if not success.exists():
        if dest.exists() and not overwrite:
            raise PipelineError(
                f"{dest} exists but has no {SUCCESS_FILE}; pass --overwrite to replace it"
            )
        return None
    try:
        manifest = json.loads(success.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{success}: unreadable run manifest: {exc}") from None
    if overwrite:
        return None
    if manifest.get("inputs_checksum") != inputs_checksum:
        raise PipelineError(
            f"{dest} was published from other inputs (job settings or input files changed); "
            "pass --overwrite to replace it or choose another --run-id"
        )
    logger.info(
        "run %s is already published with the same inputs at %s; nothing to do", run_id, dest
    )
    latest = dest.parent / LATEST_FILE
    if not latest.exists():
        _point_latest(dest.parent, run_id)
    return RunOutcome(run_id=run_id, path=dest, skipped=True, manifest=manifest)


@contextlib.contextmanager
def _locked(path: Path, run_id: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"another mfpipe run is working on run id {run_id} (lock {path})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _point_latest(root: Path, run_id: str) -> None:
    """Replace OUTPUT/latest with a file holding `run_id`, atomically."""
    tmp = root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, root / LATEST_FILE)


def _write_json(path: Path, value: Any) -> None:
    """Write JSON to a temporary sibling and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(
        json.dumps(value, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


def _move_into_place(staging: Path, dest: Path, work: Path) -> None:
    """Rename the complete `staging` folder to `dest`, retiring an old `dest` into `work`.

    Both the staging and the retired folder live under OUTPUT/.work, never beside `dest`:
    glob readers such as DuckDB match hidden folders too, so a sibling of the run folders
    would be read as a malformed run while it exists.
    """
    retired = None
    if dest.exists():
        retired = work / f"_retired-{uuid.uuid4().hex[:8]}"
        os.rename(dest, retired)
    os.rename(staging, dest)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _link_tree(src: Path, dest: Path) -> None:
    """Hard-link (or copy, across file systems) the files of `src` into a new `dest`."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link)


class _Run:
    def __init__(self, job: Job, run_id: str, work: Path, client: Any) -> None:
        self.job = job
        self.run_id = run_id
        self.work = work
        self.client = client
        self.timings: dict[str, dict[str, Any]] = {}

    def stage(
        self,
        name: str,
        inputs: dict[str, Any],
        compute: Callable[[Path], dict[str, Any]],
        keep: tuple[str, ...] = (),
    ) -> tuple[Path, dict[str, Any]]:
        """Run `compute(folder)` unless a finished attempt with the same inputs exists.

        `keep` names entries of the stage folder that survive a new attempt (checkpoints).
        Returns the stage folder and the outputs recorded by `compute`.
        """
        folder = self.work / name
        record_path = folder / STAGE_FILE
        if record_path.exists():
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if record.get("inputs") == inputs:
                logger.info("stage %s: up to date, skipped", name)
                self.timings[name] = {"seconds": record["seconds"], "skipped": True}
                return folder, record["outputs"]
        if folder.exists():
            for entry in folder.iterdir():
                if entry.name not in keep:
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("stage %s: started", name)
        start = time.perf_counter()
        outputs = compute(folder)
        seconds = round(time.perf_counter() - start, 3)
        _write_json(
            record_path, {"stage": name, "inputs": inputs, "outputs": outputs, "seconds": seconds}
        )
        logger.info("stage %s: done in %.1f s", name, seconds)
        self.timings[name] = {"seconds": seconds, "skipped": False}
        return folder, outputs

    def execute(
        self, dest: Path, inputs: dict[str, Any], inputs_checksum: str, overwrite: bool
    ) -> dict[str, Any]:
        from pipeline.dataset import open_dataset

        started = dt.datetime.now(dt.UTC)
        job = self.job
        self.work.mkdir(parents=True, exist_ok=True)
        checksums: dict[str, str] = {}

        if job.source is None:
            split = self.split_predefined(inputs["files"])
        else:
            if job.source.kind == "dataset":
                dataset = open_dataset(job.source.path)
            else:
                dataset = self.ingest(inputs["files"])
            checksums["dataset"] = dataset.checksum
            split = self.split(dataset)
        train_set = open_dataset(split / "train")
        test_set = open_dataset(split / "test")
        split_description = json.loads((split / "split.json").read_text(encoding="utf-8"))
        checksums["train"] = train_set.checksum
        checksums["test"] = test_set.checksum

        model, history, checksums["model"] = self.train(train_set)
        metrics = self.evaluate(model, test_set, checksums["model"])
        recommendations = None
        if "recommendations" in job.export.outputs:
            recommendations, checksums["recommendations"] = self.recommend(
                model, train_set, checksums["model"]
            )

        staging = self.work / "_publish"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        publish_start = time.perf_counter()
        if "model" in job.export.outputs:
            _link_tree(self.work / "train" / "model", staging / "model")
        if recommendations is not None:
            _link_tree(recommendations, staging / "recommendations")
        _write_json(staging / "split.json", split_description)
        shutil.copy2(job.path, staging / "job.toml")
        metrics_doc = self.metrics_document(metrics, history, split_description, model)
        _write_json(staging / "metrics.json", metrics_doc)
        self.report(staging, metrics, history, split_description, model)
        self.timings["publish"] = {
            "seconds": round(time.perf_counter() - publish_start, 3),
            "skipped": False,
        }
        manifest = {
            "run_id": self.run_id,
            "job": str(job.path),
            "inputs": inputs,
            "inputs_checksum": inputs_checksum,
            "checksums": checksums,
            "metrics": metrics,
            "split": split_description,
            "stages": self.timings,
            "versions": versions(),
            "host": platform.node(),
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        _write_json(staging / SUCCESS_FILE, manifest)
        _move_into_place(staging, dest, self.work)
        return manifest

    # -- stages ----------------------------------------------------------------------------

    def ingest(self, files: dict[str, str]) -> Any:
        from pipeline.dataset import open_dataset
        from pipeline.ingest import ingest

        job = self.job
        if job.source.kind == "synth":
            spec = job.source.synth

            def synthesize(folder: Path) -> dict[str, Any]:
                from pipeline.synth import generate

                summary = generate(
                    folder / "raw",
                    n_users=spec.n_users,
                    n_movies=spec.n_movies,
                    n_ratings=spec.n_ratings,
                    seed=spec.seed,
                    rank=spec.rank,
                    noise=spec.noise,
                    overwrite=True,
                )
                return {"summary": summary, "fingerprint": file_fingerprint(folder / "raw")}

            source_folder, source_outputs = self.stage("source", asdict(spec), synthesize)
            raw = source_folder / "raw"
            raw_checksum = _digest(source_outputs["summary"] | {"spec": asdict(spec)})
        else:
            raw = job.source.path
            raw_checksum = files["raw"]

        def run_ingest(folder: Path) -> dict[str, Any]:
            dataset = ingest(
                raw,
                folder / "dataset",
                self.client,
                overwrite=True,
                max_reject_fraction=job.ingest.max_reject_fraction,
                n_buckets=job.ingest.n_buckets,
            )
            return {"dataset": dataset.checksum}

        folder, _ = self.stage("ingest", {"raw": raw_checksum, **asdict(job.ingest)}, run_ingest)
        return open_dataset(folder / "dataset")

    def split(self, dataset: Any) -> Path:
        from pipeline.split import split_random, split_temporal

        spec = self.job.split

        def run_split(folder: Path) -> dict[str, Any]:
            if spec.method == "random":
                result = split_random(
                    dataset,
                    folder,
                    self.client,
                    test_fraction=spec.test_fraction,
                    seed=spec.seed,
                    overwrite=True,
                )
            else:
                result = split_temporal(
                    dataset,
                    folder,
                    self.client,
                    test_ratings_per_user=spec.test_ratings_per_user,
                    overwrite=True,
                )
            _write_json(folder / "split.json", result.description)
            return {"train": result.train.checksum, "test": result.test.checksum}

        inputs = {"dataset": dataset.checksum, **spec.describe()}
        folder, _ = self.stage("split", inputs, run_split)
        return folder

    def split_predefined(self, files: dict[str, str]) -> Path:
        from pipeline.split import split_predefined

        spec = self.job.split

        def run_split(folder: Path) -> dict[str, Any]:
            result = split_predefined(
                spec.train_path,
                spec.test_path,
                folder,
                self.client,
                n_buckets=self.job.ingest.n_buckets,
                max_reject_fraction=self.job.ingest.max_reject_fraction,
                overwrite=True,
            )
            _write_json(folder / "split.json", result.description)
            return {"train": result.train.checksum, "test": result.test.checksum}

        inputs = {"files": files, **spec.describe(), **asdict(self.job.ingest)}
        folder, _ = self.stage("split", inputs, run_split)
        return folder

    def train(self, train_set: Any) -> tuple[Any, list[dict[str, Any]], str]:
        from pipeline.model import Model
        from pipeline.trainer import train

        config = self.job.train

        def run_train(folder: Path) -> dict[str, Any]:
            result = train(
                train_set,
                config,
                self.client,
                checkpoint_dir=folder / "checkpoints",
                metrics_path=folder / "metrics.jsonl",
            )
            result.model.save(folder / "model", overwrite=True)
            _write_json(folder / "history.json", result.history)
            return {"model": _files_digest(folder / "model"), "epochs": len(result.history)}

        inputs = {"train": train_set.checksum, "config": _digest(asdict(config))}
        folder, outputs = self.stage("train", inputs, run_train, keep=("checkpoints",))
        model = Model.load(folder / "model")
        history = json.loads((folder / "history.json").read_text(encoding="utf-8"))
        return model, history, outputs["model"]

    def evaluate(self, model: Any, test_set: Any, model_checksum: str) -> dict[str, Any]:
        from pipeline.evaluate import evaluate

        def run_evaluate(folder: Path) -> dict[str, Any]:
            return {"metrics": evaluate(model, test_set, self.client)}

        inputs = {"model": model_checksum, "test": test_set.checksum}
        _, outputs = self.stage("evaluate", inputs, run_evaluate)
        return outputs["metrics"]

    def recommend(self, model: Any, train_set: Any, model_checksum: str) -> tuple[Path, str]:
        from pipeline.recommend import recommend

        top_k = self.job.export.top_k

        def run_recommend(folder: Path) -> dict[str, Any]:
            stats = recommend(
                model,
                self.client,
                folder / "recommendations",
                top_k=top_k,
                exclude=train_set,
            )
            return {"stats": stats, "checksum": _files_digest(folder / "recommendations")}

        inputs = {"model": model_checksum, "exclude": train_set.checksum, "top_k": top_k}
        folder, outputs = self.stage("recommend", inputs, run_recommend)
        return folder / "recommendations", outputs["checksum"]

    # -- summaries -------------------------------------------------------------------------

    def metrics_document(
        self, metrics: dict, history: list[dict], split: dict, model: Any
    ) -> dict[str, Any]:
        last = history[-1] if history else {}
        meta = model.metadata
        return {
            "run_id": self.run_id,
            "test": metrics,
            "train": {
                "epochs": len(history),
                "best_epoch": meta.get("best_epoch"),
                "refit_epochs": meta.get("refit_epochs"),
                "train_rmse": last.get("train_rmse"),
                "best_validation_rmse": meta.get("metrics", {}).get("best_validation_rmse"),
            },
            "history": history,
            "counts": self.counts(split, model),
        }

    def counts(self, split: dict, model: Any) -> dict[str, Any]:
        return {
            "users": len(model.user_ids),
            "movies": len(model.movie_ids),
            "rank": int(model.rank),
            "train_ratings": split.get("train_ratings"),
            "test_ratings": split.get("test_ratings"),
        }

    def report(self, folder: Path, metrics: dict, history: list, split: dict, model: Any) -> None:
        from pipeline.report import write_report

        settings = {
            "job": self.job.name,
            "run id": self.run_id,
            "split": ", ".join(f"{k}={v}" for k, v in self.job.split.describe().items()),
            "rank": int(model.rank),
            "top_k": self.job.export.top_k,
        }
        write_report(
            folder,
            title=f"{self.job.name}: run {self.run_id}",
            history=history,
            metrics=metrics,
            counts=self.counts(split, model),
            timings={name: t["seconds"] for name, t in self.timings.items()},
            settings=settings,
        )


def versions() -> dict[str, str]:
    """Versions of mfpipe, Python and the libraries that shape the results."""
    found = {"mfpipe": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found
