"""Job files: what one `mfpipe run` does, read from TOML and checked before any work starts.

A job file has these tables (paths are relative to the job file's folder)::

    name = "quickstart"                    # optional; default: the file name without .toml

    [source]                               # exactly one of dataset / raw / [source.synth]
    dataset = "data/ml-25m"                # an ingested dataset (`mfpipe ingest`)
    raw = "downloads/ml-25m.zip"           # a MovieLens archive, folder or ratings file
    [source.synth]                         # generate planted synthetic ratings
    users = 2000
    movies = 1000
    ratings = 100000
    seed = 0                               # also: rank, noise

    [ingest]                               # used for raw and synthetic sources
    n_buckets = 16
    max_reject_fraction = 0.01

    [split]
    method = "random"                      # random | temporal | predefined
    test_fraction = 0.1                    # random
    seed = 0                               # random
    test_ratings_per_user = 5              # temporal
    train = "ml-100k/u1.base"              # predefined (no [source] then)
    test = "ml-100k/u1.test"               # predefined

    [train]                                # pipeline.config.TrainConfig fields

    [cluster]                              # at most one of workers / scheduler
    workers = 2
    scheduler = "tcp://scheduler:8786"

    [export]
    top_k = 10
    outputs = ["model", "recommendations"]

    [output]
    root = "out/quickstart"                # runs go to ROOT/run_id=ID/
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.dataset import is_dataset
from pipeline.errors import PipelineError
from pipeline.synth import check_arguments as check_synth

SOURCE_KINDS = ("dataset", "raw", "synth")
SPLIT_METHODS = ("random", "temporal", "predefined")
EXPORT_OUTPUTS = ("model", "recommendations")

_NON_NEGATIVE = "a number >= 0"
_FRACTION_OPEN = "a number between 0 and 1 (exclusive)"
_FRACTION_CLOSED = "a number between 0 and 1"

_TOP_LEVEL = ("name", "source", "ingest", "split", "train", "cluster", "export", "output")
_SYNTH_KEYS = ("users", "movies", "ratings", "seed", "rank", "noise")
_SPLIT_KEYS = {
    "random": ("method", "test_fraction", "seed"),
    "temporal": ("method", "test_ratings_per_user"),
    "predefined": ("method", "train", "test"),
}


@dataclass(frozen=True)
class SynthSpec:
    """Sizes and seed of a generated synthetic ratings set (see `pipeline.synth.generate`)."""

    n_users: int
    n_movies: int
    n_ratings: int
    seed: int = 0
    rank: int = 8
    noise: float = 0.5


@dataclass(frozen=True)
class SourceSpec:
    """Where the ratings come from: `kind` is "dataset", "raw" or "synth"."""

    kind: str
    path: Path | None = None
    synth: SynthSpec | None = None


@dataclass(frozen=True)
class IngestSpec:
    """Options of `pipeline.ingest.ingest` for raw and synthetic sources."""

    n_buckets: int = 16
    max_reject_fraction: float = 0.01


@dataclass(frozen=True)
class SplitSpec:
    """How ratings are divided into training and test sets (see `pipeline.split`)."""

    method: str = "random"
    test_fraction: float = 0.1
    seed: int = 0
    test_ratings_per_user: int = 1
    train_path: Path | None = None
    test_path: Path | None = None

    def describe(self) -> dict[str, Any]:
        """The settings that matter for `method`, JSON-ready."""
        if self.method == "random":
            return {"method": "random", "test_fraction": self.test_fraction, "seed": self.seed}
        if self.method == "temporal":
            return {"method": "temporal", "test_ratings_per_user": self.test_ratings_per_user}
        return {"method": "predefined", "train": str(self.train_path), "test": str(self.test_path)}


@dataclass(frozen=True)
class ClusterSpec:
    """A local cluster of `workers` processes, or the scheduler at `scheduler`."""

    workers: int | None = None
    scheduler: str | None = None


@dataclass(frozen=True)
class ExportSpec:
    """What a run publishes besides metrics and the report."""

    top_k: int = 10
    outputs: tuple[str, ...] = EXPORT_OUTPUTS


@dataclass(frozen=True)
class Job:
    """A checked job file. Paths are absolute."""

    path: Path
    name: str
    source: SourceSpec | None
    ingest: IngestSpec
    split: SplitSpec
    train: TrainConfig
    cluster: ClusterSpec
    export: ExportSpec
    output: Path

    def describe(self) -> dict[str, Any]:
        """Everything that decides the results of a run, JSON-ready.

        The output folder and the cluster are left out: they change where and how a run is
        computed, not what it computes.
        """
        source = None
        if self.source is not None:
            source = {"kind": self.source.kind}
            if self.source.path is not None:
                source["path"] = str(self.source.path)
            if self.source.synth is not None:
                source.update(asdict(self.source.synth))
        return {
            "name": self.name,
            "source": source,
            # an ingested dataset is used as it is: the ingest settings do not apply
            "ingest": None if source and source["kind"] == "dataset" else asdict(self.ingest),
            "split": self.split.describe(),
            "train": _jsonable(asdict(self.train)),
            "export": {"top_k": self.export.top_k, "outputs": list(self.export.outputs)},
        }


def load_job(path: Path | str, *, check_paths: bool = True) -> Job:
    """Read and check the job file at `path`.

    Raises PipelineError with one line naming the file and the key (or the line, for TOML
    syntax errors) for an unreadable file, unknown key, wrong type, bad value or, with
    `check_paths`, a missing input path.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read the job file: {exc}") from None
    return parse_job(text, path, check_paths=check_paths)


def parse_job(text: str, path: Path | str, *, check_paths: bool = True) -> Job:
    """Check the TOML `text` of the job file at `path` (used for messages and relative paths)."""
    path = Path(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(_toml_error(path, exc)) from None
    return _Parser(path, check_paths).job(doc)


def _toml_error(path: Path, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message)
    if match:
        what, line, column = match.groups()
        return f"{path}: line {line}: invalid TOML: {what} (column {column})"
    match = re.fullmatch(r"(.*) \(at end of document\)", message)
    if match:
        return f"{path}: end of file: invalid TOML: {match.group(1)}"
    return f"{path}: invalid TOML: {message}"


def _show(value: Any) -> str:
    """A value as it would look in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class _Parser:
    def __init__(self, path: Path, check_paths: bool) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.check_paths = check_paths

    def fail(self, key: str, problem: str) -> PipelineError:
        return PipelineError(f"{self.path}: {key}: {problem}")

    def expect(self, key: str, wanted: str, value: Any) -> PipelineError:
        return self.fail(key, f"expected {wanted}, got {_show(value)}")

    # -- typed getters -------------------------------------------------------------------

    def table(self, doc: dict, key: str, where: str, allowed: tuple[str, ...]) -> dict:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise self.expect(where, "a table", value)
        for name in value:
            if name not in allowed:
                raise self.fail(
                    f"{where}.{name}", f"unknown key (expected one of {', '.join(allowed)})"
                )
        return value

    def integer(self, table: dict, key: str, where: str, default: int | None, minimum: int) -> Any:
        if key not in table:
            return default
        value = table[key]
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.expect(f"{where}.{key}", wanted, value)
        return value

    def number(
        self, table: dict, key: str, where: str, default: float, wanted: str, ok: Any
    ) -> float:
        """A float; `ok(value)` says whether it is in range, `wanted` describes the range."""
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise self.expect(f"{where}.{key}", wanted, value)
        return float(value)

    def string(self, table: dict, key: str, where: str) -> str | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.expect(f"{where}.{key}", "a non-empty string", value)
        return value

    def input_path(self, table: dict, key: str, where: str) -> Path:
        text = self.string(table, key, where)
        if text is None:
            raise self.fail(f"{where}.{key}", "missing")
        path = (self.base / Path(text).expanduser()).resolve()
        if self.check_paths and not path.exists():
            raise self.fail(f"{where}.{key}", f"{path} does not exist")
        return path

    # -- tables --------------------------------------------------------------------------

    def job(self, doc: dict) -> Job:
        for name in doc:
            if name not in _TOP_LEVEL:
                raise self.fail(name, f"unknown key (expected one of {', '.join(_TOP_LEVEL)})")
        name = self.string(doc, "name", "") if "name" in doc else None
        method = doc.get("split", {}).get("method") if isinstance(doc.get("split"), dict) else None
        if method == "predefined" and "source" in doc:
            raise self.fail(
                "source",
                'not used with split.method = "predefined" (split.train and split.test are '
                "the source)",
            )
        split = self.split(doc)
        source = self.source(doc, split)
        return Job(
            path=self.path.resolve(),
            name=name or self.path.stem,
            source=source,
            ingest=self.ingest(doc),
            split=split,
            train=self.train(doc),
            cluster=self.cluster(doc),
            export=self.export(doc),
            output=self.output(doc),
        )

    def source(self, doc: dict, split: SplitSpec) -> SourceSpec | None:
        if split.method == "predefined":
            return None
        if "source" not in doc:
            raise self.fail(
                "source", "missing (give one of source.dataset, source.raw, [source.synth])"
            )
        table = self.table(doc, "source", "source", SOURCE_KINDS)
        given = [kind for kind in SOURCE_KINDS if kind in table]
        if len(given) != 1:
            raise self.fail(
                "source",
                "give exactly one of source.dataset, source.raw, [source.synth]"
                + (f", got {' and '.join('source.' + k for k in given)}" if given else ""),
            )
        kind = given[0]
        if kind == "synth":
            synth = self.table(table, "synth", "source.synth", _SYNTH_KEYS)
            where = "source.synth"
            for key in ("users", "movies", "ratings"):
                if key not in synth:
                    raise self.fail(f"{where}.{key}", "missing")
            spec = SynthSpec(
                n_users=self.integer(synth, "users", where, None, 1),
                n_movies=self.integer(synth, "movies", where, None, 1),
                n_ratings=self.integer(synth, "ratings", where, None, 1),
                seed=self.integer(synth, "seed", where, 0, 0),
                rank=self.integer(synth, "rank", where, 8, 1),
                noise=self.number(synth, "noise", where, 0.5, _NON_NEGATIVE, lambda v: v >= 0),
            )
            try:
                check_synth(spec.n_users, spec.n_movies, spec.n_ratings, spec.rank, spec.noise)
            except PipelineError as exc:
                # the generator names command-line options; here they are keys of the table
                raise self.fail(where, str(exc).replace("--", "")) from None
            return SourceSpec(kind="synth", synth=spec)
        path = self.input_path(table, kind, "source")
        if kind == "dataset" and self.check_paths and not is_dataset(path):
            raise self.fail(
                "source.dataset", f"{path} is not an ingested dataset (no manifest.json)"
            )
        return SourceSpec(kind=kind, path=path)

    def ingest(self, doc: dict) -> IngestSpec:
        table = self.table(doc, "ingest", "ingest", ("n_buckets", "max_reject_fraction"))
        return IngestSpec(
            n_buckets=self.integer(table, "n_buckets", "ingest", 16, 1),
            max_reject_fraction=self.number(
                table,
                "max_reject_fraction",
                "ingest",
                0.01,
                _FRACTION_CLOSED,
                lambda v: 0 <= v <= 1,
            ),
        )

    def split(self, doc: dict) -> SplitSpec:
        table = doc.get("split", {})
        if not isinstance(table, dict):
            raise self.expect("split", "a table", table)
        method = table.get("method", "random")
        if method not in SPLIT_METHODS:
            raise self.expect("split.method", " or ".join(f'"{m}"' for m in SPLIT_METHODS), method)
        self.table(doc, "split", "split", _SPLIT_KEYS[method])
        if method == "random":
            return SplitSpec(
                method=method,
                test_fraction=self.number(
                    table, "test_fraction", "split", 0.1, _FRACTION_OPEN, lambda v: 0 < v < 1
                ),
                seed=self.integer(table, "seed", "split", 0, 0),
            )
        if method == "temporal":
            return SplitSpec(
                method=method,
                test_ratings_per_user=self.integer(table, "test_ratings_per_user", "split", 1, 1),
            )
        return SplitSpec(
            method=method,
            train_path=self.input_path(table, "train", "split"),
            test_path=self.input_path(table, "test", "split"),
        )

    def train(self, doc: dict) -> TrainConfig:
        table = doc.get("train", {})
        if not isinstance(table, dict):
            raise self.expect("train", "a table", table)
        return TrainConfig.from_mapping(dict(table), f"{self.path}: train")

    def cluster(self, doc: dict) -> ClusterSpec:
        table = self.table(doc, "cluster", "cluster", ("workers", "scheduler"))
        if "workers" in table and "scheduler" in table:
            raise self.fail("cluster", "give cluster.workers or cluster.scheduler, not both")
        scheduler = self.string(table, "scheduler", "cluster")
        if scheduler is not None and "://" not in scheduler:
            raise self.expect("cluster.scheduler", "an address like tcp://host:8786", scheduler)
        return ClusterSpec(
            workers=self.integer(table, "workers", "cluster", None, 1), scheduler=scheduler
        )

    def export(self, doc: dict) -> ExportSpec:
        table = self.table(doc, "export", "export", ("top_k", "outputs"))
        outputs = table.get("outputs", list(EXPORT_OUTPUTS))
        wanted = "a list of " + " and ".join(f'"{o}"' for o in EXPORT_OUTPUTS)
        if not isinstance(outputs, list) or any(o not in EXPORT_OUTPUTS for o in outputs):
            raise self.expect("export.outputs", wanted, outputs)
        return ExportSpec(
            top_k=self.integer(table, "top_k", "export", 10, 1),
            outputs=tuple(o for o in EXPORT_OUTPUTS if o in outputs),
        )

    def output(self, doc: dict) -> Path:
        table = self.table(doc, "output", "output", ("root",))
        text = self.string(table, "root", "output")
        if text is None:
            raise self.fail("output.root", "missing")
        root = (self.base / Path(text).expanduser()).resolve()
        if root.exists() and not root.is_dir():
            raise self.fail("output.root", f"{root} exists and is not a folder")
        return root
