"""The devices a worker child trains on (worker side: imports TensorFlow).

``configure`` runs once as a child starts, before TensorFlow initializes its devices:
memory growth on every GPU (so a process does not grab a whole card up front), and
optionally the CPU split into logical devices, which lets MirroredStrategy run on a
machine without GPUs. Per job, ``strategy`` picks the distribution strategy and
``precision`` holds the mixed-precision policy for the job's duration only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import keras
import tensorflow as tf

from service.errors import FailedPrecondition

log = logging.getLogger(__name__)
FLOAT32 = "float32"


class MixedFloat16NeedsGpu(FailedPrecondition):
    """mixed_float16 was asked for on a worker that has no GPU."""

    reason = "MIXED_FLOAT16_NEEDS_GPU"


def configure(cpu_devices: int) -> None:
    """Memory growth on every GPU; the CPU split into ``cpu_devices`` logical devices."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        logical = [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_devices)]
        tf.config.set_logical_device_configuration(cpu, logical)


def strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over the GPUs when there are several, else over the logical CPU
    devices when the CPU was split, else TensorFlow's default (one device)."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus if gpus else tf.config.list_logical_devices("CPU")
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def describe(chosen: tf.distribute.Strategy) -> str:
    """A log line naming the replicas a job trains on."""
    replicas = chosen.num_replicas_in_sync
    return f"training on {replicas} replica{'s' if replicas != 1 else ''} ({type(chosen).__name__})"


@contextlib.contextmanager
def precision(policy: str) -> Iterator[None]:
    """The global Keras dtype policy ``policy`` (empty: float32) for the block, reset to
    float32 afterwards whatever happens: a worker child runs many jobs."""
    if policy == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        raise MixedFloat16NeedsGpu(
            "run.mixed_precision 'mixed_float16' needs a GPU and this worker has none; "
            "use 'mixed_bfloat16' on CPU"
        )
    keras.mixed_precision.set_global_policy(policy or FLOAT32)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(FLOAT32)


def float32_outputs(model: keras.Model) -> keras.Model:
    """``model`` itself when every output is float32; else the model under a float32
    linear Activation, so the loss and the exported signature see float32 (the Keras
    mixed-precision guide's advice). Only single-output models can be wrapped without
    renaming the output that per-output losses and metrics refer to."""
    if all(keras.backend.standardize_dtype(t.dtype) == FLOAT32 for t in model.outputs):
        return model
    if len(model.outputs) != 1:
        raise FailedPrecondition(
            "a mixed-precision model with several outputs must compute its outputs in "
            "float32: give each output layer dtype 'float32' in the model config"
        )
    out = keras.layers.Activation("linear", dtype=FLOAT32, name="float32_output")(model.outputs[0])
    return keras.Model(model.inputs, out, name=model.name)
