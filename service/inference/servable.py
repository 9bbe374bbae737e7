"""One loaded model version: its serving signature and a function that runs a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from service.errors import InvalidRequest

OUT_OF_MEMORY = (MemoryError, tf.errors.ResourceExhaustedError)
"""What loading or running a version raises when memory runs out."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype and shape (-1 for any size) of one signature input or output."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]


class Servable:
    """A SavedModel's ``serving_default`` signature, called on numpy batches."""

    def __init__(self, model: str, version: int, path: Path, *, allow_nan: bool = False) -> None:
        self.model, self.version, self.allow_nan = model, version, allow_nan
        self._loaded = tf.saved_model.load(str(path))
        self._fn = self._loaded.signatures["serving_default"]
        self.inputs = [_spec(n, s) for n, s in self._fn.structured_input_signature[1].items()]
        self.outputs = [_spec(n, s) for n, s in self._fn.structured_outputs.items()]
        self.nbytes = sum(int(np.prod(v.shape)) * v.dtype.size for v in self._loaded.variables)

    @property
    def where(self) -> str:
        """How messages name this version."""
        return f"model {self.model!r} version {self.version}"

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on one batch (called from a batcher thread)."""
        result = self._fn(**{k: tf.constant(v) for k, v in batch.items()})
        return {k: v.numpy() for k, v in result.items()}

    def warm_up(self, batch_sizes: Sequence[int], calls: int) -> None:
        """Run each batch size a few times, so the first real requests pay no tracing."""
        for size in batch_sizes:
            batch = {s.name: _zeros(s, size) for s in self.inputs}
            for _ in range(calls):
                self.run(batch)

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Inputs keyed by signature name and their row count, or InvalidRequest."""
        if "" in inputs and len(self.inputs) == 1 and len(inputs) == 1:
            inputs = {self.inputs[0].name: inputs[""]}
        expected = sorted(s.name for s in self.inputs)
        if missing := sorted(set(expected) - inputs.keys()):
            raise InvalidRequest(
                f"missing input {missing[0]!r}; {self.where} expects {expected}", field="inputs"
            )
        if extra := sorted(inputs.keys() - set(expected)):
            raise InvalidRequest(
                f"unknown input {extra[0]!r}; {self.where} expects {expected}", field="inputs"
            )
        rows = {s.name: _check(s, inputs[s.name], self.where, self.allow_nan) for s in self.inputs}
        if len(set(rows.values())) > 1:
            raise InvalidRequest(f"inputs have different numbers of rows: {rows}", field="inputs")
        return inputs, next(iter(rows.values()))


def _spec(name: str, spec: tf.TensorSpec) -> TensorSpec:
    shape = tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return TensorSpec(name, np.dtype(spec.dtype.as_numpy_dtype), shape)


def _zeros(spec: TensorSpec, rows: int) -> np.ndarray:
    return np.zeros((rows, *(max(d, 1) for d in spec.shape[1:])), dtype=spec.dtype)


def _check(spec: TensorSpec, array: np.ndarray, where: str, allow_nan: bool) -> int:
    field = f"inputs[{spec.name}]"
    if array.dtype != spec.dtype:
        raise InvalidRequest(
            f"input {spec.name!r} has dtype {array.dtype.name}; {where} expects {spec.dtype.name}",
            field=field,
        )
    ok = len(array.shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, array.shape, strict=True)
    )
    if not ok or array.ndim == 0:
        raise InvalidRequest(
            f"input {spec.name!r} has shape {list(array.shape)}; {where} expects "
            f"{list(spec.shape)}",
            field=field,
        )
    if not allow_nan and array.dtype.kind == "f" and np.isnan(array).any():
        raise InvalidRequest(
            f"input {spec.name!r} contains NaN; {where} expects finite numbers "
            "(FITSERVE_INFERENCE__ALLOW_NAN_INPUTS=true allows NaN)",
            field=field,
        )
    return int(array.shape[0])
