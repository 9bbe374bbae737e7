"""The compile, fit and run options that `Client.train` and `Client.fine_tune` share.

Declared once, as a TypedDict for `**options: Unpack[TrainingOptions]`, so both calls take
the same keyword names with the same defaults, and editors and type checkers list them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from fitserve import _specs
from fitserve._specs import ConfigLike, DatasetLike, LossLike

__all__ = ["TrainingOptions"]


class TrainingOptions(TypedDict, total=False):
    """Keras' compile and fit arguments, plus where the job runs; all optional.

    Defaults, as in Keras where Keras has one: optimizer "adam", loss none (required
    unless the model adds its own), metrics and weighted_metrics none, validation_split
    0.0, epochs 1, batch_size 32, shuffle True, no class_weight, sample_weight_key ""
    (none), seed None (unseeded), no callbacks, queue "" (the default queue),
    mixed_precision "" (off), no labels, time_limit_seconds None (the server's default
    limit on the job's run; more than the server's maximum is refused),
    idempotency_key "" (every call a new job).

    A multi-output model takes ``loss`` and ``metrics`` per output, keyed by output
    name, as Keras does: ``loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
    metrics={"cls": ["accuracy"], "reg": ["mae"]}``. Without ``sample_weight_key``, an
    uploaded array named ``sample_weight`` weights the samples.
    """

    optimizer: ConfigLike
    loss: LossLike | None
    metrics: ConfigLike | Iterable[ConfigLike]
    weighted_metrics: ConfigLike | Iterable[ConfigLike]
    loss_weights: Mapping[str, float] | None
    validation_data: DatasetLike | None
    validation_split: float
    epochs: int
    batch_size: int
    shuffle: bool
    class_weight: Mapping[int, float] | None
    sample_weight_key: str
    seed: int | None
    callbacks: Mapping[str, Any] | None
    queue: str
    mixed_precision: str
    labels: Mapping[str, str] | None
    time_limit_seconds: int | None
    idempotency_key: str


_DEFAULTS: TrainingOptions = {
    "optimizer": "adam",
    "loss": None,
    "metrics": (),
    "weighted_metrics": (),
    "loss_weights": None,
    "validation_data": None,
    "validation_split": 0.0,
    "epochs": 1,
    "batch_size": 32,
    "shuffle": True,
    "class_weight": None,
    "sample_weight_key": "",
    "seed": None,
    "callbacks": None,
    "queue": "",
    "mixed_precision": "",
    "labels": None,
    "time_limit_seconds": None,
    "idempotency_key": "",
}


def request_fields(
    call: str, options: Mapping[str, Any], *, initial_epoch: int = 0, steps_per_epoch: int = 0
) -> dict[str, Any]:
    """The compile, fit, callbacks, run and idempotency_key fields of a Train or FineTune
    request; an unknown keyword raises TypeError as a plain Python call would."""
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    o: dict[str, Any] = {**_DEFAULTS, **options}
    return {
        "compile": _specs.compile_options(**_pick(o, _COMPILE_KEYS)),
        "fit": _specs.fit_options(
            **_pick(o, _FIT_KEYS), initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch
        ),
        "callbacks": _specs.callback_options(o["callbacks"]),
        "run": _specs.run_options(**_pick(o, _RUN_KEYS)),
        "idempotency_key": o["idempotency_key"],
    }


_COMPILE_KEYS = ("optimizer", "loss", "metrics", "weighted_metrics", "loss_weights")
_FIT_KEYS = (
    "validation_data",
    "validation_split",
    "epochs",
    "batch_size",
    "shuffle",
    "class_weight",
    "sample_weight_key",
    "seed",
)
_RUN_KEYS = ("queue", "mixed_precision", "labels", "time_limit_seconds")


def _pick(options: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: options[key] for key in keys}
