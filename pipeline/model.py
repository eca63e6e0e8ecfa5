"""The trained model: id vocabularies plus parameters, and its on-disk contract.

On disk (a folder, published atomically):

- ``users.parquet``: ``user_id`` int32, ``bias`` float32, ``embedding`` list<float32> (rank)
- ``movies.parquet``: ``movie_id`` int32, ``bias`` float32, ``embedding`` list<float32>
- ``model.json``: ``global_mean``, ``rank``, ``rating_min``, ``rating_max`` and the training
  metadata (hyper-parameters, epochs run, best epoch, final metrics, input checksum, version)

Prediction = clip(global_mean + user bias + movie bias + dot(embeddings), rating_min,
rating_max); an unseen user or movie contributes neither bias nor embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.kernel import predict
from pipeline.parameters import Parameters
from pipeline.publish import publishing

MODEL_SCHEMA_VERSION = 1


@dataclass
class Model:
    """A trained factorisation, indexed by dense row numbers with id vocabularies."""

    user_ids: np.ndarray
    """(n_users,) int32 ascending; position = user_index"""
    movie_ids: np.ndarray
    """(n_movies,) int32 ascending; position = movie_index"""
    params: Parameters
    rating_min: float
    rating_max: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.params.rank

    @property
    def global_mean(self) -> float:
        return float(self.params.global_mean)

    @property
    def user_bias(self) -> np.ndarray:
        return self.params.user_bias

    @property
    def movie_bias(self) -> np.ndarray:
        return self.params.movie_bias

    @property
    def user_embedding(self) -> np.ndarray:
        return self.params.user_embedding

    @property
    def movie_embedding(self) -> np.ndarray:
        return self.params.movie_embedding

    def user_index(self, user_id: np.ndarray) -> np.ndarray:
        """(n,) int32 row numbers of `user_id`, -1 where unseen in training."""
        return _lookup(self.user_ids, user_id)

    def movie_index(self, movie_id: np.ndarray) -> np.ndarray:
        """(n,) int32 row numbers of `movie_id`, -1 where unseen in training."""
        return _lookup(self.movie_ids, movie_id)

    def predict(self, user_id: np.ndarray, movie_id: np.ndarray) -> np.ndarray:
        """(n,) float32 clipped predictions for MovieLens ids; unseen ids fall back to biases."""
        pred = predict(self.user_index(user_id), self.movie_index(movie_id), self.params)
        return np.clip(pred, self.rating_min, self.rating_max, out=pred)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Publish the model folder at `path` atomically."""
        with publishing(Path(path), overwrite=overwrite) as staging:
            self.write(staging)

    def write(self, folder: Path) -> None:
        """Write the model files into an existing (staging) folder."""
        _write_side(
            folder / "users.parquet", "user_id", self.user_ids, self.user_bias, self.user_embedding
        )
        _write_side(
            folder / "movies.parquet",
            "movie_id",
            self.movie_ids,
            self.movie_bias,
            self.movie_embedding,
        )
        document = {
            "schema_version": MODEL_SCHEMA_VERSION,
            "pipeline_version": __version__,
            "global_mean": self.global_mean,
            "rank": self.rank,
            "rating_min": self.rating_min,
            "rating_max": self.rating_max,
            "n_users": len(self.user_ids),
            "n_movies": len(self.movie_ids),
            **self.metadata,
        }
        (folder / "model.json").write_text(json.dumps(document, indent=2, default=_json_default))

    @classmethod
    def load(cls, path: Path) -> Model:
        """Read a model folder written by `save`."""
        path = Path(path)
        meta_path = path / "model.json"
        if not meta_path.is_file():
            raise PipelineError(f"{path} is not a model folder (no model.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{meta_path}: line {exc.lineno}: invalid JSON") from None
        user_ids, user_bias, user_embedding = _read_side(path / "users.parquet", "user_id")
        movie_ids, movie_bias, movie_embedding = _read_side(path / "movies.parquet", "movie_id")
        params = Parameters(
            np.float32(meta["global_mean"]),
            user_bias,
            movie_bias,
            user_embedding,
            movie_embedding,
        )
        reserved = {"global_mean", "rank", "rating_min", "rating_max", "n_users", "n_movies"}
        metadata = {k: v for k, v in meta.items() if k not in reserved}
        return cls(
            user_ids,
            movie_ids,
            params,
            float(meta["rating_min"]),
            float(meta["rating_max"]),
            metadata,
        )


def _lookup(vocabulary: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if len(vocabulary) == 0:
        return np.full(len(ids), -1, np.int32)
    index = np.searchsorted(vocabulary, ids)
    index = np.minimum(index, len(vocabulary) - 1)
    return np.where(vocabulary[index] == ids, index, -1).astype(np.int32)


def _write_side(
    path: Path, id_name: str, ids: np.ndarray, bias: np.ndarray, embedding: np.ndarray
) -> None:
    n, rank = embedding.shape
    values = pa.array(np.ascontiguousarray(embedding, np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, (n + 1) * rank, rank, dtype=np.int32))
    table = pa.table(
        {
            id_name: pa.array(ids, pa.int32()),
            "bias": pa.array(bias, pa.float32()),
            "embedding": pa.ListArray.from_arrays(offsets, values),
        }
    )
    pq.write_table(table, path)


def _read_side(path: Path, id_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise PipelineError(f"model file {path} is missing")
    table = pq.read_table(path)
    ids = table.column(id_name).to_numpy().astype(np.int32)
    bias = table.column("bias").to_numpy().astype(np.float32)
    embedding_col = table.column("embedding").combine_chunks()
    flat = embedding_col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    embedding = flat.reshape(len(ids), -1) if len(ids) else np.zeros((0, 0), np.float32)
    return ids, bias, np.ascontiguousarray(embedding)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
