"""Training settings: one typed, validated object shared by the CLI, job files and the trainer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run; the defaults are tuned on MovieLens."""

    rank: int = 64
    """Size of each user and movie embedding."""
    epochs: int = 200
    """Most passes over the training ratings (early stopping usually ends sooner)."""
    batch_size: int | None = None
    """Ratings per step, drawn by the seeded schedule; None takes all of them in one step."""
    learning_rate: float = 0.05
    """Step size of the optimiser for embeddings."""
    bias_learning_rate: float | None = None
    """Step size for the biases; None uses `learning_rate`."""
    learning_rate_decay: float = 1.0
    """Both step sizes are multiplied by this factor after each epoch."""
    regularization: float = 0.12
    """L2 weight on embeddings, added to each row's averaged gradient."""
    bias_regularization: float = 0.02
    """L2 weight on biases, added to each bias's averaged gradient."""
    optimizer: str = "adam"
    """`adam` (Adam on the averaged gradients) or `sgd` (plain averaged-gradient steps)."""
    init_scale: float = 0.1
    """Embeddings start as normal noise with this standard deviation over sqrt(rank)."""
    seed: int = 0
    """Seeds the initial embeddings, the validation split and the batch schedule."""
    validation_fraction: float = 0.05
    """Share of the training ratings held out for early stopping."""
    patience: int = 20
    """Epochs without a better validation RMSE before training stops."""
    refit: bool = True
    """After early stopping, retrain on all ratings for the best epoch count."""
    shards: int | None = None
    """Shards of the ratings; None uses two per worker."""
    checkpoint_every: int = 1
    """Write a resumable checkpoint every this many epochs (when a checkpoint folder is set)."""

    def __post_init__(self) -> None:
        self.validate("train")

    def validate(self, where: str) -> None:
        """Raise PipelineError naming `where.field` for the first bad value."""
        checks = [
            ("rank", self.rank >= 1, "a positive integer"),
            ("epochs", self.epochs >= 1, "a positive integer"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "a positive integer"),
            ("learning_rate", 0 < self.learning_rate < 10, "a number in (0, 10)"),
            (
                "bias_learning_rate",
                self.bias_learning_rate is None or 0 < self.bias_learning_rate < 10,
                "a number in (0, 10)",
            ),
            ("learning_rate_decay", 0 < self.learning_rate_decay <= 1, "a number in (0, 1]"),
            ("regularization", self.regularization >= 0, "a non-negative number"),
            ("bias_regularization", self.bias_regularization >= 0, "a non-negative number"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("init_scale", self.init_scale > 0, "a positive number"),
            ("validation_fraction", 0 <= self.validation_fraction < 1, "a number in [0, 1)"),
            ("patience", self.patience >= 1, "a positive integer"),
            ("shards", self.shards is None or self.shards >= 1, "a positive integer"),
            ("checkpoint_every", self.checkpoint_every >= 1, "a positive integer"),
        ]
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                raise PipelineError(
                    f"{setting_name(where, name)}: expected {expected}, got {value!r}"
                )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "train") -> TrainConfig:
        """Build from a dict (a job file table), naming `where.key` in any error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields:
                known = ", ".join(fields)
                raise PipelineError(f"{setting_name(where, key)}: unknown setting (known: {known})")
            _check_type(setting_name(where, key), fields[key].type, value)
        config = cls.__new__(cls)
        defaults = cls()
        merged = {f: values.get(f, getattr(defaults, f)) for f in fields}
        for name, value in merged.items():
            object.__setattr__(config, name, value)
        config.validate(where)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the settings that change the trained model."""
        settings = {
            k: v for k, v in self.to_dict().items() if k not in ("shards", "checkpoint_every")
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def effective_bias_learning_rate(self) -> float:
        return self.learning_rate if self.bias_learning_rate is None else self.bias_learning_rate

    def learning_rate_scale(self, epoch: int) -> float:
        """The factor on both step sizes in `epoch` (from 1)."""
        return self.learning_rate_decay ** (epoch - 1)


def setting_name(where: str, name: str) -> str:
    """How an error names a setting: ``--batch-size`` on the command line, else ``train.rank``."""
    if where == "--":
        return f"--{name.replace('_', '-')}"
    return f"{where}.{name}"


_TYPE_NAMES = {
    "int": "an integer",
    "int | None": "an integer",
    "float": "a number",
    "float | None": "a number",
    "str": "a string",
    "bool": "true or false",
}


def _check_type(where: str, annotation: Any, value: Any) -> None:
    annotation = str(annotation)
    if annotation.endswith("| None") and value is None:
        return
    base = annotation.removesuffix(" | None")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[base]
    if not ok:
        raise PipelineError(f"{where}: expected {_TYPE_NAMES[annotation]}, got {value!r}")
