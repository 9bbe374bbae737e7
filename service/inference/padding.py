"""Padding batches to a few allowed sizes, so a model only ever sees those shapes.

A graph function traced per input shape (or an accelerator compiling per shape) would
otherwise retrace for every batch size. Padding repeats the last row (zeros could produce
values a model never sees, e.g. log(0)); padded rows are cut from the outputs. A batch
larger than the largest allowed size (one oversize request) runs in chunks of that size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def padded_size(rows: int, allowed: Sequence[int]) -> int:
    """The smallest allowed size that holds ``rows`` (``rows`` itself when none is set)."""
    return next((size for size in allowed if size >= rows), rows)


def run_padded(
    run: Callable[[Arrays], Arrays], inputs: Arrays, allowed: Sequence[int]
) -> tuple[Arrays, int]:
    """Run ``inputs`` padded to allowed sizes; returns the unpadded outputs and the padding."""
    rows = _rows(inputs)
    if not allowed or rows in allowed:
        return run(inputs), 0
    step = allowed[-1]
    starts = range(0, rows, step)
    chunks = [_run_chunk(run, _slice(inputs, s, s + step), allowed) for s in starts]
    sizes = [min(step, rows - s) for s in starts]
    padding = sum(padded_size(n, allowed) - n for n in sizes)
    return (chunks[0] if len(chunks) == 1 else _concat(chunks)), padding


def _run_chunk(run: Callable[[Arrays], Arrays], inputs: Arrays, allowed: Sequence[int]) -> Arrays:
    rows = _rows(inputs)
    size = padded_size(rows, allowed)
    if size == rows:
        return run(inputs)
    outputs = run({k: _pad(v, size) for k, v in inputs.items()})
    return {k: v[:rows] if v.shape[:1] == (size,) else v for k, v in outputs.items()}


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    extra = np.repeat(array[-1:], size - len(array), axis=0)
    return np.concatenate([array, extra])


def _rows(inputs: Arrays) -> int:
    return len(next(iter(inputs.values())))


def _slice(inputs: Arrays, start: int, stop: int) -> Arrays:
    return {k: v[start:stop] for k, v in inputs.items()}


def _concat(chunks: list[Arrays]) -> Arrays:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
