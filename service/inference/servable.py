"""One loaded model version: its serving signature and a function that runs a batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from service.errors import InvalidRequest


@dataclass(frozen=True)
class InputSpec:
    """Name, numpy dtype and shape (-1 for any size) of one signature input."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]


class Servable:
    """A SavedModel's ``serving_default`` signature, called on numpy batches."""

    def __init__(self, model: str, version: int, path: Path) -> None:
        self.model, self.version = model, version
        self._loaded = tf.saved_model.load(str(path))
        self._fn = self._loaded.signatures["serving_default"]
        specs = self._fn.structured_input_signature[1]
        self.inputs = [
            InputSpec(
                n, np.dtype(s.dtype.as_numpy_dtype), tuple(-1 if d is None else d for d in s.shape)
            )
            for n, s in specs.items()
        ]
        self.outputs = list(self._fn.structured_outputs)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on one batch (called from the batcher's thread)."""
        result = self._fn(**{k: tf.constant(v) for k, v in batch.items()})
        return {k: v.numpy() for k, v in result.items()}

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Inputs keyed by signature name and their row count, or InvalidRequest."""
        if "" in inputs and len(self.inputs) == 1 and len(inputs) == 1:
            inputs = {self.inputs[0].name: inputs[""]}
        expected = {s.name for s in self.inputs}
        where = f"model {self.model!r} version {self.version}"
        if missing := sorted(expected - inputs.keys()):
            raise InvalidRequest(
                f"missing input {missing[0]!r}; {where} expects {sorted(expected)}"
            )
        if extra := sorted(inputs.keys() - expected):
            raise InvalidRequest(f"unknown input {extra[0]!r}; {where} expects {sorted(expected)}")
        rows = {s.name: _check(s, inputs[s.name], where) for s in self.inputs}
        if len(set(rows.values())) > 1:
            raise InvalidRequest(f"inputs have different numbers of rows: {rows}")
        return inputs, next(iter(rows.values()))


def _check(spec: InputSpec, array: np.ndarray, where: str) -> int:
    if array.dtype != spec.dtype:
        raise InvalidRequest(
            f"input {spec.name!r} has dtype {array.dtype.name}; {where} expects {spec.dtype.name}"
        )
    ok = len(array.shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
    )
    if not ok or array.ndim == 0:
        raise InvalidRequest(
            f"input {spec.name!r} has shape {list(array.shape)}; {where} expects {list(spec.shape)}"
        )
    return int(array.shape[0])
